//! Key files in `state_dir`: 32 random bytes, created at first start with
//! mode 0600 and refused afterwards if anyone but the owner can read them.
use std::{
    io::{self, Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

pub fn load_or_create(path: &Path) -> io::Result<[u8; 32]> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    match std::fs::read(path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(invalid(format!(
                    "{} must be readable by its owner only (mode {:04o}); make it 0600",
                    path.display(),
                    mode & 0o7777
                )));
            }
            bytes.try_into().map_err(|b: Vec<u8>| {
                invalid(format!(
                    "{} holds {} bytes, not 32",
                    path.display(),
                    b.len()
                ))
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            file.write_all(&key)?;
            file.sync_all()?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}
