//! Random numbers for nonces and region tokens. Tokens are capabilities (a peer holding one may
//! touch the region's advertised windows), so there is no weak fallback: the kernel's generator or
//! `/dev/urandom`, else a panic, which the C ABI's boundary and library threads turn into an error.

use std::io::Read;

/// 64 random bits from the kernel's generator.
pub fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    let mut filled = 0;
    while filled < v.len() {
        // SAFETY: getrandom writes at most `v.len() - filled` bytes at `v[filled..]`.
        let n = unsafe { libc::getrandom(v[filled..].as_mut_ptr().cast(), v.len() - filled, 0) };
        match n {
            n if n > 0 => filled += n as usize,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => continue,
            _ => break,
        }
    }
    if filled < v.len() {
        // getrandom missing (kernels before 3.17, some sandboxes): the device holds the same pool.
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut v))
            .unwrap_or_else(|e| panic!("no source of random numbers: getrandom failed and /dev/urandom: {e}"));
    }
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_differ() {
        let draws: std::collections::HashSet<u64> = (0..64).map(|_| super::random_u64()).collect();
        assert_eq!(draws.len(), 64, "64 draws of 64 random bits repeat with odds of about 2^-52");
    }
}
