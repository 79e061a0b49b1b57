//! The tests' one source of randomness. Every run draws new numbers, so runs together cover more
//! than a fixed seed would, and every generator prints the seed it started from: a failing run is
//! replayed with `UCCL_TCPX_TEST_SEED=<seed>`.

use std::sync::OnceLock;

/// Replays a run: the seed a failing test printed.
pub const SEED_VAR: &str = "UCCL_TCPX_TEST_SEED";

/// The process's seed: `UCCL_TCPX_TEST_SEED` when set (decimal or 0x-hex), else random.
fn base_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| match std::env::var(SEED_VAR) {
        Ok(text) => {
            let t = text.trim();
            let parsed = match t.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => t.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{SEED_VAR}={text:?} is not a number: {e}"))
        }
        Err(_) => fastrand::u64(..),
    })
}

/// splitmix64's finaliser: spreads every input bit over the whole output.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a, so that a stream's name picks its sequence the same way on every run.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A seeded generator with the helpers tests need on top of `fastrand`.
pub struct Rng(fastrand::Rng);

impl Rng {
    /// The generator for `stream` (each test, worker or thread names its own, so their sequences
    /// are independent and each is replayed alone). Prints the seed.
    pub fn new(stream: &str) -> Rng {
        let base = base_seed();
        println!("{stream}: random seed {base:#x} (replay with {SEED_VAR}={base:#x})");
        Rng(fastrand::Rng::with_seed(mix(base ^ name_hash(stream))))
    }

    pub fn u64(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { self.0.usize(..n) }
    }

    /// True once in `one_in` calls on average.
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub fn byte(&mut self) -> u8 {
        self.0.u8(..)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.0.fill(&mut out);
        out
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        self.0.shuffle(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let draw = |name| {
            let mut r = Rng::new(name);
            (0..8).map(|_| r.u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw("a"), draw("a"), "one stream, one sequence within a run");
        assert_ne!(draw("a"), draw("b"), "streams are independent");
    }

    #[test]
    fn ranges_hold() {
        let mut r = Rng::new("ranges");
        assert_eq!(r.below(0), 0);
        assert!((0..1000).all(|_| r.below(7) < 7));
        assert_eq!(r.bytes(33).len(), 33);
        let seen: std::collections::HashSet<usize> = (0..1000).map(|_| r.below(4)).collect();
        assert_eq!(seen.len(), 4, "every value of a small range comes up");
    }
}
