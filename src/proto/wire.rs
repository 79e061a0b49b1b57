//! Bounds-checked little-endian cursor helpers shared by every message codec.
//!
//! Decoders read through [`Reader`] only, so running off the end of a buffer is always a
//! `Truncated` error and never a panic, and every length prefix is compared with its limit
//! before the bytes it covers are touched or copied.

use super::ProtoError;

/// Fails with `TooLong` when `len` exceeds `max`.
pub(super) fn check_len(len: usize, max: usize, what: &'static str) -> Result<(), ProtoError> {
    if len > max {
        return Err(ProtoError::TooLong { what, len, max });
    }
    Ok(())
}

pub(super) struct Reader<'a> {
    rest: &'a [u8],
    /// Names the whole message in `Truncated`/`TrailingBytes` errors.
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { rest: buf, what }
    }

    fn truncated(&self) -> ProtoError {
        ProtoError::Truncated { what: self.what }
    }

    /// The bytes not read yet, left unread (`bytes` takes them).
    pub(super) fn rest(&self) -> &'a [u8] {
        self.rest
    }

    pub(super) fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or_else(|| self.truncated())?;
        self.rest = tail;
        Ok(head)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let (head, tail) = self.rest.split_first_chunk::<N>().ok_or_else(|| self.truncated())?;
        self.rest = tail;
        Ok(*head)
    }

    pub(super) fn u8(&mut self) -> Result<u8, ProtoError> {
        self.array().map(u8::from_le_bytes)
    }

    pub(super) fn u16(&mut self) -> Result<u16, ProtoError> {
        self.array().map(u16::from_le_bytes)
    }

    pub(super) fn u32(&mut self) -> Result<u32, ProtoError> {
        self.array().map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self) -> Result<u64, ProtoError> {
        self.array().map(u64::from_le_bytes)
    }

    pub(super) fn i32(&mut self) -> Result<i32, ProtoError> {
        self.array().map(i32::from_le_bytes)
    }

    fn limited(&mut self, len: usize, max: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        check_len(len, max, what)?;
        self.bytes(len)
    }

    /// A `u16` length followed by that many bytes of UTF-8.
    pub(super) fn string16(&mut self, max: usize, what: &'static str) -> Result<String, ProtoError> {
        let len = usize::from(self.u16()?);
        utf8(self.limited(len, max, what)?, what)
    }

    /// A `u32` length followed by that many raw bytes.
    pub(super) fn bytes32(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        // A length that does not even fit in usize is certainly over any limit.
        let len = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        self.limited(len, max, what)
    }

    /// A `u32` length followed by that many bytes of UTF-8.
    pub(super) fn string32(&mut self, max: usize, what: &'static str) -> Result<String, ProtoError> {
        let raw = self.bytes32(max, what)?;
        utf8(raw, what)
    }

    /// Fails unless every byte has been consumed, so that no message has two encodings.
    pub(super) fn finish(self) -> Result<(), ProtoError> {
        if self.rest.is_empty() {
            return Ok(());
        }
        Err(ProtoError::TrailingBytes { what: self.what, extra: self.rest.len() })
    }
}

fn utf8(raw: &[u8], what: &'static str) -> Result<String, ProtoError> {
    core::str::from_utf8(raw).map(str::to_owned).map_err(|_| ProtoError::BadUtf8 { what })
}

pub(super) struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub(super) fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out }
    }

    pub(super) fn bytes(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    pub(super) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub(super) fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }

    pub(super) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    pub(super) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    pub(super) fn i32(&mut self, v: i32) {
        self.bytes(&v.to_le_bytes());
    }

    /// Oversized input is clipped to what the prefix can express so the frame stays
    /// self-consistent; every such string is far over its protocol limit, so the peer
    /// rejects it with `TooLong` instead of misparsing the rest of the stream.
    pub(super) fn string16(&mut self, s: &str) {
        let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
        self.u16(len);
        self.bytes(s.as_bytes().get(..usize::from(len)).unwrap_or_default());
    }

    /// Same clipping rationale as [`Writer::string16`].
    pub(super) fn bytes32(&mut self, bytes: &[u8]) {
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.u32(len);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.bytes(bytes.get(..len).unwrap_or(bytes));
    }
}

/// Copies `src` into `dst` starting at `at`, dropping whatever would not fit.
///
/// Used for fixed-size layouts whose offsets are compile-time constants; it cannot panic.
pub(super) fn put_at(dst: &mut [u8], at: usize, src: &[u8]) {
    for (d, s) in dst.iter_mut().skip(at).zip(src) {
        *d = *s;
    }
}

/// Reads `N` bytes at `at`, zero-filling anything past the end; the panic-free counterpart of
/// [`put_at`] for fixed layouts.
pub(super) fn get_at<const N: usize>(src: &[u8], at: usize) -> [u8; N] {
    core::array::from_fn(|i| at.checked_add(i).and_then(|j| src.get(j)).copied().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_little_endian_in_order() {
        let buf = [
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0xff, 0xff, 0xff, 0xff, 0x0d, 0x0e,
            0x0f, 0x10, 0x11, 0x12, 0x13,
        ];
        let mut r = Reader::new(&buf, "test");
        assert_eq!(r.u8().unwrap(), 0x01);
        assert_eq!(r.u16().unwrap(), 0x0302);
        assert_eq!(r.u32().unwrap(), 0x0706_0504);
        assert_eq!(r.u8().unwrap(), 0x08);
        assert_eq!(r.u32().unwrap(), 0x0c0b_0a09);
        assert_eq!(r.i32().unwrap(), -1);
        assert_eq!(r.bytes(7).unwrap(), &buf[16..23]);
        r.finish().unwrap();
    }

    #[test]
    fn reader_reports_truncation_and_trailing_bytes() {
        let mut r = Reader::new(&[1, 2, 3], "thing");
        assert_eq!(r.u64(), Err(ProtoError::Truncated { what: "thing" }));
        // A failed read consumes nothing, so the caller sees the remainder as trailing.
        assert_eq!(r.finish(), Err(ProtoError::TrailingBytes { what: "thing", extra: 3 }));
        let mut r = Reader::new(&[1, 2, 3], "thing");
        assert_eq!(r.bytes(4), Err(ProtoError::Truncated { what: "thing" }));
        assert_eq!(r.bytes(usize::MAX), Err(ProtoError::Truncated { what: "thing" }));
    }

    #[test]
    fn length_prefixes_are_checked_before_reading() {
        // Claims 0xffffffff bytes with none present: must be TooLong, not Truncated.
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff], "msg");
        assert_eq!(r.bytes32(16, "field"), Err(ProtoError::TooLong { what: "field", len: 0xffff_ffff, max: 16 }));
        let mut r = Reader::new(&[5, 0, b'a'], "msg");
        assert_eq!(r.string16(4, "name").unwrap_err(), ProtoError::TooLong { what: "name", len: 5, max: 4 });
        let mut r = Reader::new(&[3, 0, b'a'], "msg");
        assert_eq!(r.string16(4, "name"), Err(ProtoError::Truncated { what: "msg" }));
    }

    #[test]
    fn strings_round_trip_and_reject_bad_utf8() {
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.string16("héllo");
        w.bytes32("wörld".as_bytes());
        let mut r = Reader::new(&buf, "msg");
        assert_eq!(r.string16(64, "a").unwrap(), "héllo");
        assert_eq!(r.string32(64, "b").unwrap(), "wörld");
        r.finish().unwrap();

        let mut r = Reader::new(&[2, 0, 0xc3, 0x28], "msg");
        assert_eq!(r.string16(64, "a"), Err(ProtoError::BadUtf8 { what: "a" }));
    }

    #[test]
    fn oversized_string_is_clipped_to_a_consistent_prefix() {
        let long = "x".repeat(70_000);
        let mut buf = Vec::new();
        Writer::new(&mut buf).string16(&long);
        assert_eq!(buf.len(), 2 + usize::from(u16::MAX));
        assert_eq!(&buf[..2], &u16::MAX.to_le_bytes());
    }

    #[test]
    fn fixed_offset_helpers_never_run_off_the_end() {
        let mut dst = [0u8; 4];
        put_at(&mut dst, 2, &[9, 8, 7]);
        assert_eq!(dst, [0, 0, 9, 8]);
        put_at(&mut dst, usize::MAX, &[1]);
        assert_eq!(dst, [0, 0, 9, 8]);
        assert_eq!(get_at::<3>(&dst, 2), [9, 8, 0]);
        assert_eq!(get_at::<2>(&dst, usize::MAX), [0, 0]);
    }
}
