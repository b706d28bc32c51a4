//! The host key clients see: ed25519, its seed made at first start in
//! `state_dir` (0600), and the known_hosts lines that make clients trust it
//! for every SSH target.
use std::path::Path;

use russh::keys::{PrivateKey, ssh_key::private::Ed25519Keypair};

use crate::policy::{Policy, Protocol, TargetAddress};

/// The file under `state_dir` that holds the key's 32-byte seed.
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519.key";

pub fn load_or_create_host_key(state_dir: &Path) -> std::io::Result<PrivateKey> {
    let seed = crate::keyfile::load_or_create(&state_dir.join(HOST_KEY_FILE))?;
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
}

/// `known_hosts` lines for every SSH target, by name and address:
/// `host[,address] ssh-ed25519 AAAA...`, with `[host]:port` off port 22.
/// Addresses a host name resolves to are added when `resolve` gives them.
pub fn known_hosts_lines(
    policy: &Policy,
    key: &PrivateKey,
    resolve: impl Fn(&str, u16) -> Vec<std::net::IpAddr>,
) -> Vec<String> {
    let public = key
        .public_key()
        .to_openssh()
        .expect("an ed25519 key encodes");
    let public = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let name = |host: &str, port: u16| {
        if port == 22 {
            host.to_owned()
        } else {
            format!("[{host}]:{port}")
        }
    };
    policy
        .targets
        .iter()
        .filter(|t| t.protocol == Protocol::Ssh)
        .filter_map(|target| {
            let names = match &target.address {
                TargetAddress::Socket(addr) => vec![name(&addr.ip().to_string(), addr.port())],
                TargetAddress::Host(host, port) => std::iter::once(name(host, *port))
                    .chain(
                        resolve(host, *port)
                            .into_iter()
                            .map(|ip| name(&ip.to_string(), *port)),
                    )
                    .collect(),
                // A range has no one name: clients list its hosts
                // themselves (`@cert-authority` is not used).
                TargetAddress::Cidr(..) => return None,
            };
            Some(format!(
                "{} {public} interlock:{}",
                names.join(","),
                target.name
            ))
        })
        .collect()
}
