//! Which socket is on the other end of an accepted connection: the kernel's
//! `sock_diag` answers with the client socket's cookie, the same number the
//! connect program stored in its record. Matching the two binds a record to
//! the socket that made it, not to an address a process can bind again.
use std::{io, net::SocketAddr};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// "No cookie": the kernel ignores the field in a request.
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// The cookie of the socket whose local end is `client` and whose remote end
/// is `listener`, in this network namespace, in any state (a client that
/// already closed is in `TIME_WAIT` and keeps its cookie). `None` when no
/// such socket exists any more.
pub fn client_cookie(client: SocketAddr, listener: SocketAddr) -> io::Result<Option<u64>> {
    // An IPv4 listener sees an IPv4-mapped client as plain IPv4.
    let (client, listener) = (
        crate::addr::canonical(client),
        crate::addr::canonical(listener),
    );
    let family = if client.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut header = NetlinkHeader::default();
    // An exact lookup, not a dump: one hash lookup in the kernel.
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: client.port(),
                destination_port: listener.port(),
                source_address: client.ip(),
                destination_address: listener.ip(),
                interface_id: 0,
                cookie: NO_COOKIE,
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = [0u8; 512];
    request.serialize(&mut buf[..request.buffer_len()]);

    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.send_to(&buf[..request.buffer_len()], &NetlinkAddr::new(0, 0), 0)?;
    let mut reply = Vec::with_capacity(1024);
    socket.recv(&mut reply, 0)?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&reply)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            let c = response.header.socket_id.cookie;
            let low = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            let high = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
            Ok(Some(u64::from(high) << 32 | u64::from(low)))
        }
        // ENOENT: the client socket is gone.
        NetlinkPayload::Error(error) if error.raw_code() == -libc::ENOENT => Ok(None),
        NetlinkPayload::Error(error) => Err(error.to_io()),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected sock_diag reply: {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket's cookie as the socket itself reports it (`SO_COOKIE`).
    fn own_cookie(socket: &std::net::TcpStream) -> u64 {
        super::super::socket_cookie(socket).unwrap()
    }

    #[test]
    fn finds_the_connecting_socket_and_only_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(listen).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(
            client_cookie(peer, listen).unwrap(),
            Some(own_cookie(&client))
        );
        // After the client closes, its TIME_WAIT keeps the cookie.
        let cookie = own_cookie(&client);
        drop(client);
        drop(_accepted);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let after = client_cookie(peer, listen).unwrap();
        assert!(after.is_none() || after == Some(cookie), "{after:?}");
        // No socket for this pair at all.
        let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(client_cookie(nowhere, listen).unwrap(), None);
    }
}
