//! SFTP operations as session events: the subsystem's packets are read
//! as they pass (never changed), headers only — a packet's data is
//! counted, not kept, so memory stays bounded however much is copied.
//! Version 3 (draft-ietf-secsh-filexfer-02), what OpenSSH speaks.
use std::collections::HashMap;

use crate::sessions::Event;

/// How much of a packet is kept to read its header (paths included).
const HEAD: usize = 8 * 1024;
/// Open files and pending requests tracked at most (OpenSSH's server
/// allows 512 open handles).
const MAX_TRACKED: usize = 4096;

const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const WRITE: u8 = 6;
const OPENDIR: u8 = 11;
const REMOVE: u8 = 13;
const MKDIR: u8 = 14;
const RMDIR: u8 = 15;
const RENAME: u8 = 18;
/// Vendor requests by name: OpenSSH renames with `posix-rename@openssh.com`.
const EXTENDED: u8 = 200;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;

const PFLAG_WRITE: u32 = 0x02;

#[derive(Default)]
pub struct SftpLog {
    from_client: Frames,
    from_server: Frames,
    /// OPEN / OPENDIR request id → path, until the server answers.
    opening: HashMap<u32, (String, bool)>,
    /// READ request id → handle, until the data comes.
    reading: HashMap<u32, Vec<u8>>,
    files: HashMap<Vec<u8>, OpenFile>,
}

struct OpenFile {
    path: String,
    read: u64,
    written: u64,
}

impl SftpLog {
    /// Reads what the client sent; `record` gets the events it makes.
    pub fn client_sent(&mut self, data: &[u8], record: &mut dyn FnMut(&Event<'_>)) {
        let mut frames = std::mem::take(&mut self.from_client);
        frames.feed(data, |head, _| self.client_packet(head, record));
        self.from_client = frames;
    }

    pub fn server_sent(&mut self, data: &[u8]) {
        let mut frames = std::mem::take(&mut self.from_server);
        frames.feed(data, |head, len| self.server_packet(head, len));
        self.from_server = frames;
    }

    fn client_packet(&mut self, head: &[u8], record: &mut dyn FnMut(&Event<'_>)) {
        let mut r = Reader(head);
        let Some(kind) = r.u8() else { return };
        let Some(id) = r.u32() else { return };
        let mut event = |op: &str, path: &str, to: Option<&str>| {
            record(&Event::Sftp {
                op,
                path,
                to,
                read: None,
                written: None,
            });
        };
        match kind {
            OPEN | OPENDIR => {
                let Some(path) = r.string() else { return };
                let write = kind == OPEN && r.u32().is_some_and(|f| f & PFLAG_WRITE != 0);
                let op = match (kind, write) {
                    (OPENDIR, _) => "opendir",
                    (_, true) => "open-write",
                    _ => "open-read",
                };
                event(op, &path, None);
                if self.opening.len() < MAX_TRACKED {
                    self.opening.insert(id, (path, kind == OPEN));
                }
            }
            READ => {
                if let Some(handle) = r.bytes()
                    && self.reading.len() < MAX_TRACKED
                {
                    self.reading.insert(id, handle.to_vec());
                }
            }
            WRITE => {
                let (Some(handle), Some(_offset), Some(len)) = (r.bytes(), r.u64(), r.u32()) else {
                    return;
                };
                if let Some(file) = self.files.get_mut(handle) {
                    file.written += u64::from(len);
                }
            }
            CLOSE => {
                let Some(handle) = r.bytes() else { return };
                if let Some(file) = self.files.remove(handle) {
                    record(&Event::Sftp {
                        op: "close",
                        path: &file.path,
                        to: None,
                        read: Some(file.read),
                        written: Some(file.written),
                    });
                }
            }
            REMOVE | MKDIR | RMDIR => {
                let Some(path) = r.string() else { return };
                let op = match kind {
                    REMOVE => "remove",
                    MKDIR => "mkdir",
                    _ => "rmdir",
                };
                event(op, &path, None);
            }
            RENAME => {
                let (Some(from), Some(to)) = (r.string(), r.string()) else {
                    return;
                };
                event("rename", &from, Some(&to));
            }
            EXTENDED => {
                let name = r.string();
                if let (Some("posix-rename@openssh.com"), Some(from), Some(to)) =
                    (name.as_deref(), r.string(), r.string())
                {
                    event("rename", &from, Some(&to));
                }
            }
            _ => {}
        }
    }

    fn server_packet(&mut self, head: &[u8], len: usize) {
        let mut r = Reader(head);
        let Some(kind) = r.u8() else { return };
        let Some(id) = r.u32() else { return };
        match kind {
            HANDLE => {
                let (Some((path, file)), Some(handle)) = (self.opening.remove(&id), r.bytes())
                else {
                    return;
                };
                if file && self.files.len() < MAX_TRACKED {
                    self.files.insert(
                        handle.to_vec(),
                        OpenFile {
                            path,
                            read: 0,
                            written: 0,
                        },
                    );
                }
            }
            DATA => {
                // type, id, and the data's own length field: 9 bytes.
                let data = len.saturating_sub(9) as u64;
                if let Some(handle) = self.reading.remove(&id)
                    && let Some(file) = self.files.get_mut(&handle)
                {
                    file.read += data;
                }
            }
            STATUS => {
                self.opening.remove(&id);
                self.reading.remove(&id);
            }
            _ => {}
        }
    }
}

/// Cuts a byte stream into SFTP packets, keeping at most `HEAD` bytes of
/// each and skipping the rest.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
    skip: usize,
}

impl Frames {
    /// Calls `packet(head, length)` for each whole packet header seen.
    fn feed(&mut self, mut data: &[u8], mut packet: impl FnMut(&[u8], usize)) {
        loop {
            let skipped = self.skip.min(data.len());
            self.skip -= skipped;
            data = &data[skipped..];
            if data.is_empty() {
                return;
            }
            if self.buf.len() < 4 {
                let take = (4 - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() < 4 {
                    return;
                }
            }
            let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
            let want = 4 + len.min(HEAD);
            let take = (want - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() < want {
                return;
            }
            packet(&self.buf[4..], len);
            self.skip = len - len.min(HEAD);
            self.buf.clear();
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*head))
    }

    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_be_bytes(*head))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        if self.0.len() < len {
            return None;
        }
        let (value, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(value)
    }

    fn string(&mut self) -> Option<String> {
        self.bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut p = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(kind);
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn frames_survive_any_split_and_skip_data() {
        let mut stream = packet(WRITE, &[0; 20_000]);
        stream.extend(packet(CLOSE, b"abcd"));
        for split in [1, 3, 4, 5, 100, 8_200, 20_004, 20_005, 20_010] {
            let mut frames = Frames::default();
            let mut seen = Vec::new();
            frames.feed(&stream[..split], |head, len| {
                seen.push((head[0], len, head.len()))
            });
            frames.feed(&stream[split..], |head, len| {
                seen.push((head[0], len, head.len()))
            });
            assert_eq!(
                seen,
                [(WRITE, 20_001, HEAD), (CLOSE, 5, 5)],
                "split {split}"
            );
            assert!(frames.buf.capacity() <= HEAD + 4);
        }
    }
}
