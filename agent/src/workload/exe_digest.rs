//! SHA-256 of executables, cached by (device, inode, mtime, size) so a busy
//! host hashes each binary once, and a replaced binary is hashed again.
use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read},
    os::unix::fs::MetadataExt,
    sync::{Arc, OnceLock},
};

use parking_lot::Mutex;

use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileVersion {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    size: u64,
}

/// One cell per file version: when a burst of connections comes from a
/// binary not hashed yet, one thread hashes it and the others wait for that
/// result instead of all hashing the same file at once.
#[derive(Debug, Default)]
pub struct ExeDigests {
    cache: Mutex<HashMap<FileVersion, Arc<OnceLock<String>>>>,
}

const MAX_CACHED: usize = 4096;

impl ExeDigests {
    /// Hex SHA-256 of an open file.
    pub fn digest(&self, mut file: File) -> io::Result<String> {
        let meta = file.metadata()?;
        let version = FileVersion {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            size: meta.size(),
        };
        let cell = {
            let mut cache = self.cache.lock();
            if cache.len() >= MAX_CACHED && !cache.contains_key(&version) {
                cache.clear();
            }
            cache.entry(version).or_default().clone()
        };
        if let Some(hex) = cell.get() {
            return Ok(hex.clone());
        }
        let mut failure = None;
        let hex = cell.get_or_init(|| match sha256_hex(&mut file) {
            Ok(hex) => hex,
            Err(error) => {
                failure = Some(error);
                String::new()
            }
        });
        if let Some(error) = failure {
            // Do not cache a failed read.
            self.cache.lock().remove(&version);
            return Err(error);
        }
        Ok(hex.clone())
    }
}

fn sha256_hex(file: &mut File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn digests_and_rehashes_on_change() {
        let digests = ExeDigests::default();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"abc").unwrap();
        let hex = digests.digest(File::open(f.path()).unwrap()).unwrap();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        f.write_all(b"d").unwrap();
        let hex2 = digests.digest(File::open(f.path()).unwrap()).unwrap();
        assert_eq!(
            hex2,
            "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
        );
    }
}
