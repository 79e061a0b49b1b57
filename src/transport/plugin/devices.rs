//! The plugin's devices: their properties as the transport traits describe them, and which device
//! each channel uses.

use std::ffi::{CStr, c_char};

use super::abi::{
    NCCL_NET_DEVICE_HOST, NCCL_NET_DEVICE_UNPACK, NCCL_NET_DEVICE_UNPACK_VERSION, NCCL_PTR_CUDA, NCCL_PTR_HOST,
    NcclNetPropertiesV7, UNPACK_QUEUE_DEPTH,
};
use crate::error::{Error, Result};
use crate::transport::Properties;

/// Converts what `getProperties` wrote for device `dev`, refusing what this transport cannot drive.
pub fn from_raw(dev: usize, raw: &NcclNetPropertiesV7) -> Result<Properties> {
    let text = |p: *mut c_char| {
        // SAFETY: the plugin's properties point at NUL-terminated strings it keeps alive (static
        // interface names and sysfs paths), or are NULL.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let name = text(raw.name).unwrap_or_else(|| format!("device {dev}"));
    let ctx = |what: String| Error::backend(format!("net plugin device {dev} ({name}): {what}"));
    let supports_host = raw.ptr_support & NCCL_PTR_HOST != 0;
    let supports_cuda = raw.ptr_support & NCCL_PTR_CUDA != 0;
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
        // TCPX's request ring and unpack queue both have 16 entries, whatever NCCL promises for v7.
        max_requests: UNPACK_QUEUE_DEPTH,
    })
}

/// Device indices in order of PCI closeness to the GPU at `gpu_pci_path` (a sysfs path such as
/// `/sys/devices/pci0000:01/0000:01:00.0/.../0000:04:00.0`): the longer the shared path prefix (in
/// whole components), the closer. Ties keep the plugin's order; devices without a PCI path go last.
/// Without a GPU path the plugin's order stands.
pub fn order_by_pci_distance(pci_paths: &[Option<&str>], gpu_pci_path: Option<&str>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pci_paths.len()).collect();
    if let Some(gpu) = gpu_pci_path {
        let closeness = |dev: usize| pci_paths[dev].map_or(0, |nic| common_components(nic, gpu) + 1);
        order.sort_by_key(|&dev| std::cmp::Reverse(closeness(dev)));
    }
    order
}

fn common_components(a: &str, b: &str) -> usize {
    let parts = |s| str::split(s, '/').filter(|c: &&str| !c.is_empty());
    parts(a).zip(parts(b)).take_while(|(x, y)| x == y).count()
}

/// The device list channels rotate over: the explicit one (`UCCL_TCPX_NET_DEVICES`), checked against
/// the plugin's device count, else every device ordered by closeness to the GPU.
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
    let paths: Vec<Option<&str>> = props.iter().map(|p| p.pci_path.as_deref()).collect();
    Ok(order_by_pci_distance(&paths, gpu_pci_path))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let p = from_raw(0, &r).unwrap();
        assert_eq!(p.name, "eth1");
        assert_eq!(p.pci_path.as_deref(), Some("/sys/devices/pci0000:01/0000:06:00.0"));
        assert!(p.supports_host && p.supports_cuda && p.device_unpack);
        assert_eq!((p.speed_mbps, p.max_requests), (200_000, 16));

        let host = from_raw(1, &raw(1, 0, 0)).unwrap();
        assert_eq!(host.name, "device 1");
        assert!(!host.device_unpack && !host.supports_cuda && host.pci_path.is_none());

        for (bad, why) in [
            (raw(0, 0, 0), "neither host nor CUDA"),
            (raw(3, 1, 6), "type 1 version 6"),
            (raw(3, 2, 7), "type 2"),
            (NcclNetPropertiesV7 { max_recvs: 0, ..raw(1, 0, 0) }, "maxRecvs 0"),
        ] {
            let err = from_raw(2, &bad).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains("device 2"), "{err}");
        }
    }

    #[test]
    fn closest_nic_first_by_whole_path_components() {
        let paths = [
            Some("/sys/devices/pci0000:07/0000:07:00.0/0000:0c:00.0"),
            Some("/sys/devices/pci0000:01/0000:01:00.0/0000:06:00.0"),
            None,
            Some("/sys/devices/pci0000:0/0000:01:00.0"),
        ];
        let gpu = "/sys/devices/pci0000:01/0000:01:00.0/0000:04:00.0";
        assert_eq!(order_by_pci_distance(&paths, Some(gpu)), vec![1, 0, 3, 2]);
        assert_eq!(order_by_pci_distance(&paths, None), vec![0, 1, 2, 3]);
        // "pci0000:0" is a string prefix of "pci0000:01" but not the same component.
        assert_eq!(common_components(paths[3].unwrap(), gpu), 2);
    }

    #[test]
    fn explicit_device_lists_are_checked() {
        let p = from_raw(0, &raw(1, 0, 0)).unwrap();
        let props = vec![p.clone(), p];
        assert_eq!(channel_devices(Some(&[1, 0, 1]), &props, None).unwrap(), vec![1, 0, 1]);
        let err = channel_devices(Some(&[2]), &props, None).unwrap_err().to_string();
        assert!(err.contains("UCCL_TCPX_NET_DEVICES") && err.contains("device 2"), "{err}");
        assert_eq!(channel_devices(None, &props, None).unwrap(), vec![0, 1]);
    }
}
