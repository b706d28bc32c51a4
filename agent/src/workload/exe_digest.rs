//! SHA-256 of executables, cached by (device, inode, mtime, size) so a busy
//! host hashes each binary once, and a replaced binary is hashed again.
use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read},
    os::unix::fs::MetadataExt,
    sync::Mutex,
};

use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileVersion {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    size: u64,
}

#[derive(Debug, Default)]
pub struct ExeDigests {
    cache: Mutex<HashMap<FileVersion, String>>,
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
        if let Some(hex) = self.cache.lock().expect("digest cache").get(&version) {
            return Ok(hex.clone());
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let mut cache = self.cache.lock().expect("digest cache");
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(version, hex.clone());
        Ok(hex)
    }
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
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        f.write_all(b"d").unwrap();
        let hex2 = digests.digest(File::open(f.path()).unwrap()).unwrap();
        assert_eq!(hex2, "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589");
    }
}
