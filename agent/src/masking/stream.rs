//! Masking a byte stream (a command's stdout and stderr) with the value
//! patterns PostgreSQL results use. A value may arrive split across two
//! packets, so the tail of each packet that could still grow into one —
//! its last run of characters values are made of — waits for the next
//! packet (or an idle moment) before it goes out. What is held is bounded.
use std::sync::Arc;

use bytes::Bytes;

use super::MaskSet;

/// The most held back per stream: a longer run goes out masked as it is.
const MAX_HELD: usize = 512;

pub struct StreamMask {
    masks: Arc<MaskSet>,
    /// Held-back tails of stdout (0) and stderr (1).
    held: [Vec<u8>; 2],
}

impl StreamMask {
    pub fn new(masks: Arc<MaskSet>) -> Self {
        Self {
            masks,
            held: [Vec::new(), Vec::new()],
        }
    }

    pub fn holding(&self) -> bool {
        self.held.iter().any(|h| !h.is_empty())
    }

    /// Takes a packet; returns what may go out now.
    pub fn push(&mut self, ext: Option<u32>, data: &[u8]) -> Vec<(Option<u32>, Bytes)> {
        let slot = usize::from(ext.is_some());
        let held = &mut self.held[slot];
        held.extend_from_slice(data);
        let run = held.iter().rev().take_while(|b| is_value_byte(**b)).count();
        let cut = if run >= MAX_HELD || run == held.len() && held.len() >= MAX_HELD {
            held.len()
        } else {
            held.len() - run
        };
        if cut == 0 {
            return Vec::new();
        }
        let rest = held.split_off(cut);
        let ready = std::mem::replace(held, rest);
        vec![(ext, self.mask(ready))]
    }

    /// Everything held, masked: at EOF, exit, or after an idle moment.
    pub fn flush(&mut self) -> Vec<(Option<u32>, Bytes)> {
        let mut out = Vec::new();
        for (slot, ext) in [(0, None), (1, Some(1))] {
            let held = std::mem::take(&mut self.held[slot]);
            if !held.is_empty() {
                out.push((ext, self.mask(held)));
            }
        }
        out
    }

    fn mask(&self, text: Vec<u8>) -> Bytes {
        match self.masks.scan_text(&text) {
            Some(masked) => Bytes::from(masked),
            None => Bytes::from(text),
        }
    }
}

/// Bytes a maskable value (key, token, card number, IBAN, e-mail) is made
/// of: a run of them at the end of a packet may continue in the next.
fn is_value_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'_' | b'-' | b'.' | b'+' | b'/' | b'=' | b'@' | b'%' | b' '
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::MaskSpec;

    fn stream() -> StreamMask {
        let specs: Vec<crate::policy::Mask> =
            ["pattern = \"api_key\"", "pattern = \"card_number\""]
                .iter()
                .map(|t| toml::from_str::<MaskSpec>(t).unwrap().compile().unwrap())
                .collect();
        let refs: Vec<&crate::policy::Mask> = specs.iter().collect();
        let set = MaskSet::compile(
            &refs,
            &Default::default(),
            Arc::new(super::super::MaskKey::new([0; 32])),
        )
        .unwrap();
        StreamMask::new(Arc::new(set))
    }

    fn run(mask: &mut StreamMask, packets: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in packets {
            for (_, chunk) in mask.push(None, p) {
                out.extend_from_slice(&chunk);
            }
        }
        for (_, chunk) in mask.flush() {
            out.extend_from_slice(&chunk);
        }
        out
    }

    #[test]
    fn a_secret_split_across_packets_is_masked() {
        let key = b"token=AKIAABCDEFGHIJKLMNOP\n";
        for split in 1..key.len() {
            let out = run(&mut stream(), &[&key[..split], &key[split..]]);
            assert_eq!(out, b"token=****\n", "split at {split}");
        }
        let card = b"card 4111 1111 1111 1111 ok\n";
        for split in 1..card.len() {
            let out = run(&mut stream(), &[&card[..split], &card[split..]]);
            assert_eq!(out, b"card **** ok\n", "split at {split}");
        }
    }

    #[test]
    fn plain_output_passes_and_little_is_held() {
        let mut mask = stream();
        let out = mask.push(None, b"hello world\n$ ");
        assert_eq!(out[0].1.as_ref(), b"hello world\n$");
        assert!(mask.holding());
        let rest = mask.flush();
        assert_eq!(rest[0].1.as_ref(), b" ");
        let long = vec![b'a'; 2000];
        let out = run(&mut stream(), &[&long]);
        assert_eq!(out, long);
    }
}
