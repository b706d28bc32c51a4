//! Protected targets and the table that maps a destination to one.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use interlock_common::{IPV4_MAPPED_PREFIX_BITS, PORT_PREFIX_BITS, TargetKey};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::addr::{canonical, ip_to_kernel};

/// Index of a target in `Policy::targets`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetId(pub usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP: connection-level policy, bytes copied as they are.
    Tcp,
    /// PostgreSQL: every statement decided, the credential held by the agent.
    Postgres,
    /// SSH: every channel request decided, the key held by the agent.
    Ssh,
    /// HTTP/1.1 and HTTP/2: every request decided, the token held by the
    /// agent.
    Http,
    /// The Kubernetes API: an HTTP target whose requests are also read as
    /// kube-apiserver reads them (verb, resource, namespace, name).
    Kubernetes,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Postgres => "postgres",
            Protocol::Ssh => "ssh",
            Protocol::Http => "http",
            Protocol::Kubernetes => "kubernetes",
        }
    }
}

/// How the agent secures its connection to a target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    /// TLS, with the server's certificate checked against the trusted CAs
    /// and the target's name.
    #[default]
    VerifyFull,
    /// TLS without checking the certificate (encryption only).
    Require,
    /// Plain TCP.
    Disable,
}

#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    pub protocol: Protocol,
    pub address: TargetAddress,
    /// What the agent logs in upstream with (never the client's).
    pub credential: Option<Credential>,
    /// How the upstream connection is secured (SQL targets).
    pub tls: UpstreamTls,
    /// CAs trusted for `verify-full` (default: the system bundle).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// SQL targets: values every workload sees masked.
    pub masks: Vec<super::Mask>,
    /// What its sessions record.
    pub record: RecordMode,
    /// SSH targets: how the agent logs in and checks the server.
    pub ssh: Option<std::sync::Arc<SshUpstream>>,
    /// HTTP targets: what the agent adds to every request.
    pub http: Option<std::sync::Arc<HttpCredential>>,
    /// HTTP targets: the client certificate the agent presents upstream
    /// (a Kubernetes API server's client-certificate authentication).
    pub client_identity: Option<std::sync::Arc<ClientIdentity>>,
}

/// A client certificate chain and its key, and the TLS configuration made
/// from them once it is first needed.
pub struct ClientIdentity {
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
    pub config: std::sync::OnceLock<crate::tls::HttpClientConfigs>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The header an HTTP target's requests carry (never the client's):
/// `Authorization: Bearer …`, `Authorization: Basic …`, or one of the
/// target's naming (`X-Api-Key: …`). The value is marked sensitive:
/// HTTP/2 never indexes it.
pub struct HttpCredential {
    pub name: http::HeaderName,
    pub value: http::HeaderValue,
    /// The secret part of the value (the token, the encoded user and
    /// password): a response that echoes it gets it blanked out.
    pub secret: std::sync::Arc<[u8]>,
}

impl HttpCredential {
    /// `value` is sent; `secret`, a part of it, is what must never come
    /// back to the client.
    fn with_secret(name: http::HeaderName, value: &str, secret: &str) -> Result<Self, String> {
        let mut value = http::HeaderValue::from_str(value)
            .map_err(|_| "the value is not a valid header value".to_owned())?;
        value.set_sensitive(true);
        Ok(Self {
            name,
            value,
            secret: secret.as_bytes().into(),
        })
    }

    pub fn header(name: http::HeaderName, value: &str) -> Result<Self, String> {
        Self::with_secret(name, value, value)
    }

    pub fn bearer(token: &str) -> Result<Self, String> {
        Self::with_secret(
            http::header::AUTHORIZATION,
            &format!("Bearer {token}"),
            token,
        )
    }

    pub fn basic(user: &str, password: &str) -> Result<Self, String> {
        use base64::Engine;
        let pair = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Self::with_secret(http::header::AUTHORIZATION, &format!("Basic {pair}"), &pair)
    }
}

impl fmt::Debug for HttpCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Header({}: ****)", self.name)
    }
}

/// The upstream side of an SSH target.
#[derive(Debug)]
pub struct SshUpstream {
    pub user: String,
    pub auth: SshAuth,
    pub host_key: HostKeyCheck,
}

/// The credential the agent logs in with (never the client's).
pub enum SshAuth {
    Key {
        key: std::sync::Arc<russh::keys::PrivateKey>,
        /// An OpenSSH certificate for that key.
        certificate: Option<Box<russh::keys::Certificate>>,
    },
    Password(Secret),
}

impl fmt::Debug for SshAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SshAuth::Key { certificate, .. } => f
                .debug_struct("Key")
                .field("certificate", &certificate.is_some())
                .finish_non_exhaustive(),
            SshAuth::Password(_) => f.write_str("Password(****)"),
        }
    }
}

/// How the upstream server's host key is checked: there is no trust on
/// first use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// An OpenSSH known_hosts file, read at each connection.
    KnownHosts(std::path::PathBuf),
    /// A pinned `SHA256:...` fingerprint, as `ssh-keygen -l` prints it.
    Fingerprint(String),
}

/// `record = "commands"` (the default): decisions, statements and their
/// results; `"full"` adds the bytes the server sent the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordMode {
    #[default]
    Commands,
    Full,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub user: String,
    pub password: Secret,
}

/// A secret value: never printed, whatever prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

/// How a target's destination is written in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetAddress {
    /// `10.1.2.3:7000`, `[2001:db8::1]:7000`
    Socket(SocketAddr),
    /// `10.1.0.0/16:7000`, `[2001:db8::/32]:7000`
    Cidr(IpNet, u16),
    /// `cache.internal:7000`: resolved at load, re-resolved periodically.
    Host(String, u16),
}

impl TargetAddress {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(socket) = text.parse::<SocketAddr>() {
            if socket.port() == 0 {
                return Err("port 0 cannot be protected".into());
            }
            return Ok(Self::Socket(canonical(socket)));
        }
        let (host, port) = text.rsplit_once(':').ok_or_else(|| {
            format!("{text:?} has no port (expected host:port, ip:port or cidr:port)")
        })?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{port:?} is not a port number (0-65535)"))?;
        if port == 0 {
            return Err("port 0 cannot be protected".into());
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.contains('/') {
            let net: IpNet = host
                .parse()
                .map_err(|e| format!("{host:?} is not a CIDR block: {e}"))?;
            return Ok(Self::Cidr(net.trunc(), port));
        }
        if host.parse::<IpAddr>().is_ok() || host.is_empty() || host.contains(char::is_whitespace) {
            return Err(format!("{text:?} is not a valid address"));
        }
        Ok(Self::Host(host.to_owned(), port))
    }
}

impl fmt::Display for TargetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Socket(s) => s.fmt(f),
            Self::Cidr(IpNet::V6(net), port) => write!(f, "[{net}]:{port}"),
            Self::Cidr(net, port) => write!(f, "{net}:{port}"),
            Self::Host(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

/// The resolved destinations of every target: what goes into the kernel's
/// LPM trie, and the same longest-prefix lookup in user space.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetTable {
    entries: Vec<TableEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct TableEntry {
    net: IpNet,
    port: u16,
    target: TargetId,
}

impl TargetTable {
    /// Builds the table from the targets and the addresses their host names
    /// resolved to (`resolve` is given each `Host` target; the caller owns I/O).
    pub fn build(targets: &[Target], mut resolve: impl FnMut(&str, u16) -> Vec<IpAddr>) -> Self {
        let mut entries = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let id = TargetId(i);
            match &target.address {
                TargetAddress::Socket(s) => entries.push(TableEntry {
                    net: IpNet::from(s.ip()),
                    port: s.port(),
                    target: id,
                }),
                TargetAddress::Cidr(net, port) => entries.push(TableEntry {
                    net: *net,
                    port: *port,
                    target: id,
                }),
                TargetAddress::Host(host, port) => {
                    for ip in resolve(host, *port) {
                        entries.push(TableEntry {
                            net: IpNet::from(ip.to_canonical()),
                            port: *port,
                            target: id,
                        });
                    }
                }
            }
        }
        Self { entries }
    }

    /// The target a destination belongs to: the longest matching prefix
    /// wins, as in the kernel's trie; on a tie the first target written wins.
    pub fn lookup(&self, dst: SocketAddr) -> Option<TargetId> {
        let dst = canonical(dst);
        self.entries
            .iter()
            .filter(|e| e.port == dst.port() && e.net.contains(&dst.ip()))
            .max_by_key(|e| (e.net.prefix_len(), std::cmp::Reverse(e.target.0)))
            .map(|e| e.target)
    }

    /// `(prefix length, key)` pairs for the kernel's LPM trie.
    pub fn kernel_keys(&self) -> Vec<(u32, TargetKey)> {
        let mut keys: Vec<(u32, TargetKey)> = self
            .entries
            .iter()
            .map(|e| {
                let family_bits = match e.net {
                    IpNet::V4(_) => IPV4_MAPPED_PREFIX_BITS,
                    IpNet::V6(_) => 0,
                };
                let prefix = PORT_PREFIX_BITS + family_bits + u32::from(e.net.prefix_len());
                let key = TargetKey {
                    port: e.port.to_be_bytes(),
                    addr: ip_to_kernel(e.net.network()),
                };
                (prefix, key)
            })
            .collect();
        keys.sort_by_key(|(p, k)| (*p, k.port, k.addr));
        keys.dedup();
        keys
    }

    /// Destinations of one target, for status output.
    pub fn destinations(&self, target: TargetId) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.target == target)
            .map(|e| match e.net {
                IpNet::V6(net) => format!("[{net}]:{}", e.port),
                net => format!("{net}:{}", e.port),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, address: &str) -> Target {
        Target {
            name: name.into(),
            protocol: Protocol::Tcp,
            address: TargetAddress::parse(address).unwrap(),
            credential: None,
            tls: UpstreamTls::Disable,
            tls_ca_file: None,
            masks: Vec::new(),
            record: RecordMode::Commands,
            ssh: None,
            http: None,
            client_identity: None,
        }
    }

    #[test]
    fn parses_every_address_form() {
        let cases = [
            ("10.1.2.3:7000", "10.1.2.3:7000"),
            ("[2001:db8::1]:7000", "[2001:db8::1]:7000"),
            ("[::ffff:10.1.2.3]:7000", "10.1.2.3:7000"),
            ("10.1.0.0/16:7000", "10.1.0.0/16:7000"),
            ("10.1.2.3/16:7000", "10.1.0.0/16:7000"),
            ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
            ("cache.internal:7000", "cache.internal:7000"),
        ];
        for (input, shown) in cases {
            assert_eq!(
                TargetAddress::parse(input).unwrap().to_string(),
                shown,
                "{input}"
            );
        }
        for bad in [
            "10.1.2.3",
            "10.1.2.3:http",
            "10.1.0.0/33:1",
            ":80",
            "10.0.0.1:0",
            "1.2.3.4:99999",
        ] {
            assert!(
                TargetAddress::parse(bad).is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn longest_prefix_wins_and_ports_must_match() {
        let targets = [
            target("net", "10.1.0.0/16:7000"),
            target("host", "10.1.2.3:7000"),
            target("named", "cache.internal:7000"),
        ];
        let table = TargetTable::build(&targets, |host, _| {
            assert_eq!(host, "cache.internal");
            vec!["10.9.9.9".parse().unwrap()]
        });
        let at = |s: &str| table.lookup(s.parse().unwrap());
        assert_eq!(at("10.1.2.3:7000"), Some(TargetId(1)));
        assert_eq!(at("10.1.7.7:7000"), Some(TargetId(0)));
        assert_eq!(at("[::ffff:10.1.7.7]:7000"), Some(TargetId(0)));
        assert_eq!(at("10.9.9.9:7000"), Some(TargetId(2)));
        assert_eq!(at("10.1.2.3:7001"), None);
        assert_eq!(at("10.2.0.1:7000"), None);
    }

    #[test]
    fn kernel_keys_use_mapped_prefixes() {
        let targets = [target("a", "10.1.0.0/16:7000"), target("b", "[::1]:22")];
        let keys = TargetTable::build(&targets, |_, _| vec![]).kernel_keys();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].0, 16 + 96 + 16);
        assert_eq!(keys[0].1.port, 7000u16.to_be_bytes());
        assert_eq!(&keys[0].1.addr[10..14], &[0xff, 0xff, 10, 1]);
        assert_eq!(keys[1].0, 16 + 128);
    }
}
