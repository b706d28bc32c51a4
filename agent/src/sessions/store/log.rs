//! The commit log: what makes appended events durable. One preallocated
//! file, `commit.log` in the store's directory, written front to back;
//! one `fdatasync` of it covers every session waiting at that moment.
//! What it holds goes into sled after the waiters are released; sled is
//! flushed about once a second (and whenever the log is full), and the
//! log then starts over under a new epoch. After a crash, the records of
//! the current epoch are replayed into sled (inserts of the same keys
//! and values: replaying twice changes nothing).
//!
//! Layout, version 1 (integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `ILCOMLOG` |
//! | 8 | 4 | version (1) |
//! | 12 | 8 | epoch |
//! | 20 | 4 | CRC-32 of bytes 0..20 |
//! | 4096 | … | records, back to back |
//!
//! A record: body length (u32), CRC-32 of the epoch (u64) followed by the
//! body (u32), then the body: kind (u8: 1 an event chunk, 2 a session's
//! summary), session id (16), the chunk's first seq (u64; 0 for a
//! summary), the payload. Replay stops at the first record whose length
//! or CRC does not check: a torn write at the crash, or the zeroes (or an
//! older epoch's records) after the last one written.
use std::{
    fs::File,
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
};

const MAGIC: &[u8; 8] = b"ILCOMLOG";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
const RECORD_HEADER: usize = 8;
const BODY_HEADER: usize = 1 + 16 + 8;

/// Largest log; smaller when there is less room (a quarter of what is
/// free, or of the store's quota, when the log is made; at least
/// [`MIN_SIZE`]).
pub(super) const MAX_SIZE: u64 = 16 << 20;
const MIN_SIZE: u64 = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Chunk = 1,
    Summary = 2,
}

/// A record read back at recovery.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Replayed {
    pub(super) kind: Kind,
    pub(super) id: [u8; 16],
    pub(super) first_seq: u64,
    pub(super) payload: Vec<u8>,
}

pub(super) struct CommitLog {
    file: File,
    epoch: u64,
    /// Where the next record goes.
    end: u64,
    size: u64,
    /// Records gathered for the next write.
    batch: Vec<u8>,
}

impl CommitLog {
    /// Opens `path` (made and preallocated when missing) and reads the
    /// current epoch's records, for replay.
    pub(super) fn open(path: &Path, room: u64) -> io::Result<(Self, Vec<Replayed>)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut header = [0u8; 24];
        let epoch = match file.read_exact_at(&mut header, 0) {
            Ok(()) if len > HEADER => parse_header(&header).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a commit log of version {VERSION}", path.display()),
                )
            })?,
            _ => {
                let size = (room / 4).clamp(MIN_SIZE, MAX_SIZE) & !0xffff;
                nix::fcntl::posix_fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                    size as i64,
                )?;
                write_header(&file, 0)?;
                file.sync_all()?;
                if let Some(dir) = path.parent() {
                    File::open(dir)?.sync_all()?;
                }
                0
            }
        };
        let size = file.metadata()?.len();
        let mut log = Self {
            file,
            epoch,
            end: HEADER,
            size,
            batch: Vec::with_capacity(64 * 1024),
        };
        let replayed = log.read_records()?;
        Ok((log, replayed))
    }

    fn read_records(&mut self) -> io::Result<Vec<Replayed>> {
        let mut data = vec![0u8; (self.size - HEADER) as usize];
        self.file.read_exact_at(&mut data, HEADER)?;
        let mut records = Vec::new();
        let mut at = 0usize;
        while let Some((record, len)) = parse_record(&data[at..], self.epoch) {
            records.push(record);
            at += len;
        }
        self.end = HEADER + at as u64;
        Ok(records)
    }

    /// Gathers a record for the next [`CommitLog::write`].
    pub(super) fn push(&mut self, kind: Kind, id: &[u8; 16], first_seq: u64, payload: &[u8]) {
        let body = BODY_HEADER + payload.len();
        let start = self.batch.len();
        self.batch.extend_from_slice(&(body as u32).to_le_bytes());
        self.batch.extend_from_slice(&[0; 4]);
        self.batch.push(kind as u8);
        self.batch.extend_from_slice(id);
        self.batch.extend_from_slice(&first_seq.to_le_bytes());
        self.batch.extend_from_slice(payload);
        let crc = checksum(self.epoch, &self.batch[start + RECORD_HEADER..]);
        self.batch[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Whether the gathered records fit after the last written one.
    pub(super) fn fits(&self) -> bool {
        self.end + self.batch.len() as u64 <= self.size
    }

    /// Writes the gathered records (not yet durable: see `sync`).
    pub(super) fn write(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&self.batch, self.end)?;
        self.end += self.batch.len() as u64;
        self.batch.clear();
        if self.batch.capacity() > 4 << 20 {
            self.batch = Vec::with_capacity(64 * 1024);
        }
        Ok(())
    }

    /// Starts over under a new epoch: the caller has made everything
    /// written to the log durable elsewhere (sled flushed). Records
    /// gathered and not yet written are kept, checksummed anew.
    pub(super) fn restart(&mut self) -> io::Result<()> {
        self.epoch += 1;
        write_header(&self.file, self.epoch)?;
        self.file.sync_data()?;
        self.end = HEADER;
        let mut at = 0;
        while at < self.batch.len() {
            let len =
                u32::from_le_bytes(self.batch[at..at + 4].try_into().expect("4 bytes")) as usize;
            let body = at + RECORD_HEADER..at + RECORD_HEADER + len;
            let crc = checksum(self.epoch, &self.batch[body.clone()]);
            self.batch[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
            at = body.end;
        }
        Ok(())
    }

    /// Drops the gathered records: the caller made them durable elsewhere.
    pub(super) fn drop_batch(&mut self) {
        self.batch.clear();
    }

    /// A handle for `fdatasync`, usable without holding the log.
    pub(super) fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    #[cfg(test)]
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }
}

fn checksum(epoch: u64, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&epoch.to_le_bytes());
    hasher.update(body);
    hasher.finalize()
}

fn write_header(file: &File, epoch: u64) -> io::Result<()> {
    let mut header = [0u8; 24];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32fast::hash(&header[..20]);
    header[20..].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&header, 0)
}

fn parse_header(header: &[u8; 24]) -> Option<u64> {
    let crc = u32::from_le_bytes(header[20..24].try_into().ok()?);
    if &header[..8] != MAGIC
        || u32::from_le_bytes(header[8..12].try_into().ok()?) != VERSION
        || crc32fast::hash(&header[..20]) != crc
    {
        return None;
    }
    Some(u64::from_le_bytes(header[12..20].try_into().ok()?))
}

/// The record at the start of `data` and its length, if whole and of
/// `epoch`.
fn parse_record(data: &[u8], epoch: u64) -> Option<(Replayed, usize)> {
    let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?);
    if len < BODY_HEADER {
        return None;
    }
    let body = data.get(RECORD_HEADER..RECORD_HEADER.checked_add(len)?)?;
    if checksum(epoch, body) != crc {
        return None;
    }
    let kind = match body[0] {
        1 => Kind::Chunk,
        2 => Kind::Summary,
        _ => return None,
    };
    let record = Replayed {
        kind,
        id: body[1..17].try_into().ok()?,
        first_seq: u64::from_le_bytes(body[17..25].try_into().ok()?),
        payload: body[BODY_HEADER..].to_vec(),
    };
    Some((record, RECORD_HEADER + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (CommitLog, Vec<Replayed>) {
        CommitLog::open(&dir.join("commit.log"), 64 << 20).unwrap()
    }

    #[test]
    fn records_written_are_read_back_and_a_torn_tail_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, replayed) = open(dir.path());
        assert!(replayed.is_empty());
        log.push(Kind::Summary, &[1; 16], 0, b"{\"id\":1}");
        log.push(Kind::Chunk, &[1; 16], 0, b"line 0\nline 1");
        log.write().unwrap();
        log.push(Kind::Chunk, &[2; 16], 7, b"line 7");
        log.write().unwrap();
        let end = log.end;
        drop(log);

        let (log, replayed) = open(dir.path());
        assert_eq!(replayed.len(), 3);
        assert_eq!(replayed[1].payload, b"line 0\nline 1");
        assert_eq!((replayed[2].id, replayed[2].first_seq), ([2; 16], 7));
        assert_eq!(log.end, end);
        drop(log);

        // The last record torn: its last byte never reached the disk.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("commit.log"))
            .unwrap();
        file.write_all_at(&[0], end - 1).unwrap();
        let (_, replayed) = open(dir.path());
        assert_eq!(replayed.len(), 2);
    }

    #[test]
    fn a_restarted_log_replays_only_its_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        for seq in 0..3 {
            log.push(
                Kind::Chunk,
                &[1; 16],
                seq,
                b"old and longer than the new one",
            );
        }
        log.write().unwrap();
        log.push(Kind::Chunk, &[2; 16], 0, b"gathered before");
        log.restart().unwrap();
        log.push(Kind::Chunk, &[3; 16], 0, b"new");
        log.write().unwrap();
        assert_eq!(log.epoch(), 1);
        drop(log);
        let (_, replayed) = open(dir.path());
        assert_eq!(replayed.len(), 2, "older records are behind the new ones");
        assert_eq!(replayed[0].payload, b"gathered before");
        assert_eq!(replayed[1].payload, b"new");
    }

    #[test]
    fn garbage_is_never_replayed_nor_a_crash() {
        let epoch = 0;
        for len in 0..64usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            assert!(parse_record(&data, epoch).is_none());
        }
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 64]);
        assert!(parse_record(&huge, epoch).is_none());
    }
}
