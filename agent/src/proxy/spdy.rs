//! Reading SPDY/3.1 off a relayed stream: the framing a Kubernetes
//! port-forward rides on (`Upgrade: SPDY/3.1`, or tunnelled in WebSocket
//! binary messages as `SPDY/3.1+portforward.k8s.io`). For each forwarded
//! connection the client opens two streams, with headers `streamtype`
//! (`error` or `data`), `port` and `requestid`; [`Forwards`] follows both
//! directions and says, as each connection ends, its port and the bytes it
//! carried each way, so a port-forward is recorded connection by
//! connection.
//!
//! The reader holds a frame's 8-byte header and at most one control frame
//! ([`MAX_CONTROL`] bytes), never a data frame's payload, whatever its
//! size. Header blocks are inflated with the one zlib context of their
//! direction, as SPDY requires, so every block is read, whatever it opens.

use std::collections::HashMap;

use flate2::{Decompress, FlushDecompress};

/// The zlib dictionary SPDY/3 header blocks are compressed with (SPDY/3
/// draft, §2.6.10.1): 1423 bytes, as every SPDY/3 implementation has them.
const DICTIONARY: &[u8] = include_bytes!("spdy3.dict");

/// The largest control frame read: port-forward's are a few dozen bytes.
pub const MAX_CONTROL: usize = 64 * 1024;
/// The largest header block once inflated, and the most headers in one.
const MAX_HEADERS: usize = 64 * 1024;
const MAX_HEADER_COUNT: u32 = 256;
/// The most streams open at once on one port-forward.
const MAX_STREAMS: usize = 4096;
/// The most of an error stream's message kept.
const MAX_MESSAGE: usize = 1024;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const HEADERS: u16 = 8;
const FLAG_FIN: u8 = 1;

/// What a direction of a SPDY connection carried, frame by frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A stream opened (SYN_STREAM), with its headers.
    Opened {
        stream: u32,
        headers: Vec<(String, String)>,
    },
    /// Bytes of a stream.
    Data { stream: u32, bytes: &'a [u8] },
    /// The sender's last frame on a stream (FIN).
    Finished { stream: u32 },
    /// The sender reset a stream.
    Reset { stream: u32 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpdyError {
    #[error("a SPDY control frame of version {0} (3 is spoken)")]
    Version(u16),
    #[error("a SPDY control frame of {0} bytes (at most {MAX_CONTROL})")]
    ControlTooLong(usize),
    #[error("a SPDY control frame too short for its type")]
    ControlTooShort,
    #[error("a SPDY header block that does not inflate")]
    Compression,
    #[error("a SPDY header block that does not parse")]
    HeaderBlock,
    #[error("more than {MAX_STREAMS} SPDY streams open at once")]
    TooManyStreams,
}

enum Frame {
    Data { stream: u32, fin: bool },
    Control { kind: u16, flags: u8 },
}

/// Follows one direction of a SPDY connection.
pub struct SpdyReader {
    head: [u8; 8],
    have: usize,
    /// The frame being read and its bytes still to come.
    frame: Option<Frame>,
    remaining: usize,
    control: Vec<u8>,
    inflate: Decompress,
}

impl Default for SpdyReader {
    fn default() -> Self {
        Self {
            head: [0; 8],
            have: 0,
            frame: None,
            remaining: 0,
            control: Vec::new(),
            inflate: Decompress::new(true),
        }
    }
}

impl SpdyReader {
    /// Reads the next bytes of the direction; `on` gets what they carry.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        on: &mut impl FnMut(Piece<'_>),
    ) -> Result<(), SpdyError> {
        loop {
            if self.frame.is_none() {
                let take = (8 - self.have).min(data.len());
                self.head[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have < 8 {
                    return Ok(());
                }
                self.have = 0;
                self.start_frame()?;
            } else {
                let take = self.remaining.min(data.len());
                let (bytes, rest) = data.split_at(take);
                data = rest;
                self.remaining -= take;
                match self.frame {
                    Some(Frame::Data { stream, .. }) if !bytes.is_empty() => {
                        on(Piece::Data { stream, bytes })
                    }
                    Some(Frame::Control { .. }) => self.control.extend_from_slice(bytes),
                    _ => {}
                }
            }
            if self.frame.is_some() && self.remaining == 0 {
                self.end_frame(on)?;
            }
            if data.is_empty() && (self.frame.is_none() || self.remaining > 0) {
                return Ok(());
            }
        }
    }

    fn start_frame(&mut self) -> Result<(), SpdyError> {
        let head = self.head;
        let length = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let flags = head[4];
        self.remaining = length;
        self.frame = Some(if head[0] & 0x80 != 0 {
            let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
            if version != 3 {
                return Err(SpdyError::Version(version));
            }
            if length > MAX_CONTROL {
                return Err(SpdyError::ControlTooLong(length));
            }
            self.control.clear();
            Frame::Control {
                kind: u16::from_be_bytes([head[2], head[3]]),
                flags,
            }
        } else {
            Frame::Data {
                stream: stream_id(&head[..4]),
                fin: flags & FLAG_FIN != 0,
            }
        });
        Ok(())
    }

    fn end_frame(&mut self, on: &mut impl FnMut(Piece<'_>)) -> Result<(), SpdyError> {
        match self.frame.take() {
            Some(Frame::Data { stream, fin: true }) => on(Piece::Finished { stream }),
            Some(Frame::Control { kind, flags }) => {
                let control = std::mem::take(&mut self.control);
                let read = self.control_frame(kind, flags, &control, on);
                self.control = control;
                self.control.clear();
                read?;
            }
            _ => {}
        }
        Ok(())
    }

    fn control_frame(
        &mut self,
        kind: u16,
        flags: u8,
        body: &[u8],
        on: &mut impl FnMut(Piece<'_>),
    ) -> Result<(), SpdyError> {
        // Where each kind's header block starts; the others carry none.
        let block_at = match kind {
            SYN_STREAM => 10,
            SYN_REPLY | HEADERS => 4,
            RST_STREAM => 8,
            _ => return Ok(()),
        };
        if body.len() < block_at {
            return Err(SpdyError::ControlTooShort);
        }
        let stream = stream_id(&body[..4]);
        if kind == RST_STREAM {
            on(Piece::Reset { stream });
            return Ok(());
        }
        let block = self.inflated(&body[block_at..])?;
        if kind == SYN_STREAM {
            on(Piece::Opened {
                stream,
                headers: header_block(&block)?,
            });
        }
        if flags & FLAG_FIN != 0 {
            on(Piece::Finished { stream });
        }
        Ok(())
    }

    /// A header block, inflated in the direction's zlib context.
    fn inflated(&mut self, mut block: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity(256);
        loop {
            let (before, had) = (self.inflate.total_in(), out.len());
            let result = self
                .inflate
                .decompress_vec(block, &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - before) as usize;
            block = &block[used..];
            match result {
                // The direction's zlib stream has ended: no block after
                // this one can be read.
                Ok(flate2::Status::StreamEnd) if !block.is_empty() => {
                    return Err(SpdyError::Compression);
                }
                // Room to write and nothing taken or given: it is stuck.
                Ok(_) if used == 0 && out.len() == had && out.len() < out.capacity() => {
                    return Err(SpdyError::Compression);
                }
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(DICTIONARY)
                        .map_err(|_| SpdyError::Compression)?;
                    continue;
                }
                Err(_) => return Err(SpdyError::Compression),
            }
            if block.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
            if out.len() >= MAX_HEADERS {
                return Err(SpdyError::HeaderBlock);
            }
            out.reserve(out.capacity());
        }
    }
}

fn stream_id(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().expect("4 bytes")) & 0x7fff_ffff
}

/// A SPDY/3 name/value block: a count, then each name and value with
/// its 32-bit length.
fn header_block(mut block: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
    let word = |block: &mut &[u8]| -> Result<u32, SpdyError> {
        let (bytes, rest) = block
            .split_first_chunk::<4>()
            .ok_or(SpdyError::HeaderBlock)?;
        *block = rest;
        Ok(u32::from_be_bytes(*bytes))
    };
    let count = word(&mut block)?;
    if count > MAX_HEADER_COUNT {
        return Err(SpdyError::HeaderBlock);
    }
    let mut headers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let text = |block: &mut &[u8]| -> Result<String, SpdyError> {
            let length = word(block)? as usize;
            if block.len() < length {
                return Err(SpdyError::HeaderBlock);
            }
            let (text, rest) = block.split_at(length);
            *block = rest;
            Ok(String::from_utf8_lossy(text).into_owned())
        };
        let name = text(&mut block)?;
        let value = text(&mut block)?;
        headers.push((name, value));
    }
    Ok(headers)
}

/// One forwarded connection, as it ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Forwarded {
    /// The pod's port, as the client asked for it.
    pub port: Option<u16>,
    /// The client's number for the connection (`requestid`).
    pub request: Option<String>,
    /// Bytes from the client, and from the pod.
    pub up: u64,
    pub down: u64,
    /// What the server said on the connection's error stream.
    pub error: Option<String>,
}

#[derive(Default)]
struct Stream {
    error_stream: bool,
    port: Option<u16>,
    request: Option<String>,
    up: u64,
    down: u64,
    client_done: bool,
    server_done: bool,
    message: Vec<u8>,
}

/// Which side of the connection a piece came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// The connections of one port-forward, from both directions' pieces.
#[derive(Default)]
pub struct Forwards {
    streams: HashMap<u32, Stream>,
    /// Error streams' messages by `requestid`, until their connection ends.
    errors: HashMap<String, Vec<u8>>,
}

impl Forwards {
    /// Takes a piece from `side`; a connection that ends with it is
    /// returned.
    pub fn piece(&mut self, side: Side, piece: Piece<'_>) -> Result<Option<Forwarded>, SpdyError> {
        let stream = match piece {
            Piece::Opened { stream, headers } => {
                if self.streams.len() >= MAX_STREAMS {
                    return Err(SpdyError::TooManyStreams);
                }
                let header = |name: &str| {
                    headers
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.as_str())
                };
                self.streams.insert(
                    stream,
                    Stream {
                        error_stream: header("streamtype") == Some("error"),
                        port: header("port").and_then(|p| p.parse().ok()),
                        request: header("requestid").map(str::to_owned),
                        ..Stream::default()
                    },
                );
                return Ok(None);
            }
            Piece::Data { stream, bytes } => {
                let Some(open) = self.streams.get_mut(&stream) else {
                    return Ok(None);
                };
                match side {
                    Side::Client => open.up += bytes.len() as u64,
                    Side::Server => open.down += bytes.len() as u64,
                }
                if open.error_stream && side == Side::Server {
                    let room = MAX_MESSAGE.saturating_sub(open.message.len());
                    open.message
                        .extend_from_slice(&bytes[..bytes.len().min(room)]);
                }
                return Ok(None);
            }
            Piece::Finished { stream } => {
                let Some(open) = self.streams.get_mut(&stream) else {
                    return Ok(None);
                };
                match side {
                    Side::Client => open.client_done = true,
                    Side::Server => open.server_done = true,
                }
                if !(open.client_done && open.server_done) {
                    return Ok(None);
                }
                stream
            }
            Piece::Reset { stream } => stream,
        };
        Ok(self.streams.remove(&stream).and_then(|s| self.ended(s)))
    }

    /// The connections still open when the port-forward ends.
    pub fn rest(&mut self) -> Vec<Forwarded> {
        let mut streams: Vec<(u32, Stream)> = self.streams.drain().collect();
        // Error streams first, so their messages reach their connection.
        streams.sort_by_key(|(id, s)| (!s.error_stream, *id));
        let mut ended: Vec<Forwarded> = streams
            .into_iter()
            .filter_map(|(_, s)| self.ended(s))
            .collect();
        // Messages whose data stream never came.
        let mut orphans: Vec<(String, Vec<u8>)> = self.errors.drain().collect();
        orphans.sort();
        ended.extend(orphans.into_iter().map(|(request, message)| Forwarded {
            port: None,
            request: Some(request),
            up: 0,
            down: 0,
            error: Some(String::from_utf8_lossy(&message).into_owned()),
        }));
        ended
    }

    /// A stream has ended: an error stream keeps its message for its
    /// connection; a data stream is the connection.
    fn ended(&mut self, stream: Stream) -> Option<Forwarded> {
        if stream.error_stream {
            // Kept for its connection; as bounded as the open streams.
            if let Some(request) = stream.request
                && !stream.message.is_empty()
                && self.errors.len() < MAX_STREAMS
            {
                self.errors.insert(request, stream.message);
            }
            return None;
        }
        let error = stream
            .request
            .as_ref()
            .and_then(|r| self.errors.remove(r))
            .map(|m| String::from_utf8_lossy(&m).into_owned());
        Some(Forwarded {
            port: stream.port,
            request: stream.request,
            up: stream.up,
            down: stream.down,
            error,
        })
    }
}

/// For the fuzz target: any bytes, as a client's first half and a
/// server's second, cut where the input says, read the same as whole
/// (data may come in more pieces; what each connection carried is the
/// same), and never panic.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let (client, server) = body.split_at(body.len() / 2);
    let read = |cut: usize| {
        let mut forwards = Forwards::default();
        let mut seen = Vec::new();
        for (side, bytes) in [(Side::Client, client), (Side::Server, server)] {
            let mut reader = SpdyReader::default();
            for chunk in bytes.chunks(cut.max(1)) {
                let fed = reader.feed(chunk, &mut |piece| {
                    if !matches!(piece, Piece::Data { .. }) {
                        seen.push(format!("{piece:?}"));
                    }
                    match forwards.piece(side, piece) {
                        Ok(Some(forwarded)) => seen.push(format!("{forwarded:?}")),
                        Ok(None) => {}
                        Err(error) => seen.push(error.to_string()),
                    }
                });
                if let Err(error) = fed {
                    seen.push(error.to_string());
                    break;
                }
            }
        }
        seen.extend(forwards.rest().iter().map(|f| format!("{f:?}")));
        seen
    };
    assert_eq!(read(body.len()), read(usize::from(cut)));
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A header block, compressed in `deflate`'s context as a SPDY peer
    /// does.
    fn block(deflate: &mut flate2::Compress, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = (headers.len() as u32).to_be_bytes().to_vec();
        for (name, value) in headers {
            for text in [name, value] {
                raw.extend_from_slice(&(text.len() as u32).to_be_bytes());
                raw.extend_from_slice(text.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        deflate
            .compress_vec(&raw, &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        out
    }

    fn deflater() -> flate2::Compress {
        let mut deflate = flate2::Compress::new(flate2::Compression::default(), true);
        deflate.set_dictionary(DICTIONARY).unwrap();
        deflate
    }

    fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x80, 3];
        frame.extend_from_slice(&kind.to_be_bytes());
        frame.push(flags);
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        frame.extend_from_slice(body);
        frame
    }

    fn syn_stream(
        deflate: &mut flate2::Compress,
        stream: u32,
        headers: &[(&str, &str)],
    ) -> Vec<u8> {
        let mut body = stream.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend(block(deflate, headers));
        control(SYN_STREAM, 0, &body)
    }

    fn syn_reply(deflate: &mut flate2::Compress, stream: u32) -> Vec<u8> {
        let mut body = stream.to_be_bytes().to_vec();
        body.extend(block(deflate, &[]));
        control(SYN_REPLY, 0, &body)
    }

    fn data(stream: u32, fin: bool, bytes: &[u8]) -> Vec<u8> {
        let mut frame = stream.to_be_bytes().to_vec();
        frame.push(u8::from(fin));
        frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes()[1..]);
        frame.extend_from_slice(bytes);
        frame
    }

    /// Both directions of a port-forward with two connections to port
    /// 8080 and one refused on port 1, as kubectl and the kubelet speak it.
    fn conversation() -> (Vec<u8>, Vec<u8>) {
        let (mut client_z, mut server_z) = (deflater(), deflater());
        let mut client = Vec::new();
        let mut server = Vec::new();
        for (request, (error, data_stream), port) in [
            ("0", (1, 3), "8080"),
            ("1", (5, 7), "8080"),
            ("2", (9, 11), "1"),
        ] {
            for (stream, kind) in [(error, "error"), (data_stream, "data")] {
                client.extend(syn_stream(
                    &mut client_z,
                    stream,
                    &[("streamtype", kind), ("port", port), ("requestid", request)],
                ));
                server.extend(syn_reply(&mut server_z, stream));
            }
            client.extend(data(error, true, b""));
        }
        client.extend(data(3, false, b"hello"));
        server.extend(data(3, false, b"hello"));
        client.extend(data(7, false, &[7; 70_000]));
        server.extend(data(7, false, &[7; 70_000]));
        client.extend(data(3, true, b""));
        server.extend(data(3, true, b""));
        server.extend(data(1, true, b""));
        server.extend(data(9, false, b"connection refused"));
        server.extend(data(9, true, b""));
        server.extend(control(RST_STREAM, 0, &[0, 0, 0, 11, 0, 0, 0, 5]));
        client.extend(control(6, 0, &[0, 0, 0, 1]));
        (client, server)
    }

    fn run(cut: usize) -> Vec<Forwarded> {
        let (client, server) = conversation();
        let (mut up, mut down) = (SpdyReader::default(), SpdyReader::default());
        let mut forwards = Forwards::default();
        let mut ended = Vec::new();
        // Client first, then server, each cut into `cut`-byte reads.
        for (side, reader, bytes) in [
            (Side::Client, &mut up, &client),
            (Side::Server, &mut down, &server),
        ] {
            for chunk in bytes.chunks(cut) {
                let mut failed = None;
                reader
                    .feed(chunk, &mut |piece| match forwards.piece(side, piece) {
                        Ok(Some(done)) => ended.push(done),
                        Ok(None) => {}
                        Err(e) => failed = Some(e),
                    })
                    .unwrap();
                assert_eq!(failed, None);
            }
        }
        ended.extend(forwards.rest());
        ended
    }

    #[test]
    fn each_forwarded_connection_is_counted_wherever_reads_cut() {
        let forwarded = |port, request: &str, up, down, error: Option<&str>| Forwarded {
            port: Some(port),
            request: Some(request.into()),
            up,
            down,
            error: error.map(str::to_owned),
        };
        let want = vec![
            forwarded(8080, "0", 5, 5, None),
            forwarded(1, "2", 0, 0, Some("connection refused")),
            // Still open when the port-forward ended.
            forwarded(8080, "1", 70_000, 70_000, None),
        ];
        for cut in [1, 2, 7, 8, 9, 100, 4096, 1 << 20] {
            assert_eq!(run(cut), want, "reads of {cut}");
        }
    }

    #[test]
    fn what_is_not_spdy_3_is_an_error() {
        let mut reader = SpdyReader::default();
        let mut ignore = |_: Piece<'_>| {};
        assert_eq!(
            reader.feed(&control(SYN_STREAM, 0, &[0; 4])[..], &mut ignore),
            Err(SpdyError::ControlTooShort)
        );
        let mut frame = control(SYN_STREAM, 0, &[0; 12]);
        frame[1] = 2;
        assert_eq!(
            SpdyReader::default().feed(&frame, &mut ignore),
            Err(SpdyError::Version(2))
        );
        let mut big = control(4, 0, &[]);
        big[5..8].copy_from_slice(&[0x10, 0, 0]);
        assert_eq!(
            SpdyReader::default().feed(&big, &mut ignore),
            Err(SpdyError::ControlTooLong(0x10_0000))
        );
        // A header block compressed without the dictionary, or garbage.
        let mut plain = flate2::Compress::new(flate2::Compression::default(), true);
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[0; 6]);
        body.extend(block(&mut plain, &[("port", "1")]));
        let mut seen = Vec::new();
        let read = SpdyReader::default().feed(&control(SYN_STREAM, 0, &body), &mut |p| {
            seen.push(format!("{p:?}"))
        });
        // zlib without a preset dictionary is a valid block too.
        assert_eq!(read, Ok(()));
        assert_eq!(seen.len(), 1, "{seen:?}");
        // A zlib stream that ends, then more: an error, not a loop.
        let mut ended = 1u32.to_be_bytes().to_vec();
        ended.extend_from_slice(&[0; 6]);
        let mut finished = flate2::Compress::new(flate2::Compression::default(), true);
        let mut block = Vec::with_capacity(256);
        finished
            .compress_vec(&[0, 0, 0, 0], &mut block, flate2::FlushCompress::Finish)
            .unwrap();
        ended.extend(&block);
        ended.extend_from_slice(&[0; 16]);
        assert_eq!(
            SpdyReader::default().feed(&control(SYN_STREAM, 0, &ended), &mut ignore),
            Err(SpdyError::Compression)
        );
        let mut after = SpdyReader::default();
        let mut frames = control(SYN_STREAM, 0, &ended[..ended.len() - 16]);
        frames.extend(control(SYN_STREAM, 0, &ended[..ended.len() - 16]));
        assert!(after.feed(&frames, &mut ignore).is_err());
        let mut garbage = 1u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0; 6]);
        garbage.extend_from_slice(b"not zlib at all");
        assert_eq!(
            SpdyReader::default().feed(&control(SYN_STREAM, 0, &garbage), &mut ignore),
            Err(SpdyError::Compression)
        );
    }

    #[test]
    fn the_dictionary_is_spdy_3s() {
        use sha2::Digest;
        assert_eq!(DICTIONARY.len(), 1423);
        let digest = sha2::Sha256::digest(DICTIONARY);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
        );
        // And a peer compressing against it is read.
        let mut out = Vec::new();
        let _ = out.write_all(&syn_stream(&mut deflater(), 1, &[("port", "80")]));
        let mut seen = Vec::new();
        SpdyReader::default()
            .feed(&out, &mut |p| seen.push(format!("{p:?}")))
            .unwrap();
        assert_eq!(seen, [r#"Opened { stream: 1, headers: [("port", "80")] }"#]);
    }
}
