//! Knobs that were removed. An environment that still sets one is told, once per process, what
//! became of it: a setting that silently stops working is worse than a line in the log.

/// Each removed variable and why it is no longer read.
const RETIRED: &[(&str, &str)] = &[
    (
        "UCCL_TCPX_HOST_COPY_STAGING",
        "the shared staging area for same-host host memory was removed (it lost to the direct copies)",
    ),
    (
        "UCCL_TCPX_HOST_COPY_STAGING_BYTES",
        "the shared staging area for same-host host memory was removed (it lost to the direct copies)",
    ),
    (
        "UCCL_TCPX_SOCKET_ZEROCOPY_THRESHOLD",
        "zero-copy socket sends were removed (slower than copies where measured, and never run on a real NIC)",
    ),
];

/// A line for every removed variable that `lookup` has set.
pub(super) fn set_in(lookup: impl Fn(&str) -> Option<String>) -> Vec<String> {
    RETIRED
        .iter()
        .filter(|(name, _)| lookup(name).is_some())
        .map(|(name, why)| format!("{name} is set but no longer read and has no effect: {why}"))
        .collect()
}

/// Logs the environment's removed variables, the first time an engine's settings are read from it.
pub(super) fn report_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for line in set_in(|name| std::env::var(name).ok()) {
            // Error, not warn: the default log level shows errors only, and this must be seen.
            log::error!("{line}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_variable_is_named_with_its_reason_and_others_are_not() {
        let lines = set_in(|name| (name == "UCCL_TCPX_SOCKET_ZEROCOPY_THRESHOLD").then(|| "65536".into()));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("UCCL_TCPX_SOCKET_ZEROCOPY_THRESHOLD is set but no longer read"), "{lines:?}");
        assert!(lines[0].contains("zero-copy"), "{lines:?}");
        assert!(set_in(|_| None).is_empty());
    }

    #[test]
    fn no_removed_variable_is_read_again() {
        use super::super::{Config, SocketConfig, StagingConfig};
        let asked = std::cell::RefCell::new(Vec::new());
        Config::from_lookup(|name| {
            asked.borrow_mut().push(name.to_owned());
            None
        })
        .unwrap();
        let docs = [Config::knob_docs(), SocketConfig::knob_docs(), StagingConfig::knob_docs()];
        assert!(!asked.borrow().is_empty() && docs.iter().all(|d| !d.is_empty()));
        for (name, _) in RETIRED {
            assert!(!asked.borrow().iter().any(|a| a == name), "{name} is retired and still read");
            assert!(docs.iter().flatten().all(|d| d.name != *name), "{name} is retired and still documented");
        }
    }
}
