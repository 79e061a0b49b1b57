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

/// Where a message from `origin` was sent, when that is this host (both ends in this process, or
/// another process here); None from another host.
pub fn same_host_ends(origin: Origin) -> Option<String> {
    let me = local();
    (origin.host == me.host).then(|| match origin.pid == me.pid {
        true => format!("both ends of this connection are this process ({})", me.pid),
        false => format!("the sender (process {}) runs on this host too", origin.pid),
    })
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
