//! GPUDirect-TCPXO's rules ("FasTrak", A3-Mega), the profile the plugin driver applies over its
//! generic ncclNet v7 calls, each cited to `google/nccl-plugin-gpudirect-tcpxo` v1.0.17 (`fo/` is
//! `tcpdirect_plugin/fastrak_offload/`; docs/TCPXO.md has the full table). No payload passes the
//! host: the NIC's transfer service writes a receive into the posted buffer, so there is no unpack
//! step, and host memory is refused in requests.

use super::profile::Profile;

pub const PROFILE: Profile = Profile {
    vendor: "GPUDirect-TCPXO",
    // Whether the transfer service carries a VM's traffic to itself is not in the source
    // (`dxs/control-command.h` `kNotServingVM`): same-host peers take the socket transport.
    reaches_own_host: false,
    // A listen comm serves one accept ("should not be called in state 3"): `fo/nccl_shim.cc`
    // `Accept` L505.
    listen_per_channel: true,
    // Per-GPU state is found by the current context at init, listen, connect, accept,
    // getProperties and closeListen: `fo/fastrak_plugin.cc` `GetShim` L104.
    binds_gpu: true,
    // The plugin has no bound (`fo/nccl_shim.cc` `GetRequest` L515); NCCL keeps `NCCL_STEPS` (8).
    max_requests: 8,
    // `connect` keeps its stage, state and comm in bytes 88..104 of the handle:
    // `fo/common.h` L92-123, `fo/fastrak_plugin.cc` `Connect` L147-163.
    connect_state: 88..104,
    set_environment: apply_defaults,
    // `irecvConsumed` is NULL in the table: `fo/fastrak_plugin.cc` L377.
    consumes_receives: false,
    // Requests of more than 0 bytes from a HOST registration fail ("from host buffer"), though
    // `ptrSupport` lists HOST: `fo/nccl_shim.cc` `GetRequest` L517-524.
    host_requests: false,
    // `init`'s core runs once per image (`call_once`) and later calls share its outcome:
    // `fo/init.cc` `InitOnce` L104-125, `PluginCoreInit` L140.
    init_once_per_image: false,
    // A failed `init` is `LOG(FATAL)`: `fo/fastrak_plugin.cc` `Init` L73-101.
    init_is_fatal: true,
    // Google's installer renames the plugin and puts a wrapper in `libnccl-net.so`'s place:
    // `tcpxo_scripts/container_entry.sh` `install_nccl_shim` L93.
    libraries: &["libnccl-net_internal.so"],
    // A comm deals its requests round-robin over `NCCL_FASTRAK_NUM_FLOWS` flows and the k-th send
    // must meet the k-th receive on the same flow, each end with its own count (`fo/nccl_shim.cc`
    // `GetRequest` L593-598): ends with different counts refuse each other in the handshake.
    agreement: flows,
};

/// ` flows=N`: the flow count the plugin's `init` takes from `NCCL_FASTRAK_NUM_FLOWS`, an integer
/// 1-8, else 2 (`fo/const_params.h` L102-104, `fo/params.cc` `InitParam` L26-48).
pub fn flows(lookup: super::profile::Lookup<'_>) -> String {
    let set = lookup("NCCL_FASTRAK_NUM_FLOWS").and_then(|v| v.trim().parse::<i64>().ok());
    format!(" flows={}", set.filter(|n| (1..=8).contains(n)).unwrap_or(2))
}

/// Where Google's A3-Mega manifests bind-mount the LLCM devices (`gpudirect-tcpxo/nccl-tcpxo-
/// installer.yaml`, container-engine-accelerators 10c8d237).
pub const LLCM_DIR: &str = "/dev/aperture_devices";

/// The defaults that `lookup` (the environment) does not already set, with the reason: the
/// plugin's own defaults match Google's published configuration but for LLCM, off by default
/// (`fo/const_params.h` L65-163) and on in `tcpxo_scripts/nccl-env-profile.sh` L47-68, which needs
/// its devices (`llcm`: `LLCM_DIR` holds some).
pub fn missing_defaults(
    lookup: impl Fn(&str) -> Option<String>,
    llcm: bool,
) -> Vec<(&'static str, &'static str, &'static str)> {
    const WHY: &str = "LLCM devices are in /dev/aperture_devices, as Google's A3-Mega configuration uses them";
    let wanted = [("NCCL_FASTRAK_USE_LLCM", "1", WHY), ("NCCL_FASTRAK_LLCM_DEVICE_DIRECTORY", LLCM_DIR, WHY)];
    wanted.into_iter().filter(|(name, _, _)| llcm && lookup(name).is_none()).collect()
}

/// Sets the missing defaults before the plugin's `init`, under the loader's lock.
pub fn apply_defaults() {
    let llcm = std::fs::read_dir(LLCM_DIR).is_ok_and(|mut d| d.next().is_some());
    super::profile::set_missing(|lookup| missing_defaults(lookup, llcm));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flow_count_is_what_the_plugin_takes() {
        let with = |v: Option<&str>| flows(&|_: &str| v.map(str::to_owned));
        assert_eq!(with(None), " flows=2");
        for (set, flows) in
            [("4", 4), (" 3 ", 3), ("8", 8), ("1", 1), ("9", 2), ("0", 2), ("-1", 2), ("two", 2), ("", 2)]
        {
            assert_eq!(with(Some(set)), format!(" flows={flows}"), "{set:?}");
        }
    }

    #[test]
    fn llcm_is_turned_on_only_where_its_devices_are_and_the_user_left_it_unset() {
        let names = |v: Vec<(&'static str, &'static str, &'static str)>| -> Vec<(&str, &str)> {
            v.into_iter().map(|(n, v, _)| (n, v)).collect()
        };
        assert!(missing_defaults(|_| None, false).is_empty());
        let all = names(missing_defaults(|_| None, true));
        assert_eq!(all, [("NCCL_FASTRAK_USE_LLCM", "1"), ("NCCL_FASTRAK_LLCM_DEVICE_DIRECTORY", LLCM_DIR)]);
        let user = names(missing_defaults(|n| (n == "NCCL_FASTRAK_USE_LLCM").then(|| "0".to_owned()), true));
        assert_eq!(user, [("NCCL_FASTRAK_LLCM_DEVICE_DIRECTORY", LLCM_DIR)]);
    }
}
