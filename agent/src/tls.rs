//! TLS for clients that insist on it: a local CA, created once in
//! `state_dir/ca/` (key 0600), issues a certificate for whatever name the
//! client asked for (SNI) or, without SNI, for the original destination's
//! address. Hosts that want `verify-full` trust the CA (`interlock ca print`).
use std::{
    collections::HashMap,
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("local CA in {}: {cause}", dir.display())]
    Store { dir: PathBuf, cause: std::io::Error },
    #[error("local CA key {}: {cause}", path.display())]
    Key { path: PathBuf, cause: rcgen::Error },
    #[error("issuing a certificate for {name:?}: {cause}")]
    Issue { name: String, cause: rcgen::Error },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";

/// The host's local CA and the server configurations it has issued.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    configs: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl LocalCa {
    /// Loads the CA from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let store = |cause| TlsError::Store {
            dir: dir.to_owned(),
            cause,
        };
        let key_path = dir.join(CA_KEY);
        let key = if key_path.exists() {
            let pem = fs::read_to_string(&key_path).map_err(store)?;
            KeyPair::from_pem(&pem).map_err(|cause| TlsError::Key {
                path: key_path.clone(),
                cause,
            })?
        } else {
            fs::create_dir_all(dir).map_err(store)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(store)?;
            let key = KeyPair::generate().map_err(|cause| TlsError::Key {
                path: key_path.clone(),
                cause,
            })?;
            write_file(&key_path, key.serialize_pem().as_bytes(), 0o600).map_err(store)?;
            key
        };
        // The CA's parameters are a pure function of the host name, so the
        // issuer can be rebuilt from the key alone on every start.
        let params = ca_params();
        let cert_path = dir.join(CA_CERT);
        if !cert_path.exists() {
            let cert = params.self_signed(&key).map_err(|cause| TlsError::Key {
                path: key_path.clone(),
                cause,
            })?;
            write_file(&cert_path, cert.pem().as_bytes(), 0o644).map_err(store)?;
        }
        Ok(Self {
            issuer: Issuer::new(params, key),
            configs: Mutex::default(),
        })
    }

    /// The CA certificate of a state directory, without creating one.
    pub fn read_cert(dir: &Path) -> std::io::Result<String> {
        fs::read_to_string(dir.join(CA_CERT))
    }

    /// A server configuration whose certificate names `name`.
    fn config_for(&self, name: &str) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some(config) = self.configs.lock().expect("tls configs").get(name) {
            return Ok(config.clone());
        }
        let issue = |cause| TlsError::Issue {
            name: name.to_owned(),
            cause,
        };
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(issue)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(issue)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue)?;
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
        let config = Arc::new(config);
        let mut configs = self.configs.lock().expect("tls configs");
        if configs.len() > 1024 {
            configs.clear();
        }
        configs.insert(name.to_owned(), config.clone());
        Ok(config)
    }

    /// Completes a TLS handshake as the server the client meant to reach:
    /// the certificate names the client's SNI, or `fallback` (the original
    /// destination address) when it sent none.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        fallback: IpAddr,
    ) -> Result<TlsStream<TcpStream>, TlsError> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .map_err(TlsError::Handshake)?;
        let name = start
            .client_hello()
            .server_name()
            .map_or_else(|| fallback.to_string(), str::to_owned);
        let config = self.config_for(&name)?;
        start.into_stream(config).await.map_err(TlsError::Handshake)
    }
}

fn ca_params() -> CertificateParams {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("Interlock local CA {host}"));
    name.push(DnType::OrganizationName, "Interlock");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Writes a file created with `mode` (never briefly wider).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_created_once_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let first = LocalCa::load_or_create(&ca_dir).unwrap();
        let mode = fs::metadata(ca_dir.join(CA_KEY))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let pem = LocalCa::read_cert(&ca_dir).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let _again = LocalCa::load_or_create(&ca_dir).unwrap();
        assert_eq!(
            LocalCa::read_cert(&ca_dir).unwrap(),
            pem,
            "created once, then reused"
        );
        assert!(first.config_for("orders-db.internal").is_ok());
        assert!(first.config_for("10.1.2.3").is_ok());
    }
}
