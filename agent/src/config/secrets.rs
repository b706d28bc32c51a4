//! Secret files: the credentials the agent holds for its targets, and its
//! own tokens. Each must be a regular file, owned by root, 0600.
use std::path::Path;

use super::{
    ConfigError,
    file::{self, Located, SourceFile},
};
use crate::policy::{Credential, Secret};

/// Reads a target's password file.
pub(super) fn read_credential(
    source: &SourceFile,
    spec: &Located<file::CredentialSpec>,
) -> Result<Credential, ConfigError> {
    let Some(file) = &spec.get_ref().password_file else {
        return Err(source.error_at(spec.span(), "a postgres credential needs password_file"));
    };
    let (path, at) = (file.get_ref(), file.span());
    let Some(user) = spec.get_ref().user.clone() else {
        return Err(source.error_at(spec.span(), "a postgres credential needs user"));
    };
    Ok(Credential {
        user,
        password: read_secret_file(source, path, at, "password_file")?,
    })
}

thread_local! {
    /// The uid that must own secret files: root, whom the agent runs as.
    /// Unit tests run unprivileged: theirs is the user running them.
    static SECRET_OWNER: u32 = if cfg!(test) {
        nix::unistd::geteuid().as_raw()
    } else {
        0
    };
}

/// Reads a secret from a file. It must be a regular file owned by root and
/// readable by its owner only (0600 or stricter); the secret itself is never
/// put in an error or a log.
pub(super) fn read_secret_file(
    source: &SourceFile,
    path: &Path,
    at: std::ops::Range<usize>,
    field: &str,
) -> Result<Secret, ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| source.error_at(at.clone(), format!("{field} {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(source.error_at(
            at,
            format!("{field} {} is not a regular file", path.display()),
        ));
    }
    if meta.mode() & 0o077 != 0 || meta.uid() != SECRET_OWNER.with(|owner| *owner) {
        return Err(source.error_at(
            at,
            format!(
                "{field} {} must be owned by root with mode 0600 (it is uid {}, mode {:04o})",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| source.error_at(at.clone(), format!("{field} {}: {e}", path.display())))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err(source.error_at(at, format!("{field} {} is empty", path.display())));
    }
    Ok(Secret::new(secret))
}
