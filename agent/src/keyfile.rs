//! Files the agent keeps secret in `state_dir`: the directory itself (0700)
//! and the key files in it (0600), both owned by the agent's user. Created
//! that way at first start, and refused afterwards if anyone else could
//! read them: a workload that can read `state_dir` reads every session.
use std::{
    fs,
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// Creates `dir` (0700) if it is missing, then checks it is the agent's own
/// and closed to group and others.
pub fn open_private_dir(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    check_private(dir, "0700")
}

/// Refuses a file or directory that group or others can use, or that
/// another user owns (who could loosen it, or swap what is in it).
pub fn check_private(path: &Path, wanted: &str) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    let invalid = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, why);
    if meta.file_type().is_symlink() {
        return Err(invalid(format!(
            "{} is a symbolic link; it must be the file itself",
            path.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(invalid(format!(
            "{} is open to group or others (mode {mode:04o}); make it {wanted} (chmod {wanted} {})",
            path.display(),
            path.display()
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(invalid(format!(
            "{} belongs to uid {}, not to the agent's uid {me}",
            path.display(),
            meta.uid()
        )));
    }
    Ok(())
}

/// A 32-byte key, created at first start with mode 0600.
pub fn load_or_create(path: &Path) -> io::Result<[u8; 32]> {
    match load(path) {
        Ok(key) => Ok(key),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(path),
        Err(e) => Err(e),
    }
}

/// A new random 32-byte key in a new file (0600); an existing file is
/// never overwritten.
pub fn create(path: &Path) -> io::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(&key)?;
    file.sync_all()?;
    Ok(key)
}

/// An existing key file, refused unless it is private (0600, ours).
pub fn load(path: &Path) -> io::Result<[u8; 32]> {
    let bytes = fs::read(path)?;
    check_private(path, "0600")?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} holds {} bytes, not 32", path.display(), b.len()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_and_keys_are_created_private_and_refused_when_looser() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        open_private_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let key_path = dir.join("k.key");
        let key = load_or_create(&key_path).unwrap();
        assert_eq!(
            fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_or_create(&key_path).unwrap(), key);

        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o640)).unwrap();
        let error = load_or_create(&key_path).unwrap_err().to_string();
        assert!(
            error.contains("mode 0640") && error.contains("chmod 0600"),
            "{error}"
        );

        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let error = open_private_dir(&dir).unwrap_err().to_string();
        assert!(error.contains("mode 0755"), "{error}");

        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(
            open_private_dir(&link).is_err(),
            "a link is not the directory"
        );
    }
}
