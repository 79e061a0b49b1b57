//! What the kernel benchmarks (`unpack_bench`, `pieces_bench`) share: ending on a failure with the
//! binary's name, and the xorshift generator their layouts are drawn from. Included by path, as
//! the binaries share no library with the transfer bench.

/// Prints `msg` after the binary's name and exits 1.
pub fn fail(msg: &str) -> ! {
    eprintln!("{}: {msg}", env!("CARGO_BIN_NAME"));
    std::process::exit(1)
}

/// `r`'s value, or [`fail`] naming `what`.
pub fn check<T, E: std::fmt::Debug>(what: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| fail(&format!("{what}: {e:?}")))
}

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}
