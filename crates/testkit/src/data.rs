//! Test payloads and comparing them.

use crate::rng::mix;

/// Fills `buf` with bytes that depend on `seed` and on every position: no run of them repeats, so
/// a page or chunk landing at the wrong offset, or one message's bytes in another's place, fails a
/// comparison. Filling a longer buffer with the same seed extends a shorter one.
pub fn fill(buf: &mut [u8], seed: u64) {
    let base = mix(seed);
    for (word, chunk) in buf.chunks_mut(8).enumerate() {
        let v = mix(base.wrapping_add(word as u64)).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// `len` bytes of [`fill`] with `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    fill(&mut out, seed);
    out
}

/// Compares without printing megabytes on failure: names the first differing byte.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let end = (i + 16).min(got.len());
        panic!(
            "{what}: first difference at byte {i} of {}: got {:02x?}, want {:02x?}",
            want.len(),
            &got[i..end],
            &want[i..end]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_seed_and_by_page() {
        let a = pattern(1 << 16, 1);
        let b = pattern(1 << 16, 2);
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < a.len() / 64, "{same} equal bytes between neighbouring seeds");
        let pages: std::collections::HashSet<&[u8]> = a.chunks(4096).collect();
        assert_eq!(pages.len(), 16, "no two pages alike");
        assert_eq!(&pattern(1000, 1)[..], &a[..1000], "a shorter pattern is a prefix of a longer one");
        assert_eq!(pattern(0, 1), Vec::<u8>::new());
    }

    #[test]
    fn assert_same_names_the_first_difference() {
        assert_same(b"abc", b"abc", "equal");
        let err = std::panic::catch_unwind(|| assert_same(b"abcd", b"abxd", "slices")).unwrap_err();
        let msg = err.downcast::<String>().unwrap();
        assert!(msg.contains("first difference at byte 2 of 4"), "{msg}");
    }
}
