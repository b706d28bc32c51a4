//! Newtype addresses, so the three addresses of an intercepted connection
//! can never be mixed up.
use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use interlock_common::PeerKey;

/// Where the client was going before the kernel redirected it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct OrigDstAddr(pub SocketAddr);

/// The client's end of an accepted connection (the listener's peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ClientAddr(pub SocketAddr);

/// An address the agent listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ListenAddr(pub SocketAddr);

/// Unwraps IPv4-mapped IPv6 addresses, so `::ffff:10.0.0.1` and `10.0.0.1`
/// are one destination everywhere in user space.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The 16-byte form the kernel tables use (IPv4 is IPv4-mapped).
pub fn ip_to_kernel(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`ip_to_kernel`], unwrapping IPv4-mapped addresses.
pub fn ip_from_kernel(bytes: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(bytes).to_canonical()
}

impl ClientAddr {
    pub fn peer_key(self) -> PeerKey {
        PeerKey {
            addr: ip_to_kernel(self.0.ip()),
            port: self.0.port(),
            _pad: [0; 2],
        }
    }
}

impl fmt::Display for OrigDstAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_and_plain_ipv4_are_one_key() {
        let plain: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:4000".parse().unwrap();
        assert_eq!(ClientAddr(plain).peer_key(), ClientAddr(mapped).peer_key());
        assert_eq!(canonical(mapped), plain);
        assert_eq!(ip_from_kernel(ip_to_kernel(plain.ip())), plain.ip());
    }
}
