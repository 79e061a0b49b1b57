//! This engine's host identity: the kernel's boot id, else the machine id, the network namespace's
//! inode, the process id. Read once per process; an identity that cannot be read is all zero, which
//! makes every peer remote rather than guessing.

use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

use crate::proto::HostIdentity;

/// The identity to announce; all zero when same-host paths are disabled, so neither end of the
/// connection takes it for local.
pub fn own_identity(disabled: bool) -> HostIdentity {
    if disabled {
        return HostIdentity::default();
    }
    static OWN: OnceLock<HostIdentity> = OnceLock::new();
    *OWN.get_or_init(|| {
        let boot_id = ["/proc/sys/kernel/random/boot_id", "/etc/machine-id"]
            .iter()
            .find_map(|path| std::fs::read_to_string(path).ok().and_then(|s| parse_id(&s)));
        let netns = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
        match (boot_id, netns) {
            (Some(boot_id), Some(netns)) => HostIdentity { boot_id, netns, pid: std::process::id() },
            _ => {
                log::warn!("cannot read this host's boot id or network namespace: every peer is treated as remote");
                HostIdentity::default()
            }
        }
    })
}

/// 32 hex digits, dashes ignored (the boot id is a dashed UUID, the machine id is bare).
fn parse_id(text: &str) -> Option<[u8; 16]> {
    let digits: Vec<u8> = text.trim().bytes().filter(|&b| b != b'-').collect();
    if digits.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    (out != [0u8; 16]).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_dashed_or_bare_and_reject_the_rest() {
        let want = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
        assert_eq!(parse_id("12345678-9abc-def0-0123-456789abcdef\n"), Some(want));
        assert_eq!(parse_id("123456789abcdef00123456789abcdef"), Some(want));
        assert_eq!(parse_id("123456789abcdef00123456789abcde"), None);
        assert_eq!(parse_id("123456789abcdef00123456789abcdeg"), None);
        assert_eq!(parse_id(&"0".repeat(32)), None);
    }

    #[test]
    fn own_identity_is_known_here_and_zero_when_disabled() {
        let id = own_identity(false);
        assert!(!id.is_unknown(), "this test host has /proc and a boot id");
        assert_eq!(id.pid, std::process::id());
        assert!(id.same_host(&own_identity(false)));
        assert!(own_identity(true).is_unknown());
    }
}
