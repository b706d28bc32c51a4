//! The commit log: what makes appended events durable. One preallocated
//! file, `commit.v2.log` in the store's directory, in two halves: the active
//! half is written front to back, and one `fdatasync` of it covers every
//! session waiting at that moment. When it has gathered enough (or a
//! second has passed), the halves swap: the other half takes the writes,
//! and the indexer thread puts what the full one holds into sled, flushes
//! sled and starts that half over under a new epoch. The waiters never
//! wait for sled. After a crash, both halves' records are replayed into
//! sled, the older epoch first (inserts of the same keys and values:
//! replaying twice changes nothing).
//!
//! Layout, version 2 (integers little-endian). Each half, at offset 0 and
//! at half the file's size:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `ILCOMLOG` |
//! | 8 | 4 | version (2) |
//! | 12 | 8 | epoch |
//! | 20 | 4 | CRC-32 of bytes 0..20 |
//! | 4096 | … | records, back to back |
//!
//! A record: body length (u32), CRC-32 of the half's epoch (u64) followed
//! by the body (u32), then the body: kind (u8: 1 an event chunk, 2 a
//! session's summary), session id (16), the chunk's first seq (u64; 0 for
//! a summary), the payload. Replay of a half stops at the first record
//! whose length or CRC does not check: a torn write at the crash, or the
//! zeroes (or an older epoch's records) after the last one written. A
//! half whose header does not check holds nothing. Version 1 (one region
//! over the whole file, named `commit.log`) is still read, once, when the
//! store opens.
use std::{
    fs::File,
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
};

const MAGIC: &[u8; 8] = b"ILCOMLOG";
const VERSION: u32 = 2;
/// The log of version 1.
pub(super) const LEGACY_FILE: &str = "commit.log";
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

#[derive(Clone, Copy, Debug, Default)]
struct Half {
    epoch: u64,
    /// Where the next record goes, from the half's start.
    end: u64,
    /// Started over since it last took writes: free to take them.
    free: bool,
}

pub(super) struct CommitLog {
    file: File,
    /// The size of each half.
    half_size: u64,
    halves: [Half; 2],
    active: usize,
    /// Records gathered for the next write, checksummed when written
    /// (with the epoch of the half they go to).
    batch: Vec<u8>,
    /// A log of version 1 that was read, removed once both halves start
    /// over.
    legacy: Option<std::path::PathBuf>,
}

impl CommitLog {
    /// Opens `path` (made and preallocated when missing) and reads both
    /// halves' records, the older epoch's first, for replay.
    pub(super) fn open(path: &Path, room: u64) -> io::Result<(Self, Vec<Replayed>)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        if len < 2 * (HEADER + 4096) {
            let size = (room / 4).clamp(MIN_SIZE, MAX_SIZE) & !0xffff;
            nix::fcntl::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, size as i64)?;
            write_header(&file, 0, 0)?;
            write_header(&file, size / 2, 1)?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let size = file.metadata()?.len();
        let half_size = size / 2;
        let mut header = [0u8; 24];
        // A log of version 1 (one region, the whole file, under the name
        // `commit.log`) is read, older than anything here; the store
        // removes it once both halves start over.
        let mut read = Vec::new();
        let legacy_path = path.with_file_name(LEGACY_FILE);
        let mut legacy_read = None;
        if let Ok(legacy) = File::open(&legacy_path)
            && legacy.read_exact_at(&mut header, 0).is_ok()
            && let Some((1, epoch)) = parse_header(&header)
        {
            let size = legacy.metadata()?.len();
            read.push((0, read_records(&legacy, 0, size, epoch)?.1));
            legacy_read = Some(legacy_path);
        }
        let mut halves = [Half::default(); 2];
        let mut valid = [false; 2];
        for i in 0..2 {
            let base = i as u64 * half_size;
            file.read_exact_at(&mut header, base)?;
            if let Some((VERSION, epoch)) = parse_header(&header) {
                let (end, records) = read_records(&file, base, half_size, epoch)?;
                halves[i] = Half {
                    epoch,
                    end,
                    free: records.is_empty(),
                };
                valid[i] = true;
                read.push((epoch + 1, records));
            }
        }
        read.sort_by_key(|(epoch, _)| *epoch);
        // A half whose header does not check holds nothing; it gets a new
        // header, newer than the other's, before anything is written to it.
        for i in 0..2 {
            if !valid[i] {
                let epoch = halves[0].epoch.max(halves[1].epoch) + 1;
                write_header(&file, i as u64 * half_size, epoch)?;
                file.sync_data()?;
                halves[i] = Half {
                    epoch,
                    end: HEADER,
                    free: true,
                };
            }
        }
        let mut log = Self::new(file, half_size, halves);
        log.legacy = legacy_read;
        // Writes go on in the newer half that holds records (a crash
        // between a swap and the first write leaves the new half empty:
        // then in the older one, which is as good).
        let used = halves.map(|h| h.end > HEADER);
        log.active = match used {
            [true, true] => usize::from(halves[1].epoch > halves[0].epoch),
            [false, true] => 1,
            _ => 0,
        };
        log.halves[log.active].free = false;
        Ok((log, read.into_iter().flat_map(|(_, r)| r).collect()))
    }

    fn new(file: File, half_size: u64, halves: [Half; 2]) -> Self {
        Self {
            file,
            half_size,
            halves,
            active: 0,
            batch: Vec::with_capacity(64 * 1024),
            legacy: None,
        }
    }

    /// Gathers a record for the next [`CommitLog::write`].
    pub(super) fn push(&mut self, kind: Kind, id: &[u8; 16], first_seq: u64, payload: &[u8]) {
        let body = BODY_HEADER + payload.len();
        self.batch.extend_from_slice(&(body as u32).to_le_bytes());
        self.batch.extend_from_slice(&[0; 4]);
        self.batch.push(kind as u8);
        self.batch.extend_from_slice(id);
        self.batch.extend_from_slice(&first_seq.to_le_bytes());
        self.batch.extend_from_slice(payload);
    }

    /// Whether the gathered records fit after the last one written to the
    /// active half.
    pub(super) fn fits(&self) -> bool {
        self.halves[self.active].end + self.batch.len() as u64 <= self.half_size
    }

    /// Writes the gathered records to the active half (not yet durable:
    /// see `sync_handle`).
    pub(super) fn write(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let half = self.halves[self.active];
        let mut at = 0;
        while at < self.batch.len() {
            let len =
                u32::from_le_bytes(self.batch[at..at + 4].try_into().expect("4 bytes")) as usize;
            let body = at + RECORD_HEADER..at + RECORD_HEADER + len;
            let crc = checksum(half.epoch, &self.batch[body.clone()]);
            self.batch[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
            at = body.end;
        }
        let base = self.active as u64 * self.half_size;
        self.file.write_all_at(&self.batch, base + half.end)?;
        self.halves[self.active].end += self.batch.len() as u64;
        self.batch.clear();
        if self.batch.capacity() > 4 << 20 {
            self.batch = Vec::with_capacity(64 * 1024);
        }
        Ok(())
    }

    /// Moves the writes to the other half, if it is free; returns the
    /// half that took them until now, for the indexer. The half taking the
    /// writes must have the newest epoch (replay goes by epoch); one that
    /// has not is given a new header first.
    pub(super) fn swap(&mut self) -> io::Result<Option<usize>> {
        let other = 1 - self.active;
        if !self.halves[other].free {
            return Ok(None);
        }
        if self.halves[other].epoch < self.halves[self.active].epoch {
            self.restart(other)?;
        }
        self.halves[other].free = false;
        Ok(Some(std::mem::replace(&mut self.active, other)))
    }

    /// Starts a half over under a new epoch, newer than both: the caller
    /// has made everything written to it durable elsewhere (sled flushed).
    pub(super) fn restart(&mut self, half: usize) -> io::Result<()> {
        let epoch = self.halves[0].epoch.max(self.halves[1].epoch) + 1;
        write_header(&self.file, half as u64 * self.half_size, epoch)?;
        self.file.sync_data()?;
        let free = half != self.active;
        self.halves[half] = Half {
            epoch,
            end: HEADER,
            free,
        };
        Ok(())
    }

    /// Starts the active half over (everything in it is in sled, flushed).
    pub(super) fn restart_active(&mut self) -> io::Result<()> {
        self.restart(self.active)
    }

    /// Whether the half not taking writes is free to take them.
    pub(super) fn other_is_free(&self) -> bool {
        self.halves[1 - self.active].free
    }

    /// Starts both halves over, the writes going to the first (after
    /// recovery, with everything replayed into sled and sled flushed).
    pub(super) fn restart_both(&mut self) -> io::Result<()> {
        self.active = 0;
        self.restart(0)?;
        self.restart(1)?;
        if let Some(legacy) = self.legacy.take() {
            std::fs::remove_file(legacy)?;
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
    fn end(&self) -> u64 {
        self.active as u64 * self.half_size + self.halves[self.active].end
    }
}

/// A half's records of `epoch`, and where the next one goes.
fn read_records(file: &File, base: u64, size: u64, epoch: u64) -> io::Result<(u64, Vec<Replayed>)> {
    let mut data = vec![0u8; (size - HEADER) as usize];
    file.read_exact_at(&mut data, base + HEADER)?;
    let mut records = Vec::new();
    let mut at = 0usize;
    while let Some((record, len)) = parse_record(&data[at..], epoch) {
        records.push(record);
        at += len;
    }
    Ok((HEADER + at as u64, records))
}

fn checksum(epoch: u64, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&epoch.to_le_bytes());
    hasher.update(body);
    hasher.finalize()
}

fn write_header(file: &File, at: u64, epoch: u64) -> io::Result<()> {
    let mut header = [0u8; 24];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32fast::hash(&header[..20]);
    header[20..].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&header, at)
}

/// A header's version and epoch, if it checks.
fn parse_header(header: &[u8; 24]) -> Option<(u32, u64)> {
    let crc = u32::from_le_bytes(header[20..24].try_into().ok()?);
    if &header[..8] != MAGIC || crc32fast::hash(&header[..20]) != crc {
        return None;
    }
    Some((
        u32::from_le_bytes(header[8..12].try_into().ok()?),
        u64::from_le_bytes(header[12..20].try_into().ok()?),
    ))
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

    const FILE: &str = "commit.v2.log";

    fn open(dir: &Path) -> (CommitLog, Vec<Replayed>) {
        CommitLog::open(&dir.join(FILE), 64 << 20).unwrap()
    }

    fn payloads(replayed: &[Replayed]) -> Vec<&[u8]> {
        replayed.iter().map(|r| r.payload.as_slice()).collect()
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
        let end = log.end();
        drop(log);

        let (log, replayed) = open(dir.path());
        assert_eq!(replayed.len(), 3);
        assert_eq!(replayed[1].payload, b"line 0\nline 1");
        assert_eq!((replayed[2].id, replayed[2].first_seq), ([2; 16], 7));
        assert_eq!(log.end(), end, "writes go on after the last record");
        drop(log);

        // The last record torn: its last byte never reached the disk.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(FILE))
            .unwrap();
        file.write_all_at(&[0], end - 1).unwrap();
        let (_, replayed) = open(dir.path());
        assert_eq!(replayed.len(), 2);
    }

    #[test]
    fn both_halves_replay_older_first_and_a_restarted_half_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        for seq in 0..3 {
            log.push(
                Kind::Chunk,
                &[1; 16],
                seq,
                b"first half, longer than the rest",
            );
        }
        log.write().unwrap();
        let full = log.swap().unwrap().expect("the other half is free");
        assert!(
            log.swap().unwrap().is_none(),
            "the full half is not free yet"
        );
        log.push(Kind::Chunk, &[2; 16], 0, b"second half");
        log.write().unwrap();
        // A crash while the full half is being indexed: both replay.
        let (_, replayed) = open(dir.path());
        assert_eq!(replayed.len(), 4);
        assert_eq!(replayed[3].payload, b"second half");

        log.push(Kind::Chunk, &[3; 16], 0, b"gathered while indexing");
        log.restart(full).unwrap();
        log.write().unwrap();
        drop(log);
        let (mut log, replayed) = open(dir.path());
        assert_eq!(
            payloads(&replayed),
            [b"second half".as_slice(), b"gathered while indexing"]
        );
        // The half started over takes the writes next, under a newer epoch
        // than the one it follows.
        let second = log.swap().unwrap().expect("started over, free");
        log.push(Kind::Chunk, &[4; 16], 0, b"newest");
        log.write().unwrap();
        drop(log);
        let (mut log, replayed) = open(dir.path());
        assert_eq!(replayed.last().unwrap().payload, b"newest");
        assert_eq!(replayed.len(), 3, "the older half first");
        log.restart(second).unwrap();
        drop(log);
        let (_, replayed) = open(dir.path());
        assert_eq!(payloads(&replayed), [b"newest".as_slice()]);
    }

    #[test]
    fn a_version_one_log_is_read_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        // Version 1: one region over the whole file.
        let legacy = dir.path().join(LEGACY_FILE);
        let file = File::create(&legacy).unwrap();
        file.set_len(1 << 20).unwrap();
        let mut header = [0u8; 24];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&1u32.to_le_bytes());
        header[12..20].copy_from_slice(&5u64.to_le_bytes());
        let crc = crc32fast::hash(&header[..20]);
        header[20..].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(&header, 0).unwrap();
        let body = [&[1u8][..], &[9; 16], &0u64.to_le_bytes(), b"kept"].concat();
        let mut record = (body.len() as u32).to_le_bytes().to_vec();
        record.extend_from_slice(&checksum(5, &body).to_le_bytes());
        record.extend_from_slice(&body);
        file.write_all_at(&record, HEADER).unwrap();

        let (mut log, replayed) = open(dir.path());
        assert_eq!(payloads(&replayed), [b"kept".as_slice()]);
        log.restart_both().unwrap();
        assert!(!legacy.exists());
        drop(log);
        assert!(open(dir.path()).1.is_empty());
    }

    #[test]
    fn a_half_with_a_broken_header_holds_nothing_and_is_given_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        log.push(Kind::Chunk, &[1; 16], 0, b"kept");
        log.write().unwrap();
        let other = (1 - log.active) as u64 * log.half_size;
        drop(log);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(FILE))
            .unwrap();
        file.write_all_at(b"garbage!", other).unwrap();
        let (mut log, replayed) = open(dir.path());
        assert_eq!(payloads(&replayed), [b"kept".as_slice()]);
        log.swap().unwrap().expect("the broken half is free");
        log.push(Kind::Chunk, &[1; 16], 1, b"after");
        log.write().unwrap();
        drop(log);
        let (_, replayed) = open(dir.path());
        assert_eq!(payloads(&replayed), [b"kept".as_slice(), b"after"]);
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
