//! Knobs that were removed. An environment that still sets one is told, once per process, what
//! became of it: a setting that silently stops working is worse than a line in the log.

const TRACE: &str = "the five tracers became one, behind UCCL_TCPX_TRACE=[categories:]<prefix> (docs/TRACE.md)";

/// Each removed variable and why it is no longer read.
pub(super) const RETIRED: &[(&str, &str)] = &[
    (
        "UCCL_TCPX_HOST_COPY_STAGING",
        "the shared staging area for same-host host memory was removed (it lost to the direct copies)",
    ),
    (
        "UCCL_TCPX_HOST_COPY_STAGING_BYTES",
        "the shared staging area for same-host host memory was removed (it lost to the direct copies)",
    ),
    ("UCCL_TCPX_TRACE_DEVICE_COPY", TRACE),
    ("UCCL_TCPX_TRACE_HOST_COPY", TRACE),
    ("UCCL_TCPX_TRACE_FLOW", TRACE),
    ("UCCL_TCPX_TRACE_SOCKETS", TRACE),
    ("UCCL_TCPX_TRACE_STAGING", TRACE),
    (
        "UCCL_TCPX_STAGING_PIPELINE",
        "pipelined staging was removed (it gained only at 4 MiB with one transfer in flight)",
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
}
