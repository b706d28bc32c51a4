//! Opaque TCP: connect upstream (exempted, so it is not redirected again)
//! and copy bytes both ways, passing each half-close on.
use std::{io, sync::atomic::Ordering};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

use crate::{
    access::{AccessRecord, outcome},
    addr::OrigDstAddr,
    intercept::Interception,
    sessions::{Event, Recorder},
};

const COPY_BUFFER: usize = 16 * 1024;
/// An upstream that does not answer a SYN in this long is reported as
/// unreachable rather than holding the client for the kernel's ~2 minutes.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn forward(
    mut client: TcpStream,
    dst: OrigDstAddr,
    kernel: &dyn Interception,
    record: &mut AccessRecord,
    recorder: &Recorder,
) {
    let mut upstream = match connect_upstream(dst, kernel).await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::warn!(%dst, %error, "upstream unreachable");
            record.finish(
                outcome::UPSTREAM_ERROR,
                Some(format!("connecting to {dst}: {error}")),
            );
            super::reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let bytes = record.bytes.clone();
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let result = tokio::try_join!(
        copy_half(&mut client_read, &mut upstream_write, &bytes.up, None),
        copy_half(
            &mut upstream_read,
            &mut client_write,
            &bytes.down,
            recorder.records_output().then_some(recorder),
        ),
    );
    match result {
        Ok(_) => record.finish(outcome::CLOSED, None),
        Err(error) => record.finish(outcome::ERROR, Some(error.to_string())),
    }
}

/// Opens the upstream connection. The socket's cookie is registered with
/// the kernel programs between `socket()` and `connect()`, which is what
/// lets it through un-redirected; nothing a workload can set does.
pub async fn connect_upstream(
    dst: OrigDstAddr,
    kernel: &dyn Interception,
) -> io::Result<TcpStream> {
    let socket = if dst.0.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let cookie = crate::intercept::socket_cookie(&socket)?;
    kernel.exempt(cookie)?;
    // Released however the connect ends, even if this future is dropped.
    let _exempt = Exempt { kernel, cookie };
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst.0))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer within 10 s"))?
}

struct Exempt<'a> {
    kernel: &'a dyn Interception,
    cookie: u64,
}

impl Drop for Exempt<'_> {
    fn drop(&mut self) {
        self.kernel.release(self.cookie);
    }
}

/// Copies until EOF, then shuts the writer down (half-close), counting
/// bytes and, with `record = "full"`, recording them.
pub(super) async fn copy_half<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &std::sync::atomic::AtomicU64,
    recorder: Option<&Recorder>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return writer.shutdown().await;
        }
        if let Some(recorder) = recorder {
            recorder
                .append(&Event::Output { data: &buf[..n] })
                .map_err(io::Error::other)?;
        }
        writer.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}
