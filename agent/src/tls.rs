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
    sync::{Arc, OnceLock},
};

use parking_lot::Mutex;

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
    configs: Mutex<HashMap<(String, Alpn), Arc<ServerConfig>>>,
}

/// The application protocols a handshake offers (ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// None: PostgreSQL's SSLRequest upgrade.
    None,
    /// HTTP/2, then HTTP/1.1.
    Http,
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
            crate::keyfile::check_private(&key_path, "0600").map_err(store)?;
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

    /// A server configuration whose certificate names `name` (a DNS name,
    /// or an IP address, which goes in an IP SAN).
    fn config_for(&self, name: &str, alpn: Alpn) -> Result<Arc<ServerConfig>, TlsError> {
        let cache_key = (name.to_owned(), alpn);
        if let Some(config) = self.configs.lock().get(&cache_key) {
            return Ok(config.clone());
        }
        let issue = |cause| TlsError::Issue {
            name: name.to_owned(),
            cause,
        };
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(issue)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        // Python 3.13's default context refuses a leaf without it.
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(issue)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue)?;
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
        if alpn == Alpn::Http {
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        }
        let config = Arc::new(config);
        let mut configs = self.configs.lock();
        if configs.len() > 1024 {
            configs.clear();
        }
        configs.insert(cache_key, config.clone());
        Ok(config)
    }

    /// Completes a TLS handshake as the server the client meant to reach:
    /// the certificate names the client's SNI, or `fallback` (the original
    /// destination address) when it sent none.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        fallback: IpAddr,
        alpn: Alpn,
    ) -> Result<TlsStream<TcpStream>, TlsError> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .map_err(TlsError::Handshake)?;
        let name = start
            .client_hello()
            .server_name()
            .map_or_else(|| fallback.to_string(), str::to_owned);
        let config = self.config_for(&name, alpn)?;
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
        assert!(first.config_for("orders-db.internal", Alpn::None).is_ok());
        assert!(first.config_for("10.1.2.3", Alpn::Http).is_ok());
    }
}

// === upstream ===

use crate::policy::UpstreamTls;

/// The system CA bundle on Debian and Ubuntu, used without `ca_file`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

type ConfigKey = (UpstreamTls, Option<PathBuf>);
static CLIENT_CONFIGS: OnceLock<Mutex<HashMap<ConfigKey, Arc<rustls::ClientConfig>>>> =
    OnceLock::new();

/// The client configuration for a TLS mode and CA file, built once.
pub fn upstream_config(
    mode: UpstreamTls,
    ca_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let key = (mode, ca_file.map(Path::to_owned));
    let cache = CLIENT_CONFIGS.get_or_init(Mutex::default);
    if let Some(config) = cache.lock().get(&key) {
        return Ok(config.clone());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match mode {
        UpstreamTls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptionOnly(provider)))
            .with_no_client_auth(),
        // Verify (`disable` never asks for a configuration).
        UpstreamTls::VerifyFull | UpstreamTls::Disable => {
            use rustls::pki_types::pem::PemObject;
            let path = ca_file.unwrap_or(Path::new(SYSTEM_CA_BUNDLE));
            let store = |cause| TlsError::Store {
                dir: path.to_owned(),
                cause,
            };
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| store(std::io::Error::other(e.to_string())))?;
            for cert in certs {
                let cert = cert.map_err(|e| store(std::io::Error::other(e.to_string())))?;
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    let config = Arc::new(config);
    cache.lock().insert(key, config.clone());
    Ok(config)
}

/// The client configuration for a TLS mode and CA file that presents a
/// client certificate, built once per identity.
pub fn upstream_config_with_identity(
    mode: UpstreamTls,
    ca_file: Option<&Path>,
    identity: &crate::policy::ClientIdentity,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    if let Some(config) = identity.config.get() {
        return Ok(config.clone());
    }
    let base = upstream_config(mode, ca_file)?;
    let mut config = rustls::ClientConfig::clone(&base);
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(identity.key.clone_key())?;
    config.client_auth_cert_resolver = Arc::new(SingleIdentity(Arc::new(
        rustls::sign::CertifiedKey::new(identity.chain.clone(), key),
    )));
    let config = Arc::new(config);
    Ok(identity.config.get_or_init(|| config).clone())
}

/// Presents one certificate to every server that asks for one.
#[derive(Debug)]
struct SingleIdentity(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for SingleIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `tls = "require"`: the channel is encrypted, the peer is not checked
/// (as libpq's sslmode=require). Signatures are still verified, so the
/// handshake itself is sound.
#[derive(Debug)]
struct EncryptionOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptionOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
