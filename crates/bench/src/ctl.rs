//! The bench's own control connection between client and server: one text line per message, so a
//! run can be followed with a packet capture. Also the deterministic data pattern both ends check.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

pub struct Ctl {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Ctl {
    pub fn new(stream: TcpStream) -> std::io::Result<Ctl> {
        stream.set_nodelay(true)?;
        Ok(Ctl { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.writer.write_all(format!("{line}\n").as_bytes())
    }

    /// The next line split into words; end of stream is an error.
    pub fn recv(&mut self) -> std::io::Result<Vec<String>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.split_whitespace().map(String::from).collect())
    }

    /// The next line, which must start with `word`.
    pub fn expect(&mut self, word: &str) -> std::io::Result<Vec<String>> {
        let words = self.recv()?;
        if words.first().map(String::as_str) != Some(word) {
            return Err(std::io::Error::other(format!("bench peer said {:?}, expected {word}", words.join(" "))));
        }
        Ok(words)
    }
}

pub fn field<T: std::str::FromStr>(words: &[String], i: usize) -> std::io::Result<T> {
    words
        .get(i)
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("malformed bench message {:?}", words.join(" "))))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Byte `i` of the pattern for `seed`; cheap enough to fill and check hundreds of MiB.
fn word(i: usize, seed: u64) -> u64 {
    let mut x = (i as u64).wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 27)
}

pub fn fill(buf: &mut [u8], seed: u64) {
    let mut chunks = buf.chunks_exact_mut(8);
    for (i, c) in chunks.by_ref().enumerate() {
        c.copy_from_slice(&word(i, seed).to_le_bytes());
    }
    let n = buf.len() / 8;
    let tail = buf.len() % 8;
    let last = word(n, seed).to_le_bytes();
    buf[n * 8..].copy_from_slice(&last[..tail]);
}

pub fn check(buf: &[u8], seed: u64) -> bool {
    let n = buf.len() / 8;
    let body = buf.chunks_exact(8).enumerate().all(|(i, c)| c == word(i, seed).to_le_bytes());
    body && buf[n * 8..] == word(n, seed).to_le_bytes()[..buf.len() % 8]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_detects_changes_and_hex_round_trips() {
        for len in [0usize, 1, 7, 8, 9, 1000] {
            let mut b = vec![0u8; len];
            fill(&mut b, 3);
            assert!(check(&b, 3));
            if len > 0 {
                assert!(!check(&b, 4), "another seed differs");
                b[len - 1] ^= 1;
                assert!(!check(&b, 3), "a flipped last byte is seen");
            }
        }
        assert_eq!(unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(), vec![0, 1, 0xab, 0xff]);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }
}
