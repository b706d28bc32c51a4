//! TLS for clients that insist on it: a local CA, created once in
//! `state_dir/ca/` (key 0600), issues a certificate for whatever name the
//! client asked for (SNI) or, without SNI, for the original destination's
//! address. Hosts that want `verify-full` trust the CA (`interlock ca print`).
//! The CA is name-constrained to the protected targets' names and
//! addresses (and `ca_names`), so a client that checks constraints — all
//! of OpenSSL, Go, rustls and NSS do — trusts it for nothing else.
use std::{
    collections::{BTreeSet, HashMap},
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use parking_lot::Mutex;

use ipnet::IpNet;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints,
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
/// The names the certificate in `ca.pem` is constrained to, one a line:
/// when the wanted ones differ, the certificate is issued again.
const CA_SCOPE: &str = "ca.scope";

/// The host's local CA and the server configurations it has issued.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    scope: CaScope,
    reissued: bool,
    configs: Mutex<HashMap<(String, Alpn), Arc<ServerConfig>>>,
}

/// A name or address range the local CA may vouch for: a DNS name (and
/// the names under it) or an IP network.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CaName {
    Dns(String),
    Net(IpNet),
}

impl CaName {
    /// `api.internal` (and its subdomains), `10.0.0.5`, `10.0.0.0/8`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Self::Net(net.trunc()));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Self::Net(IpNet::from(ip)));
        }
        let name = text.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{text:?} is not a DNS name or an IP address or network (a name covers the \
                 names under it: no wildcards)"
            ));
        }
        Ok(Self::Dns(name))
    }

    fn covers(&self, name: &str) -> bool {
        match (self, name.parse::<IpAddr>()) {
            (Self::Net(net), Ok(ip)) => net.contains(&ip),
            (Self::Dns(dns), Err(_)) => {
                let name = name.trim_end_matches('.');
                name.eq_ignore_ascii_case(dns)
                    || (name.len() > dns.len()
                        && name.as_bytes()[name.len() - dns.len() - 1] == b'.'
                        && name[name.len() - dns.len()..].eq_ignore_ascii_case(dns))
            }
            _ => false,
        }
    }
}

impl serde::Serialize for CaName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl std::fmt::Display for CaName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dns(name) => f.write_str(name),
            Self::Net(net) => write!(f, "{net}"),
        }
    }
}

/// What the local CA may vouch for: every target's host name, address or
/// range, and `ca_names`. Nothing else.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaScope(BTreeSet<CaName>);

impl CaScope {
    pub fn of(config: &crate::config::Config) -> Self {
        use crate::policy::TargetAddress;
        let targets = config.policy.targets.iter().map(|t| match &t.address {
            TargetAddress::Socket(socket) => CaName::Net(IpNet::from(socket.ip())),
            TargetAddress::Cidr(net, _) => CaName::Net(net.trunc()),
            TargetAddress::Host(host, _) => {
                CaName::parse(host).unwrap_or_else(|_| CaName::Dns(host.to_ascii_lowercase()))
            }
        });
        Self(
            targets
                .chain(config.agent.ca_names.iter().cloned())
                .collect(),
        )
    }

    pub fn covers(&self, name: &str) -> bool {
        self.0.iter().any(|n| n.covers(name))
    }

    fn render(&self) -> String {
        self.0.iter().map(|n| format!("{n}\n")).collect()
    }

    /// Permitted: the scope. A kind of name the scope has none of (DNS
    /// names, IPv4, IPv6) is excluded whole, since a kind absent from the
    /// permitted subtrees would be unconstrained (RFC 5280 §4.2.1.10).
    fn constraints(&self) -> NameConstraints {
        let mut permitted = Vec::new();
        let (mut dns, mut v4, mut v6) = (false, false, false);
        for name in &self.0 {
            permitted.push(match name {
                CaName::Dns(d) => {
                    dns = true;
                    GeneralSubtree::DnsName(d.clone())
                }
                CaName::Net(net) => {
                    v4 |= net.addr().is_ipv4();
                    v6 |= net.addr().is_ipv6();
                    GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                        net.network(),
                        net.prefix_len(),
                    ))
                }
            });
        }
        let mut excluded = Vec::new();
        if !dns {
            // The empty name matches every name.
            excluded.push(GeneralSubtree::DnsName(String::new()));
        }
        if !v4 {
            excluded.push(GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])));
        }
        if !v6 {
            excluded.push(GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])));
        }
        NameConstraints {
            permitted_subtrees: permitted,
            excluded_subtrees: excluded,
        }
    }
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
    /// Loads the CA from `dir`, creating it on first start; its
    /// certificate is issued again (same key, same subject) when `scope`
    /// is not what it was issued for.
    pub fn load_or_create(dir: &Path, scope: &CaScope) -> Result<Self, TlsError> {
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
        // The CA's parameters are a pure function of the host name and the
        // scope, so the issuer can be rebuilt from the key alone.
        let params = ca_params(scope);
        let cert_path = dir.join(CA_CERT);
        let scope_path = dir.join(CA_SCOPE);
        let issued_for = fs::read_to_string(&scope_path).ok();
        let exists = cert_path.exists();
        let reissued = exists && issued_for.as_deref() != Some(scope.render().as_str());
        if !exists || reissued {
            let cert = params.self_signed(&key).map_err(|cause| TlsError::Key {
                path: key_path.clone(),
                cause,
            })?;
            // The new certificate replaces the old one whole, or not at all.
            let fresh = dir.join(format!("{CA_CERT}.new"));
            let _ = fs::remove_file(&fresh);
            write_file(&fresh, cert.pem().as_bytes(), 0o644).map_err(store)?;
            let scope_fresh = dir.join(format!("{CA_SCOPE}.new"));
            let _ = fs::remove_file(&scope_fresh);
            write_file(&scope_fresh, scope.render().as_bytes(), 0o644).map_err(store)?;
            fs::rename(&fresh, &cert_path).map_err(store)?;
            fs::rename(&scope_fresh, &scope_path).map_err(store)?;
        }
        Ok(Self {
            issuer: Issuer::new(params, key),
            scope: scope.clone(),
            reissued,
            configs: Mutex::default(),
        })
    }

    /// Whether loading issued the certificate again (its names changed):
    /// hosts that installed the old one must install it again.
    pub fn reissued(&self) -> bool {
        self.reissued
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
        if !self.scope.covers(name) {
            tracing::warn!(
                name,
                "a client asked for a name the local CA is not constrained to: it will refuse \
                 the certificate; add the name to [agent] ca_names"
            );
        }
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(issue)?;
        // An address goes in the IP SAN only: a common name of digits and
        // dots would be checked as a DNS name against the constraints.
        let common_name = if name.parse::<IpAddr>().is_ok() {
            "Interlock"
        } else {
            name
        };
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
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

fn ca_params(scope: &CaScope) -> CertificateParams {
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
    params.name_constraints = Some(scope.constraints());
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
        let scope = CaScope(
            ["orders-db.internal", "10.1.2.3"]
                .into_iter()
                .map(|n| CaName::parse(n).unwrap())
                .collect(),
        );
        let first = LocalCa::load_or_create(&ca_dir, &scope).unwrap();
        assert!(!first.reissued());
        let mode = fs::metadata(ca_dir.join(CA_KEY))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let pem = LocalCa::read_cert(&ca_dir).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let again = LocalCa::load_or_create(&ca_dir, &scope).unwrap();
        assert!(!again.reissued());
        assert_eq!(
            LocalCa::read_cert(&ca_dir).unwrap(),
            pem,
            "created once, then reused"
        );
        assert!(first.config_for("orders-db.internal", Alpn::None).is_ok());
        assert!(first.config_for("10.1.2.3", Alpn::Http).is_ok());
        // Another target: the same key, a certificate for the new names.
        let key = fs::read(ca_dir.join(CA_KEY)).unwrap();
        let mut wider = scope.clone();
        wider.0.insert(CaName::parse("10.9.0.0/16").unwrap());
        let third = LocalCa::load_or_create(&ca_dir, &wider).unwrap();
        assert!(third.reissued());
        assert_ne!(LocalCa::read_cert(&ca_dir).unwrap(), pem);
        assert_eq!(fs::read(ca_dir.join(CA_KEY)).unwrap(), key);
    }

    #[test]
    fn the_scope_covers_its_names_their_subdomains_and_its_networks() {
        let scope = CaScope(
            ["api.internal", "10.0.0.0/8", "::1", "10.1.2.3"]
                .into_iter()
                .map(|n| CaName::parse(n).unwrap())
                .collect(),
        );
        for name in [
            "api.internal",
            "API.Internal.",
            "eu.api.internal",
            "10.200.1.1",
            "::1",
        ] {
            assert!(scope.covers(name), "{name}");
        }
        for name in [
            "xapi.internal",
            "internal",
            "api.internal.evil",
            "11.0.0.1",
            "::2",
        ] {
            assert!(!scope.covers(name), "{name}");
        }
        for bad in ["*.api.internal", "", "a..b", "-a.b", "a b"] {
            assert!(CaName::parse(bad).is_err(), "{bad:?}");
        }
        // A kind of name with nothing permitted is excluded whole.
        let constraints = scope.constraints();
        assert_eq!(constraints.permitted_subtrees.len(), 4);
        assert_eq!(constraints.excluded_subtrees.len(), 0);
        let addresses_only = CaScope([CaName::parse("10.1.2.3").unwrap()].into());
        assert_eq!(addresses_only.constraints().excluded_subtrees.len(), 2);
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

/// An HTTP target's client configurations, each built once: offering
/// HTTP/2 and HTTP/1.1 by ALPN, or HTTP/1.1 alone (upgrades, HTTP/1.1
/// clients).
#[derive(Clone, Debug)]
pub struct HttpClientConfigs {
    pub any: Arc<rustls::ClientConfig>,
    pub http1: Arc<rustls::ClientConfig>,
}

impl HttpClientConfigs {
    fn of(base: &rustls::ClientConfig) -> Self {
        let offering = |protocols: &[&[u8]]| {
            let mut config = base.clone();
            config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
            Arc::new(config)
        };
        Self {
            any: offering(&[b"h2", b"http/1.1"]),
            http1: offering(&[b"http/1.1"]),
        }
    }
}

static HTTP_CLIENT_CONFIGS: OnceLock<Mutex<HashMap<ConfigKey, HttpClientConfigs>>> =
    OnceLock::new();

/// An HTTP target's client configurations for a TLS mode and CA file,
/// presenting `identity`'s certificate if it has one; built once (with
/// an identity, once per policy load).
pub fn upstream_http_configs(
    mode: UpstreamTls,
    ca_file: Option<&Path>,
    identity: Option<&crate::policy::ClientIdentity>,
) -> Result<HttpClientConfigs, TlsError> {
    if let Some(identity) = identity {
        if let Some(configs) = identity.config.get() {
            return Ok(configs.clone());
        }
        let base = with_identity(&*upstream_config(mode, ca_file)?, identity)?;
        return Ok(identity
            .config
            .get_or_init(|| HttpClientConfigs::of(&base))
            .clone());
    }
    let key = (mode, ca_file.map(Path::to_owned));
    let cache = HTTP_CLIENT_CONFIGS.get_or_init(Mutex::default);
    if let Some(configs) = cache.lock().get(&key) {
        return Ok(configs.clone());
    }
    let configs = HttpClientConfigs::of(&*upstream_config(mode, ca_file)?);
    cache.lock().insert(key, configs.clone());
    Ok(configs)
}

/// `base`, presenting a client certificate.
fn with_identity(
    base: &rustls::ClientConfig,
    identity: &crate::policy::ClientIdentity,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = base.clone();
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(identity.key.clone_key())?;
    config.client_auth_cert_resolver = Arc::new(SingleIdentity(Arc::new(
        rustls::sign::CertifiedKey::new(identity.chain.clone(), key),
    )));
    Ok(config)
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
