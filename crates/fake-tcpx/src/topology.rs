//! The fake's devices, shaped like A3's NICs: each has its own interface name, address and PCI path
//! (what TCPX reports: `realpath(/sys/class/net/<if>/device)`, `connect.cc` `tcpxGetPciPath`), and
//! devmem rx queues bound to the bounce pools of particular GPUs, the ones behind its PCI switch
//! (RxDM installs a flow's steering rule on the NIC of the GPU it names, `tcpgpudmarxd`
//! `src/rx_rule_manager.cc` `ConfigFlowSteering`). A flow that arrives over another NIC is never
//! steered: its payload lands in host memory and TCPX exits at the first devmem receive. Like A3's
//! `eth0`, which TCPX lists when `NCCL_GPUDIRECTTCPX_SOCKET_IFNAME` is unset, a device may have no
//! devmem queues at all.
//!
//! Devices come from `FAKE_TCPX_TOPOLOGY`, else from a default that places eth1.. next to the GPUs
//! (GPU mode: the host's real ones, as sysfs places them; host mode: A3 High's layout) and eth0,
//! without devmem, under a PCI root of its own. They are sorted by name and filtered by
//! `NCCL_GPUDIRECTTCPX_SOCKET_IFNAME` as TCPX sorts and filters interfaces
//! (`misc/socket_utils.cc` `findInterfaces`, `sortInterfaces`).

use std::net::{IpAddr, Ipv4Addr};

/// TCPX's `MAX_IFS` and `MAX_IF_NAME_SIZE` (with its NUL), `macro.h`.
pub const MAX_DEVICES: usize = 16;
const MAX_NAME: usize = 15;

/// Which GPUs' pools a device's devmem rx queues are bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Devmem {
    /// None (A3's eth0): nothing it receives is steered into GPU memory.
    None,
    /// Every GPU's (`*` in the topology).
    AnyGpu,
    /// These GPUs' (PCI bus ids, lower case, `0000:04:00.0`).
    Gpus(Vec<String>),
}

impl Devmem {
    /// Whether flows over this device land in the pool of the GPU with `bus_id`; `None`: the comm
    /// has no GPU (host mode), where only a device without devmem fails.
    pub fn serves(&self, bus_id: Option<&str>) -> bool {
        match (self, bus_id) {
            (Devmem::None, _) => false,
            (Devmem::AnyGpu, _) | (Devmem::Gpus(_), None) => true,
            (Devmem::Gpus(list), Some(id)) => list.iter().any(|g| g == id),
        }
    }
}

/// A device as a topology lists it, before addresses are given out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicSpec {
    pub name: String,
    pub addr: Option<IpAddr>,
    pub pci_path: String,
    pub devmem: Devmem,
}

/// A device the fake reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    pub name: String,
    pub addr: IpAddr,
    pub pci_path: String,
    pub devmem: Devmem,
}

/// `FAKE_TCPX_TOPOLOGY`: devices separated by `;`, each `NAME[@ADDRESS] PCI_PATH [GPUS]`, where
/// GPUS is `*` or a comma-separated list of GPU PCI bus ids whose pools its devmem queues serve,
/// and a device without GPUS has no devmem.
pub fn parse(spec: &str) -> Result<Vec<NicSpec>, String> {
    let mut nics: Vec<NicSpec> = Vec::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let fields: Vec<&str> = entry.split_whitespace().collect();
        let (id, pci_path, gpus) = match fields[..] {
            [id, path] => (id, path, None),
            [id, path, gpus] => (id, path, Some(gpus)),
            _ => return Err(format!("{entry:?}: expected NAME[@ADDRESS] PCI_PATH [GPUS]")),
        };
        let (name, addr) = match id.split_once('@') {
            Some((name, addr)) => {
                let addr = addr.parse().map_err(|_| format!("{entry:?}: {addr:?} is not an IP address"))?;
                (name, Some(addr))
            }
            None => (id, None),
        };
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(format!("{entry:?}: an interface name has 1 to {MAX_NAME} characters"));
        }
        if nics.iter().any(|n| n.name == name) {
            return Err(format!("{entry:?}: {name} is listed twice"));
        }
        check_pci_path(pci_path).map_err(|why| format!("{entry:?}: {why}"))?;
        let devmem = match gpus {
            None => Devmem::None,
            Some("*") => Devmem::AnyGpu,
            Some(list) => Devmem::Gpus(
                list.split(',')
                    .map(|g| bus_id(g).ok_or_else(|| format!("{entry:?}: {g:?} is not a PCI bus id like 0000:04:00.0")))
                    .collect::<Result<_, _>>()?,
            ),
        };
        nics.push(NicSpec { name: name.to_owned(), addr, pci_path: pci_path.to_owned(), devmem });
    }
    if nics.is_empty() || nics.len() > MAX_DEVICES {
        return Err(format!("lists {} devices, expected 1 to {MAX_DEVICES}", nics.len()));
    }
    Ok(nics)
}

/// A sysfs device path whose last component is a PCI address, which TCPX's CUDA regMr parses with
/// `sscanf("0000:%hx:%hx.%hx")` (`gpu/tx_pool.cu`).
fn check_pci_path(path: &str) -> Result<(), String> {
    let last = path.rsplit('/').next().unwrap_or_default();
    if !path.starts_with("/sys/devices/pci") || bus_id(last).is_none() {
        return Err(format!(
            "{path:?} is not a sysfs PCI device path ending in its address, like /sys/devices/pci0000:01/0000:01:00.0"
        ));
    }
    Ok(())
}

/// `dddd:bb:dd.f` in hex, lower-cased; `None` if `s` is not one.
fn bus_id(s: &str) -> Option<String> {
    let hex = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit());
    let mut parts = s.split([':', '.']);
    let ok = [4, 2, 2, 1].iter().all(|&n| parts.next().is_some_and(|p| hex(p, n))) && parts.next().is_none();
    ok.then(|| s.to_ascii_lowercase())
}

/// A3 High's PCI roots of its four GPU NICs (each with two GPUs), the first roots of the host-mode
/// layout; further NICs continue below pci0000:81.
const A3_ROOTS: [u16; 4] = [0x01, 0x07, 0x81, 0x87];

fn host_root(i: usize) -> u16 {
    A3_ROOTS.get(i).copied().unwrap_or_else(|| 0x0d + 6 * (i as u16 - 4))
}

/// A device without devmem, A3's eth0, at `root` (a PCI root no GPU sits under).
fn eth0(root: &str) -> NicSpec {
    let domain = &root["pci".len()..root.len() - 3];
    let bus = &root[root.len() - 2..];
    NicSpec {
        name: "eth0".into(),
        addr: None,
        pci_path: format!("/sys/devices/{root}/{domain}:{bus}:04.0"),
        devmem: Devmem::None,
    }
}

/// Host mode's default: eth0 without devmem under pci0000:00, and `n` NICs eth1.. each under a PCI
/// root of its own as on A3 High (root `rr`: switch port `rr+1`, GPUs `rr+3` and `rr+4`, NIC
/// `rr+5`), whose queues serve those two GPUs.
pub fn host_default(n: usize) -> Vec<NicSpec> {
    let mut nics = vec![eth0("pci0000:00")];
    for i in 0..n {
        let r = host_root(i);
        let switch = format!("/sys/devices/pci0000:{r:02x}/0000:{r:02x}:00.0/0000:{:02x}:00.0", r + 1);
        nics.push(NicSpec {
            name: format!("eth{}", i + 1),
            addr: None,
            pci_path: format!("{switch}/0000:{:02x}:00.0", r + 5),
            devmem: Devmem::Gpus(vec![format!("0000:{:02x}:00.0", r + 3), format!("0000:{:02x}:00.0", r + 4)]),
        });
    }
    nics
}

/// Where a GPU of this host sits: its PCI bus id and, where sysfs shows it, its device path.
#[derive(Clone, Debug)]
pub struct GpuPlace {
    pub bus_id: String,
    pub sysfs: Option<String>,
}

impl GpuPlace {
    /// The directory the GPU sits in: its switch (or root) in sysfs, else a root made up from its
    /// bus, one per bus.
    fn parent(&self) -> String {
        match self.sysfs.as_deref().and_then(|p| p.rsplit_once('/')) {
            Some((parent, _)) => parent.to_owned(),
            None => format!("/sys/devices/pci{}", &self.bus_id[..7]),
        }
    }
}

/// GPU mode's default: the GPUs grouped by the switch they sit under (as A3 puts two GPUs and
/// their NIC behind one switch), NIC `eth{i+1}` next to group `i mod groups` serving its GPUs,
/// one NIC per group unless `n` says how many, and eth0 without devmem under a PCI root no GPU
/// sits under.
pub fn gpu_default(n: Option<usize>, gpus: &[GpuPlace]) -> Vec<NicSpec> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for g in gpus {
        let parent = g.parent();
        match groups.iter_mut().find(|(p, _)| *p == parent) {
            Some((_, ids)) => ids.push(g.bus_id.clone()),
            None => groups.push((parent, vec![g.bus_id.clone()])),
        }
    }
    let roots: Vec<&str> = groups.iter().filter_map(|(p, _)| p.split('/').find(|c| c.starts_with("pci"))).collect();
    let free_root = ["pci0000:00".to_owned()]
        .into_iter()
        .chain((0..=0xffu16).rev().map(|b| format!("pci0000:{b:02x}")))
        .find(|r| !roots.contains(&r.as_str()))
        .unwrap_or_else(|| "pci0001:00".to_owned());
    let mut nics = vec![eth0(&free_root)];
    for i in 0..n.unwrap_or(groups.len()) {
        let Some((parent, ids)) = groups.get(i % groups.len().max(1)) else { break };
        // Several NICs of one switch get functions 7, 6, .. of device 1f, then of 1e.
        let k = i / groups.len();
        let first = &ids[0];
        nics.push(NicSpec {
            name: format!("eth{}", i + 1),
            addr: None,
            pci_path: format!("{parent}/{}:{:02x}.{}", &first[..7], 0x1f - k / 8, 7 - k % 8),
            devmem: Devmem::Gpus(ids.clone()),
        });
    }
    nics
}

/// The devices as reported: sorted by name, given addresses (the listed one, else `base`, and on
/// IPv4 loopback `base` plus the device's place, so that each has its own), and filtered by the
/// interface list `ifname` names (the variable and its value: prefixes, `^` excludes, `=` matches
/// exactly; `NCCL_GPUDIRECTTCPX_SOCKET_IFNAME` for TCPX, TCPXO's the same way, `fo/utilities.h`
/// `findInterfaces` L186-195).
pub fn finish(mut specs: Vec<NicSpec>, base: IpAddr, ifname: Option<(&str, &str)>) -> Result<Vec<Nic>, String> {
    let (var, ifname) = match ifname {
        Some((var, list)) => (var, Some(list)),
        None => ("", None),
    };
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let mut nics = Vec::with_capacity(specs.len());
    for (i, s) in specs.into_iter().enumerate() {
        let addr = match (s.addr, base) {
            (Some(a), _) => a,
            (None, IpAddr::V4(v4)) if v4.is_loopback() => {
                let [a, b, c, d] = v4.octets();
                let last = d.checked_add(i as u8).ok_or_else(|| {
                    format!("FAKE_TCPX_IP={base} leaves no loopback address for device {i} ({})", s.name)
                })?;
                IpAddr::V4(Ipv4Addr::new(a, b, c, last))
            }
            (None, _) => base,
        };
        if ifname.is_none_or(|list| selected(&s.name, list)) {
            nics.push(Nic { name: s.name, addr, pci_path: s.pci_path, devmem: s.devmem });
        }
    }
    if nics.is_empty() {
        return Err(format!("no interface found: {var}={} matches no device", ifname.unwrap_or("")));
    }
    Ok(nics)
}

/// TCPXO's device order: by the PCI address that ends each device's path (`fo/common.cc`
/// `initializeNetIfs` L122-137), where TCPX's is by name.
pub fn sort_by_pci_address(nics: &mut [Nic]) {
    nics.sort_by(|a, b| a.pci_path.rsplit('/').next().cmp(&b.pci_path.rsplit('/').next()));
}

/// TCPX's interface match (`misc/socket_utils.cc` `findInterfaces`, `matchIfList`): a list of
/// prefixes, all exact after a leading `=`, all excluded after a leading `^`.
fn selected(name: &str, list: &str) -> bool {
    let (not, list) = list.strip_prefix('^').map_or((false, list), |l| (true, l));
    let (exact, list) = list.strip_prefix('=').map_or((false, list), |l| (true, l));
    let items: Vec<&str> =
        list.split(',').map(|i| i.split(':').next().unwrap_or_default()).filter(|i| !i.is_empty()).collect();
    let hit = items.is_empty() || items.iter().any(|i| if exact { name == *i } else { name.starts_with(i) });
    hit != not
}

#[cfg(test)]
mod tests {
    use super::*;

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn parses_a_topology() {
        let nics = parse(
            "eth1@10.0.0.2 /sys/devices/pci0000:01/0000:01:00.0/0000:06:00.0 0000:04:00.0,0000:05:00.0; \
             eth0 /sys/devices/pci0000:00/0000:00:04.0;  eth2 /sys/devices/pci0000:07/0000:07:00.0 *",
        )
        .unwrap();
        assert_eq!(nics[0].name, "eth1");
        assert_eq!(nics[0].addr, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(nics[0].devmem, Devmem::Gpus(vec!["0000:04:00.0".into(), "0000:05:00.0".into()]));
        assert_eq!((nics[1].addr, &nics[1].devmem), (None, &Devmem::None));
        assert_eq!(nics[2].devmem, Devmem::AnyGpu);
        for (bad, why) in [
            ("", "0 devices"),
            ("eth1", "expected NAME"),
            ("eth1 /sys/devices/pci0000:01/0000:01:00.0 a b", "expected NAME"),
            ("eth1@x /sys/devices/pci0000:01/0000:01:00.0", "not an IP"),
            ("averyveryverylongname /sys/devices/pci0000:01/0000:01:00.0", "1 to 15"),
            ("eth1 /sys/devices/pci0000:01/0000:01:00.0; eth1 /sys/devices/pci0000:02/0000:02:00.0", "twice"),
            ("eth1 /tmp/0000:01:00.0", "sysfs PCI device path"),
            ("eth1 /sys/devices/pci0000:01/eth1", "sysfs PCI device path"),
            ("eth1 /sys/devices/pci0000:01/0000:01:00.0 04:00.0", "PCI bus id"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let many: Vec<String> = (0..17).map(|i| format!("e{i} /sys/devices/pci0000:01/0000:01:00.0")).collect();
        assert!(parse(&many.join(";")).unwrap_err().contains("17 devices"));
    }

    #[test]
    fn sorted_addressed_and_filtered_as_tcpx_lists_interfaces() {
        let nics = finish(host_default(2), LO, None).unwrap();
        let names: Vec<&str> = nics.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth1", "eth2"]);
        let addrs: Vec<String> = nics.iter().map(|n| n.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1", "127.0.0.2", "127.0.0.3"], "each device has its own address");
        assert_eq!(nics[0].devmem, Devmem::None);
        assert_eq!(nics[1].pci_path, "/sys/devices/pci0000:01/0000:01:00.0/0000:02:00.0/0000:06:00.0");
        assert_eq!(nics[1].devmem, Devmem::Gpus(vec!["0000:04:00.0".into(), "0000:05:00.0".into()]));
        assert_eq!(nics[2].pci_path, "/sys/devices/pci0000:07/0000:07:00.0/0000:08:00.0/0000:0c:00.0");

        // A host address is shared by every device that lists none.
        let host: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(finish(host_default(2), host, None).unwrap().iter().all(|n| n.addr == host));
        assert!(finish(host_default(2), "127.0.0.254".parse().unwrap(), None).unwrap_err().contains("no loopback"));

        let names = |filter| -> Vec<String> {
            finish(host_default(3), LO, Some(("LIST", filter)))
                .map(|n| n.into_iter().map(|n| n.name).collect())
                .unwrap_or_default()
        };
        assert_eq!(names("eth1,eth2"), ["eth1", "eth2"]);
        assert_eq!(names("^eth0"), ["eth1", "eth2", "eth3"]);
        assert_eq!(names("eth"), ["eth0", "eth1", "eth2", "eth3"], "a prefix");
        assert_eq!(names("=eth"), Vec::<String>::new());
        assert_eq!(names("=eth3,eth1"), ["eth1", "eth3"]);
        assert!(finish(host_default(1), LO, Some(("LIST", "ib"))).unwrap_err().contains("no interface found: LIST=ib"));
        // The filtered list keeps the addresses of the whole one.
        let kept = finish(host_default(2), LO, Some(("LIST", "^eth0"))).unwrap();
        assert_eq!(kept[0].addr.to_string(), "127.0.0.2");
    }

    #[test]
    fn tcpxo_orders_devices_by_pci_address() {
        let spec = "b /sys/devices/pci0000:01/0000:01:00.0/0000:09:00.0; a /sys/devices/pci0000:81/0000:86:00.0; \
                    c /sys/devices/pci0000:00/0000:00:04.0";
        let mut nics = finish(parse(spec).unwrap(), LO, None).unwrap();
        sort_by_pci_address(&mut nics);
        let got: Vec<(&str, String)> = nics.iter().map(|n| (n.name.as_str(), n.addr.to_string())).collect();
        assert_eq!(got, [("c", "127.0.0.3".into()), ("b", "127.0.0.2".into()), ("a", "127.0.0.1".into())]);
    }

    #[test]
    fn gpu_default_puts_a_nic_next_to_each_switch_of_gpus() {
        let place = |id: &str, path: Option<&str>| GpuPlace { bus_id: id.into(), sysfs: path.map(Into::into) };
        let gpus = [
            place("0000:04:00.0", Some("/sys/devices/pci0000:00/0000:00:01.0/0000:02:00.0/0000:04:00.0")),
            place("0000:05:00.0", Some("/sys/devices/pci0000:00/0000:00:01.0/0000:02:00.0/0000:05:00.0")),
            place("0000:84:00.0", Some("/sys/devices/pci0000:80/0000:80:01.0/0000:84:00.0")),
            place("0001:0a:00.0", None),
        ];
        let nics = gpu_default(None, &gpus);
        let eth0 = &nics[0];
        assert_eq!(eth0.devmem, Devmem::None);
        assert!(eth0.pci_path.starts_with("/sys/devices/pci0000:ff/"), "no GPU under its root: {}", eth0.pci_path);
        assert_eq!(nics.len(), 4);
        assert_eq!(nics[1].pci_path, "/sys/devices/pci0000:00/0000:00:01.0/0000:02:00.0/0000:04:1f.7");
        assert_eq!(nics[1].devmem, Devmem::Gpus(vec!["0000:04:00.0".into(), "0000:05:00.0".into()]));
        assert_eq!(nics[2].pci_path, "/sys/devices/pci0000:80/0000:80:01.0/0000:84:1f.7");
        assert_eq!(nics[3].pci_path, "/sys/devices/pci0001:0a/0001:0a:1f.7", "placed by its bus without sysfs");
        for n in &nics {
            check_pci_path(&n.pci_path).unwrap();
        }
        // More NICs than switches: two close NICs for the first ones.
        let more = gpu_default(Some(4), &gpus[..3]);
        assert_eq!(more.len(), 5);
        assert_eq!(more[3].pci_path, "/sys/devices/pci0000:00/0000:00:01.0/0000:02:00.0/0000:04:1f.6");
        assert_eq!(more[3].devmem, more[1].devmem);
        assert_eq!(more[4].pci_path, "/sys/devices/pci0000:80/0000:80:01.0/0000:84:1f.6");
        // Without GPUs under pci0000:00, eth0 sits there, as on A3.
        assert!(gpu_default(None, &gpus[2..3])[0].pci_path.starts_with("/sys/devices/pci0000:00/"));
    }

    #[test]
    fn a_device_serves_the_gpus_its_queues_are_bound_to() {
        let bound = Devmem::Gpus(vec!["0000:04:00.0".into()]);
        assert!(bound.serves(Some("0000:04:00.0")) && !bound.serves(Some("0000:05:00.0")));
        assert!(bound.serves(None), "host mode binds no GPU");
        assert!(!Devmem::None.serves(None) && !Devmem::None.serves(Some("0000:04:00.0")));
        assert!(Devmem::AnyGpu.serves(Some("0000:05:00.0")));
    }
}
