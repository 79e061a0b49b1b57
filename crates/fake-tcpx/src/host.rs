//! Which host and process a connection's sender runs in. Traffic between two ends on one host never
//! passes a NIC (loopback, or a bridge between containers of one kernel), so nothing steers it into
//! device memory: TCPX's first devmem receive on such a flow finds the payload in host memory and
//! exits ("data landed on host memory", `sock/tcpx.h` `process_recv_cmsg`). The host is the
//! running kernel (its boot id), which containers on one machine share.

use std::sync::LazyLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// FNV-1a hash of the kernel's boot id (else the host name).
    pub host: u64,
    pub pid: u32,
}

static LOCAL: LazyLock<Origin> = LazyLock::new(|| {
    let id = ["/proc/sys/kernel/random/boot_id", "/proc/sys/kernel/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().filter(|s| !s.trim().is_empty()))
        .unwrap_or_default();
    Origin { host: fnv1a(id.trim().as_bytes()), pid: std::process::id() }
});

pub fn local() -> Origin {
    *LOCAL
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_stable_identity() {
        assert_eq!(local(), local());
        assert_eq!(local().pid, std::process::id());
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }
}
