//! Reading the Kubernetes stream protocol (`v4`/`v5.channel.k8s.io`) off
//! a relayed WebSocket, to record an exec or attach as a terminal: what
//! went in on stdin, what came out on stdout and stderr, each resize, and
//! how the command ended.
//!
//! The reader only watches the bytes the relay forwards unchanged; it
//! holds a frame's header and at most a small control message, never a
//! frame's payload, whatever its size. (WebSocket libraries gather whole
//! messages and answer pings themselves; a relay must do neither, so the
//! frame header of RFC 6455 §5.2 is read here.)

/// A message's first payload byte names its stream.
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
/// The server's last word: a `Status` object, as JSON.
pub const ERROR: u8 = 3;
/// The client's terminal size: `{"Width":W,"Height":H}`.
pub const RESIZE: u8 = 4;

/// Messages on these streams are read whole (they are small JSON); a
/// bigger one is not a message of this protocol.
const SMALL_MESSAGE: usize = 4096;

/// What a relayed stream carried, piece by piece.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Bytes of stdin, stdout or stderr.
    Data { stream: u8, bytes: &'a [u8] },
    /// A whole message on the error or resize stream.
    Message { stream: u8, bytes: &'a [u8] },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a WebSocket frame with reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("a WebSocket frame longer than 2^63 bytes")]
    TooLong,
    #[error("a WebSocket control frame of {0} bytes (at most 125)")]
    ControlTooLong(u64),
    #[error("a {0}-byte message on a stream of small JSON messages")]
    MessageTooLong(usize),
}

/// Follows one direction of a WebSocket: frames, messages, streams.
#[derive(Default)]
pub struct FrameReader {
    header: [u8; 14],
    have: usize,
    /// In a frame's payload: bytes left, masking key and position.
    remaining: u64,
    mask: Option<[u8; 4]>,
    mask_at: usize,
    control: bool,
    /// The stream of the message being read; none before its first
    /// payload byte.
    stream: Option<u8>,
    in_message: bool,
    unmasked: Vec<u8>,
    small: Vec<u8>,
    /// Messages are bytes of another protocol, not streams: each payload
    /// is data of stream 0.
    raw: bool,
}

impl FrameReader {
    /// A reader of a WebSocket that tunnels another protocol's bytes in
    /// its messages (a port-forward's SPDY).
    pub fn raw() -> Self {
        Self {
            raw: true,
            ..Self::default()
        }
    }

    /// Reads the next bytes of the direction; `on` gets what they carry.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        on: &mut impl FnMut(Piece<'_>),
    ) -> Result<(), FrameError> {
        while !data.is_empty() {
            if self.remaining == 0 && !self.read_header(&mut data)? {
                return Ok(());
            }
            let take = (self.remaining.min(data.len() as u64)) as usize;
            let (payload, rest) = data.split_at(take);
            data = rest;
            self.remaining -= take as u64;
            if !self.control {
                self.payload(payload, on)?;
            }
            if self.remaining == 0 && !self.control && !self.in_message {
                self.end_message(on);
            }
        }
        Ok(())
    }

    /// Gathers a header from `data`; true once whole (and taken in).
    fn read_header(&mut self, data: &mut &[u8]) -> Result<bool, FrameError> {
        loop {
            let needed = self.header_length();
            if self.have >= needed {
                break;
            }
            let Some((&byte, rest)) = data.split_first() else {
                return Ok(false);
            };
            self.header[self.have] = byte;
            self.have += 1;
            *data = rest;
        }
        let [first, second, ..] = self.header;
        let (fin, opcode) = (first & 0x80 != 0, first & 0x0f);
        let length = match second & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(self.header[2..10].try_into().expect("8 bytes")),
            short => u64::from(short),
        };
        if length >> 63 != 0 {
            return Err(FrameError::TooLong);
        }
        self.mask = (second & 0x80 != 0).then(|| {
            let at = self.have - 4;
            self.header[at..self.have].try_into().expect("4 bytes")
        });
        self.mask_at = 0;
        self.have = 0;
        self.remaining = length;
        self.control = match opcode {
            0x0..=0x2 => false,
            0x8..=0xa if length > 125 => return Err(FrameError::ControlTooLong(length)),
            0x8..=0xa => true,
            reserved => return Err(FrameError::ReservedOpcode(reserved)),
        };
        if !self.control {
            self.in_message = !fin;
        }
        Ok(true)
    }

    /// The header's length, as far as its bytes so far tell.
    fn header_length(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let masked = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        match self.header[1] & 0x7f {
            126 => 4 + masked,
            127 => 10 + masked,
            _ => 2 + masked,
        }
    }

    fn payload(
        &mut self,
        payload: &[u8],
        on: &mut impl FnMut(Piece<'_>),
    ) -> Result<(), FrameError> {
        let mut bytes = payload;
        if let Some(key) = self.mask {
            self.unmasked.clear();
            self.unmasked.extend(
                payload
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ key[(self.mask_at + i) % 4]),
            );
            self.mask_at = (self.mask_at + payload.len()) % 4;
            bytes = &self.unmasked;
        }
        if self.raw {
            if !bytes.is_empty() {
                on(Piece::Data { stream: 0, bytes });
            }
            return Ok(());
        }
        let stream = match self.stream {
            Some(stream) => stream,
            None => {
                let Some((&first, rest)) = bytes.split_first() else {
                    return Ok(());
                };
                self.stream = Some(first);
                bytes = rest;
                first
            }
        };
        match stream {
            STDIN | STDOUT | STDERR => {
                if !bytes.is_empty() {
                    on(Piece::Data { stream, bytes });
                }
            }
            _ => {
                if self.small.len() + bytes.len() > SMALL_MESSAGE {
                    return Err(FrameError::MessageTooLong(self.small.len() + bytes.len()));
                }
                self.small.extend_from_slice(bytes);
            }
        }
        Ok(())
    }

    fn end_message(&mut self, on: &mut impl FnMut(Piece<'_>)) {
        if let Some(stream) = self.stream.take()
            && !matches!(stream, STDIN | STDOUT | STDERR)
        {
            on(Piece::Message {
                stream,
                bytes: &self.small,
            });
        }
        self.small.clear();
    }
}

/// A resize message's size, as (columns, rows).
pub fn terminal_size(message: &[u8]) -> Option<(u32, u32)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u32,
        height: u32,
    }
    let size: Size = serde_json::from_slice(message).ok()?;
    Some((size.width, size.height))
}

/// The exit status a `Status` on the error stream reports: 0 for
/// `Success`, the `ExitCode` cause of a `NonZeroExitCode` failure, else
/// none (the command could not run).
pub fn exit_status(message: &[u8]) -> Option<u32> {
    let status: serde_json::Value = serde_json::from_slice(message).ok()?;
    if status["status"] == "Success" {
        return Some(0);
    }
    status["details"]["causes"]
        .as_array()?
        .iter()
        .find(|cause| cause["reason"] == "ExitCode")?["message"]
        .as_str()?
        .parse()
        .ok()
}

/// For the fuzz target: the input read as a stream, cut where its first
/// byte says; every piece is within what was fed, and a stream that
/// errs stays in error.
pub fn fuzz(data: &[u8]) {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut).max(1);
    let mut reader = FrameReader::default();
    let mut seen = 0usize;
    for piece in stream.chunks(step) {
        let fed = reader.feed(piece, &mut |p| {
            let (Piece::Data { bytes, .. } | Piece::Message { bytes, .. }) = p;
            seen += bytes.len();
            let _ = (terminal_size(bytes), exit_status(bytes));
        });
        if fed.is_err() {
            return;
        }
    }
    assert!(seen <= stream.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client (masked) or server sends it.
    fn frame(opcode: u8, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![u8::from(fin) << 7 | opcode];
        let bit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(bit | n as u8),
            n if n < 65536 => {
                out.push(bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    /// Everything the reader reports for `bytes` fed in pieces of `step`.
    fn read(bytes: &[u8], step: usize) -> Result<Vec<(bool, u8, Vec<u8>)>, FrameError> {
        let mut reader = FrameReader::default();
        let mut seen: Vec<(bool, u8, Vec<u8>)> = Vec::new();
        for piece in bytes.chunks(step) {
            reader.feed(piece, &mut |p| match p {
                Piece::Data { stream, bytes } => match seen.last_mut() {
                    Some((false, s, data)) if *s == stream => data.extend_from_slice(bytes),
                    _ => seen.push((false, stream, bytes.to_vec())),
                },
                Piece::Message { stream, bytes } => seen.push((true, stream, bytes.to_vec())),
            })?;
        }
        Ok(seen)
    }

    #[test]
    fn streams_are_read_whatever_the_cuts_and_masks() {
        let key = Some([0x12, 0x34, 0x56, 0x78]);
        let big = vec![b'x'; 70_000];
        let mut wire = frame(2, true, b"\x00echo hi\n", key);
        wire.extend(frame(9, true, b"ping", key));
        wire.extend(frame(2, true, b"\x04{\"Width\":120,\"Height\":40}", key));
        // A message in three frames, a ping between them.
        wire.extend(frame(2, false, b"\x01he", None));
        wire.extend(frame(9, true, b"", None));
        wire.extend(frame(0, false, b"ll", None));
        wire.extend(frame(0, true, b"o", None));
        wire.extend(frame(2, true, &[&[2u8][..], &big].concat(), None));
        wire.extend(frame(2, true, b"\x03{\"status\":\"Success\"}", None));
        wire.extend(frame(8, true, b"\x03\xe8", None));
        for step in [1, 3, 7, 4096, wire.len()] {
            let seen = read(&wire, step).unwrap();
            assert_eq!(
                seen,
                vec![
                    (false, STDIN, b"echo hi\n".to_vec()),
                    (true, RESIZE, b"{\"Width\":120,\"Height\":40}".to_vec()),
                    (false, STDOUT, b"hello".to_vec()),
                    (false, STDERR, big.clone()),
                    (true, ERROR, b"{\"status\":\"Success\"}".to_vec()),
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn what_is_not_this_protocol_is_an_error() {
        assert_eq!(
            read(&frame(3, true, b"\x01x", None), 5),
            Err(FrameError::ReservedOpcode(3))
        );
        assert_eq!(
            read(&frame(9, true, &[0; 126], None), 5),
            Err(FrameError::ControlTooLong(126))
        );
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(read(&huge, 5), Err(FrameError::TooLong));
        let long = [&[RESIZE][..], &[b' '; SMALL_MESSAGE + 1]].concat();
        assert!(matches!(
            read(&frame(2, true, &long, None), 100),
            Err(FrameError::MessageTooLong(_))
        ));
    }

    #[test]
    fn sizes_and_exit_statuses_are_read_from_their_messages() {
        assert_eq!(
            terminal_size(br#"{"Width":80,"Height":24}"#),
            Some((80, 24))
        );
        assert_eq!(terminal_size(b"80x24"), None);
        assert_eq!(
            exit_status(br#"{"metadata":{},"status":"Success"}"#),
            Some(0)
        );
        let failed = br#"{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        assert_eq!(exit_status(failed), Some(3));
        assert_eq!(
            exit_status(br#"{"status":"Failure","message":"no such container"}"#),
            None
        );
    }
}
