//! `interlock ca`: the local CA, put where the host's clients look.
//!
//! curl, Go, Python's `ssl` and other OpenSSL-based clients read the host's
//! trust store; `install` adds the CA there (Debian/Ubuntu and RHEL
//! layouts). Runtimes with bundles of their own (Python requests/certifi,
//! Node) read the variables `env` prints.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// A host's trust store: where anchors go, how the bundle is rebuilt, and
/// the bundle clients read.
#[derive(Debug, PartialEq, Eq)]
pub struct TrustStore {
    pub anchor: PathBuf,
    pub update: &'static [&'static str],
    pub bundle: &'static str,
}

const ANCHOR_NAME: &str = "interlock-local-ca";

impl TrustStore {
    /// The layout of the host whose root is `root`.
    pub fn of(root: &Path) -> Option<Self> {
        if root.join("usr/sbin/update-ca-certificates").exists() {
            Some(Self {
                anchor: root.join(format!("usr/local/share/ca-certificates/{ANCHOR_NAME}.crt")),
                update: &["update-ca-certificates", "--fresh"],
                bundle: "/etc/ssl/certs/ca-certificates.crt",
            })
        } else if root.join("usr/bin/update-ca-trust").exists() {
            Some(Self {
                anchor: root.join(format!("etc/pki/ca-trust/source/anchors/{ANCHOR_NAME}.pem")),
                update: &["update-ca-trust", "extract"],
                bundle: "/etc/pki/tls/certs/ca-bundle.crt",
            })
        } else {
            None
        }
    }

    fn here() -> Result<Self> {
        Self::of(Path::new("/")).context(
            "no trust store layout found (neither update-ca-certificates nor update-ca-trust); \
             add the CA by hand: interlock ca print",
        )
    }

    fn update(&self) -> Result<()> {
        let status = Command::new(self.update[0])
            .args(&self.update[1..])
            .stdout(std::process::Stdio::null())
            .status()
            .with_context(|| format!("running {}", self.update[0]))?;
        if !status.success() {
            bail!("{} failed ({status})", self.update.join(" "));
        }
        Ok(())
    }
}

/// Adds the CA (created now if the agent has not made it yet) to the
/// host's trust store.
pub fn install(config: &crate::config::Config) -> Result<()> {
    let state_dir = &config.agent.state_dir;
    let store = TrustStore::here()?;
    let scope = crate::tls::CaScope::of(config);
    crate::tls::LocalCa::load_or_create(&state_dir.join("ca"), &scope)?;
    let pem = crate::tls::LocalCa::read_cert(&state_dir.join("ca"))?;
    // At every agent start (the unit's ExecStartPost): nothing to do
    // unless the CA changed.
    if std::fs::read_to_string(&store.anchor).is_ok_and(|installed| installed == pem) {
        println!("{} is installed already", store.anchor.display());
        return Ok(());
    }
    if let Some(dir) = store.anchor.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&store.anchor, pem)
        .with_context(|| format!("writing {}", store.anchor.display()))?;
    store.update()?;
    println!(
        "installed {} into {} (clients read {})",
        store.anchor.display(),
        store.update[0],
        store.bundle
    );
    Ok(())
}

/// Takes the CA out of the host's trust store again.
pub fn uninstall() -> Result<()> {
    let store = TrustStore::here()?;
    match std::fs::remove_file(&store.anchor) {
        Ok(()) => store.update(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("removing {}", store.anchor.display())),
    }
}

/// The variables for runtimes with a bundle of their own, as `NAME=value`
/// lines (a systemd `EnvironmentFile=`, or `export $(interlock ca env)`).
pub fn env_lines(state_dir: &Path, store: Option<&TrustStore>) -> Vec<String> {
    let own = state_dir.join("ca").join("ca.pem").display().to_string();
    // The host's bundle holds the CA once installed, and the public CAs
    // besides; without a known layout, the CA alone.
    let bundle = store.map_or(own.clone(), |s| s.bundle.to_owned());
    vec![
        format!("SSL_CERT_FILE={bundle}"),
        format!("REQUESTS_CA_BUNDLE={bundle}"),
        format!("CURL_CA_BUNDLE={bundle}"),
        format!("NODE_EXTRA_CA_CERTS={own}"),
    ]
}

pub fn env(state_dir: &Path) {
    for line in env_lines(state_dir, TrustStore::of(Path::new("/")).as_ref()) {
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trust_store_layout_is_the_hosts() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(TrustStore::of(root.path()), None);
        std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
        std::fs::write(root.path().join("usr/bin/update-ca-trust"), "").unwrap();
        let rhel = TrustStore::of(root.path()).unwrap();
        assert!(
            rhel.anchor
                .ends_with("etc/pki/ca-trust/source/anchors/interlock-local-ca.pem")
        );
        std::fs::create_dir_all(root.path().join("usr/sbin")).unwrap();
        std::fs::write(root.path().join("usr/sbin/update-ca-certificates"), "").unwrap();
        let debian = TrustStore::of(root.path()).unwrap();
        assert_eq!(debian.bundle, "/etc/ssl/certs/ca-certificates.crt");
        let lines = env_lines(Path::new("/var/lib/interlock"), Some(&debian));
        assert!(lines.contains(&"REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt".into()));
        assert!(lines.contains(&"NODE_EXTRA_CA_CERTS=/var/lib/interlock/ca/ca.pem".into()));
        let alone = env_lines(Path::new("/s"), None);
        assert!(alone.contains(&"SSL_CERT_FILE=/s/ca/ca.pem".into()));
    }
}
