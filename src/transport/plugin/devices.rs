//! The plugin's devices: their properties as the transport traits describe them, and which device
//! each channel uses.

use std::ffi::{CStr, c_char};

use super::profile::Profile;
use crate::error::{Error, Result, UcclStatus};
use crate::ncclnet::{
    NCCL_NET_DEVICE_HOST, NCCL_NET_DEVICE_UNPACK, NCCL_NET_DEVICE_UNPACK_VERSION, NCCL_PTR_CUDA, NCCL_PTR_HOST,
    NcclNetPropertiesV7,
};
use crate::transport::Properties;

/// Converts what `getProperties` wrote for device `dev` of a plugin under `profile`, refusing what
/// this transport cannot drive.
pub fn from_raw(dev: usize, raw: &NcclNetPropertiesV7, profile: &Profile) -> Result<Properties> {
    let text = |p: *mut c_char| {
        // SAFETY: the plugin's properties point at NUL-terminated strings it keeps alive (static
        // interface names and sysfs paths), or are NULL.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let name = text(raw.name).unwrap_or_else(|| format!("device {dev}"));
    let ctx = |what: String| Error::backend(format!("net plugin device {dev} ({name}): {what}"));
    let supports_cuda = raw.ptr_support & NCCL_PTR_CUDA != 0;
    // HOST in `ptrSupport` but refused in requests (TCPXO): host memory goes through a GPU buffer
    // (`CommCore::stages_host`), where there is a GPU.
    let supports_host =
        raw.ptr_support & NCCL_PTR_HOST != 0 && (profile.host_requests || supports_cuda && crate::cuda::available());
    if !supports_host && !supports_cuda {
        return Err(ctx(format!("supports neither host nor CUDA memory (ptrSupport {:#x})", raw.ptr_support)));
    }
    if raw.max_recvs < 1 {
        return Err(ctx(format!("reports maxRecvs {}", raw.max_recvs)));
    }
    let device_unpack = match (raw.net_device_type, raw.net_device_version) {
        (NCCL_NET_DEVICE_HOST, _) => false,
        (NCCL_NET_DEVICE_UNPACK, NCCL_NET_DEVICE_UNPACK_VERSION) => true,
        (ty, ver) => return Err(ctx(format!("unsupported net device type {ty} version {ver}"))),
    };
    Ok(Properties {
        pci_path: text(raw.pci_path),
        name,
        supports_host,
        supports_cuda,
        speed_mbps: raw.speed.max(0) as u32,
        device_unpack,
        // The vendor's bound (TCPX's 16), whatever NCCL promises for v7.
        max_requests: profile.max_requests,
    })
}

/// The devices closest to the GPU at `gpu_pci_path` (its sysfs path, such as
/// `/sys/devices/pci0000:01/0000:01:00.0/.../0000:04:00.0`), in the plugin's order: NCCL's rule.
/// Only devices with CUDA pointer support count, and only those under the GPU's own PCI root (TCPX
/// flow-steers a comm's receives to the GPU's memory through its NIC's queues, which RxDM binds to
/// the GPUs behind that NIC, and a NIC across the host bridge never lands in that GPU's pool); of
/// those, the ones sharing the longest path with the GPU (the same switch before the same root).
pub fn closest_devices(props: &[Properties], gpu_pci_path: &str) -> Result<Vec<usize>> {
    let gpu_root = pci_root(gpu_pci_path);
    let closeness = |p: &Properties| -> Option<usize> {
        let path = p.pci_path.as_deref()?;
        (p.supports_cuda && gpu_root.is_some() && pci_root(path) == gpu_root)
            .then(|| common_components(path, gpu_pci_path))
    };
    let best = props.iter().filter_map(closeness).max().ok_or_else(|| {
        let seen: Vec<String> = props
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let cuda = if p.supports_cuda { "" } else { ", no CUDA pointers" };
                format!("{i} {} at {}{cuda}", p.name, p.pci_path.as_deref().unwrap_or("no PCI path"))
            })
            .collect();
        Error::new(
            UcclStatus::ErrNotFound,
            format!(
                "no net device with CUDA pointer support sits under the PCI root of the GPU at {gpu_pci_path} \
                 (devices: {}); set UCCL_TCPX_NET_DEVICES to choose devices anyway",
                seen.join("; ")
            ),
        )
    })?;
    Ok((0..props.len()).filter(|&i| closeness(&props[i]) == Some(best)).collect())
}

/// The PCI root complex a sysfs device path lies under (`pci0000:01`), if it names one.
fn pci_root(path: &str) -> Option<&str> {
    path.split('/').find(|c| c.starts_with("pci"))
}

fn common_components(a: &str, b: &str) -> usize {
    let parts = |s| str::split(s, '/').filter(|c: &&str| !c.is_empty());
    parts(a).zip(parts(b)).take_while(|(x, y)| x == y).count()
}

/// The device list channels rotate over: the explicit one (`UCCL_TCPX_NET_DEVICES`), checked against
/// the plugin's device count, else the devices closest to the GPU when its PCI path is known, else
/// every device.
pub fn channel_devices(
    explicit: Option<&[usize]>,
    props: &[Properties],
    gpu_pci_path: Option<&str>,
) -> Result<Vec<usize>> {
    if let Some(list) = explicit {
        if let Some(bad) = list.iter().find(|d| **d >= props.len()) {
            return Err(Error::invalid(format!(
                "UCCL_TCPX_NET_DEVICES names device {bad}, but the net plugin has {} devices",
                props.len()
            )));
        }
        if list.is_empty() {
            return Err(Error::invalid("UCCL_TCPX_NET_DEVICES is empty"));
        }
        return Ok(list.to_vec());
    }
    match gpu_pci_path {
        Some(gpu) => closest_devices(props, gpu),
        None => Ok((0..props.len()).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::plugin::{tcpx::PROFILE as TCPX, tcpxo::PROFILE as TCPXO};

    fn raw(ptr: i32, ty: i32, ver: i32) -> NcclNetPropertiesV7 {
        NcclNetPropertiesV7 {
            ptr_support: ptr,
            net_device_type: ty,
            net_device_version: ver,
            max_recvs: 1,
            speed: 200_000,
            ..Default::default()
        }
    }

    #[test]
    fn converts_properties_and_refuses_unusable_devices() {
        let name = c"eth1";
        let path = c"/sys/devices/pci0000:01/0000:06:00.0";
        let mut r = raw(3, 1, 7);
        r.name = name.as_ptr().cast_mut();
        r.pci_path = path.as_ptr().cast_mut();
        let p = from_raw(0, &r, &TCPX).unwrap();
        assert_eq!(p.name, "eth1");
        assert_eq!(p.pci_path.as_deref(), Some("/sys/devices/pci0000:01/0000:06:00.0"));
        assert!(p.supports_host && p.supports_cuda && p.device_unpack);
        assert_eq!((p.speed_mbps, p.max_requests), (200_000, 16));

        let host = from_raw(1, &raw(1, 0, 0), &TCPX).unwrap();
        assert_eq!(host.name, "device 1");
        assert!(!host.device_unpack && !host.supports_cuda && host.pci_path.is_none());

        // TCPXO: HOST|CUDA in `ptrSupport`, a HOST device, host memory refused in requests, so
        // staged through the GPU where there is one.
        let xo = from_raw(0, &raw(3, 0, 0), &TCPXO).unwrap();
        assert!(xo.supports_cuda && !xo.device_unpack);
        assert_eq!(xo.supports_host, crate::cuda::available());
        assert_eq!(xo.max_requests, TCPXO.max_requests);
        let err = from_raw(0, &raw(1, 0, 0), &TCPXO).unwrap_err().to_string();
        assert!(err.contains("neither host nor CUDA"), "host pointers alone are no use to TCPXO: {err}");

        for (bad, why) in [
            (raw(0, 0, 0), "neither host nor CUDA"),
            (raw(3, 1, 6), "type 1 version 6"),
            (raw(3, 2, 7), "type 2"),
            (NcclNetPropertiesV7 { max_recvs: 0, ..raw(1, 0, 0) }, "maxRecvs 0"),
        ] {
            let err = from_raw(2, &bad, &TCPX).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains("device 2"), "{err}");
        }
    }

    fn nic(name: &str, path: Option<&str>, cuda: bool) -> Properties {
        Properties {
            name: name.into(),
            pci_path: path.map(str::to_owned),
            supports_host: true,
            supports_cuda: cuda,
            speed_mbps: 200_000,
            device_unpack: true,
            max_requests: 16,
        }
    }

    #[test]
    fn only_the_closest_cuda_capable_devices_under_the_gpus_root() {
        // A3 High: two GPUs and one NIC per PCI root, eth0 (no devmem) elsewhere.
        let props = [
            nic("eth0", Some("/sys/devices/pci0000:00/0000:00:04.0"), true),
            nic("eth1", Some("/sys/devices/pci0000:01/0000:01:00.0/0000:02:00.0/0000:06:00.0"), true),
            nic("eth2", Some("/sys/devices/pci0000:07/0000:07:00.0/0000:08:00.0/0000:0c:00.0"), true),
            nic("eth1b", Some("/sys/devices/pci0000:01/0000:01:00.0/0000:03:00.0/0000:09:00.0"), true),
            nic("veth", None, true),
        ];
        let gpu0 = "/sys/devices/pci0000:01/0000:01:00.0/0000:02:00.0/0000:04:00.0";
        assert_eq!(closest_devices(&props, gpu0).unwrap(), vec![1], "the NIC behind the GPU's own switch");
        let gpu2 = "/sys/devices/pci0000:07/0000:07:00.0/0000:08:00.0/0000:0a:00.0";
        assert_eq!(closest_devices(&props, gpu2).unwrap(), vec![2]);
        // Two equally close NICs: channels spread over both.
        let gpu_between = "/sys/devices/pci0000:01/0000:01:00.0/0000:05:00.0/0000:0b:00.0";
        assert_eq!(closest_devices(&props, gpu_between).unwrap(), vec![1, 3]);
        assert_eq!(channel_devices(None, &props, Some(gpu_between)).unwrap(), vec![1, 3]);

        // A GPU whose root holds no NIC, or only one without CUDA pointers: a clear error.
        let lonely = "/sys/devices/pci0000:81/0000:81:00.0/0000:84:00.0";
        let err = closest_devices(&props, lonely).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrNotFound);
        assert!(err.message().contains(lonely) && err.message().contains("UCCL_TCPX_NET_DEVICES"), "{err}");
        assert!(err.message().contains("1 eth1 at /sys/devices/pci0000:01"), "{err}");
        let mut no_cuda = props.clone();
        no_cuda[1].supports_cuda = false;
        no_cuda[3].supports_cuda = false;
        let err = closest_devices(&no_cuda, gpu0).unwrap_err().to_string();
        assert!(err.contains("no CUDA pointers"), "{err}");

        // "pci0000:0" is a string prefix of "pci0000:01" but not the same root.
        let near_miss = [nic("x", Some("/sys/devices/pci0000:0/0000:01:00.0"), true)];
        assert!(closest_devices(&near_miss, gpu0).is_err());
        // Without a GPU path, every device in the plugin's order.
        assert_eq!(channel_devices(None, &props, None).unwrap(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn explicit_device_lists_are_checked() {
        let p = from_raw(0, &raw(1, 0, 0), &TCPX).unwrap();
        let props = vec![p.clone(), p];
        assert_eq!(channel_devices(Some(&[1, 0, 1]), &props, None).unwrap(), vec![1, 0, 1]);
        let err = channel_devices(Some(&[2]), &props, None).unwrap_err().to_string();
        assert!(err.contains("UCCL_TCPX_NET_DEVICES") && err.contains("device 2"), "{err}");
        assert_eq!(channel_devices(None, &props, None).unwrap(), vec![0, 1]);
    }
}
