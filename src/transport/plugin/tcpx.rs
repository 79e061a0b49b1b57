//! GPUDirect-TCPX's rules, the profile the plugin driver (`plugin/`) applies over its generic
//! ncclNet v7 calls: what TCPX allows and needs beyond the ABI, each cited to the plugin's source
//! (google/nccl-plugin-gpudirecttcpx; docs/TCPX.md has the full table). A second ncclNet plugin
//! brings a profile of its own; the driver stays as it is.
//!
//! The environment defaults below are TCPX's too: the plugin reads its environment once, in
//! `init`, and they are applied only to variables the user left unset, so a deployment's own
//! tuning always wins.

use super::profile::Profile;
use crate::ncclnet::UNPACK_QUEUE_DEPTH;

/// TCPX, and the fake devmem NIC and mock plugin that stand in for it in tests.
pub const PROFILE: Profile = Profile {
    vendor: "GPUDirect-TCPX",
    // A receive without devmem cmsgs (traffic that never passed a NIC) ends the process:
    // `src/sock/tcpx.h` `process_recv_cmsg`, `src/macro.h` `EXIT_ON_CMSG_ERRORS`.
    reaches_own_host: false,
    // A listen comm serves one accept: `src/net_tcpx.cc` `tcpxAccept_v5`, `tcpxCloseListen`.
    listen_per_channel: true,
    // Comms bind to the device current when made, registrations map through it:
    // `src/gpu/cuda_wrapper.cu` `gpu_current_dev`, `gpu_tx_reg_mr`; `src/common.cc` `tcpxCommNew`.
    binds_gpu: true,
    // The request ring and the unpack queue hold 16 entries, whatever NCCL promises for v7:
    // `src/net_tcpx.cc` `tcpxGetRequest`, `src/work_queue.h` `MAX_REQUESTS`.
    max_requests: UNPACK_QUEUE_DEPTH,
    // `connect` keeps its in-progress state in bytes 80..88 of the handle it is given:
    // `src/connect.cc` `tcpxConnectV5`.
    connect_state: 80..88,
    set_environment: apply_defaults,
    // Its bounce pool's pages and unpack slots go back with `irecvConsumed`: `src/net_tcpx.cc`
    // `tcpxIrecvConsumed`.
    consumes_receives: true,
    // A HOST send is a plain socket send (`src/net_tcpx.cc` `taskProgress`); receives into host
    // memory of a GPU pool's comm go through the landing slots (`landing.rs`).
    host_requests: true,
    // A second `init` of an image fails ("gpu lib init twice"): `src/gpu/cuda_wrapper.cu`
    // `gpu_init`, from `src/net_tcpx.cc` `tcpxInit`.
    init_once_per_image: true,
    init_is_fatal: false,
    libraries: &[],
    agreement: super::profile::nothing,
};

/// `(variable, value, why)`; `UNIX_CLIENT_PREFIX` is added separately because it depends on the host.
pub const DEFAULTS: &[(&str, &str, &str)] = &[
    (
        "NCCL_DYNAMIC_CHUNK_SIZE",
        "524288",
        "the plugin's effective default is 0, which schedules zero-byte tasks forever; 512 KiB spreads a 1 MiB chunk over two sockets",
    ),
    (
        "NCCL_NSOCKS_PERTHREAD",
        "2",
        "two channels per connection x two sockets = 4 per GPU, 8 per NIC shared by two GPUs (the ~8 connections a 200 Gbps NIC needs)",
    ),
    ("NCCL_SOCKET_NTHREADS", "1", "one helper thread drives a comm's sockets; more threads per comm showed no gain"),
    (
        "NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS",
        "500000",
        "the 5 s default stalls every accept; 0.5 s is Google's production value",
    ),
    ("NCCL_GPUDIRECTTCPX_FORCE_ACK", "0", "as Google's tested manifests: no TCP_QUICKACK on every drained queue"),
    (
        "NCCL_GPUDIRECTTCPX_TX_COMPLETION_NANOSLEEP",
        "1000",
        "helper threads nap 1 us between zerocopy-completion polls instead of burning a core (Google's tested value)",
    ),
];

/// RxDM's socket directory on GKE; the plugin's default (/tmp) is wrong there.
pub const RXDM_DIR: &str = "/run/tcpx";
pub const RXDM_PREFIX_VAR: &str = "NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX";

/// The defaults that `lookup` (the environment) does not already set, in order, with the reason.
pub fn missing_defaults(
    lookup: impl Fn(&str) -> Option<String>,
    rxdm_dir_exists: bool,
) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut out: Vec<_> = DEFAULTS.iter().filter(|(name, _, _)| lookup(name).is_none()).copied().collect();
    if rxdm_dir_exists && lookup(RXDM_PREFIX_VAR).is_none() {
        out.push((RXDM_PREFIX_VAR, RXDM_DIR, "RxDM serves its sockets there on GKE; the plugin's default is /tmp"));
    }
    out
}

/// Sets the missing defaults before the plugin's `init`, under the loader's lock.
pub fn apply_defaults() {
    let rxdm = std::path::Path::new(RXDM_DIR).is_dir();
    super::profile::set_missing(|lookup| missing_defaults(lookup, rxdm));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_values_win_and_the_rxdm_prefix_needs_the_directory() {
        let set = |n: &str| (n == "NCCL_NSOCKS_PERTHREAD").then(|| "8".to_owned());
        let without_dir = missing_defaults(set, false);
        assert!(without_dir.iter().all(|(n, _, _)| *n != "NCCL_NSOCKS_PERTHREAD"));
        assert!(without_dir.iter().any(|(n, v, _)| *n == "NCCL_DYNAMIC_CHUNK_SIZE" && *v == "524288"));
        assert!(without_dir.iter().all(|(n, _, _)| *n != RXDM_PREFIX_VAR));
        assert_eq!(without_dir.len(), DEFAULTS.len() - 1);
        let with_dir = missing_defaults(|_| None, true);
        assert_eq!(with_dir.last().map(|(n, v, _)| (*n, *v)), Some((RXDM_PREFIX_VAR, RXDM_DIR)));
        assert!(missing_defaults(|_| Some("x".into()), true).is_empty());
    }

    #[test]
    fn chunk_size_default_is_never_zero() {
        let (_, v, _) = DEFAULTS.iter().find(|(n, _, _)| *n == "NCCL_DYNAMIC_CHUNK_SIZE").expect("present");
        assert!(v.parse::<u64>().unwrap() > 0);
    }

    /// The reference page lists these defaults in prose, outside the knob table it is rendered from.
    #[test]
    fn the_reference_page_lists_every_default() {
        let page = crate::config::reference_page();
        for (name, value) in DEFAULTS.iter().map(|(n, v, _)| (*n, *v)).chain([(RXDM_PREFIX_VAR, RXDM_DIR)]) {
            assert!(page.contains(&format!("`{name}={value}`")), "docs/CONFIG.md does not say {name}={value}");
        }
    }
}
