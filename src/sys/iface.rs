//! Which local address to advertise: the one peers will use to reach this host.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub addr: IpAddr,
    pub up: bool,
    pub loopback: bool,
}

pub fn list() -> Result<Vec<Interface>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we walk read-only and free with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(Error::io("getifaddrs", std::io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned above, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        // SAFETY: non-null ifa_addr points at a sockaddr whose family tells its real type.
        let addr = unsafe { sockaddr_ip(ifa.ifa_addr) };
        let Some(addr) = addr else { continue };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        let flags = ifa.ifa_flags as i32;
        out.push(Interface { name, addr, up: flags & libc::IFF_UP != 0, loopback: flags & libc::IFF_LOOPBACK != 0 });
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: sa is non-null (checked above) and, by this function's contract, points at a sockaddr
    // whose family field says whether it is a sockaddr_in or a sockaddr_in6.
    unsafe {
        match (*sa).sa_family as i32 {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

/// Explicit address, else the named interface's IPv4 (or IPv6) address, else the first IPv4 address
/// of an up, non-loopback, non-container interface, else loopback.
pub fn pick_address(explicit: Option<IpAddr>, ifname: Option<&str>) -> Result<IpAddr> {
    if let Some(ip) = explicit {
        return Ok(ip);
    }
    let ifaces = list()?;
    if let Some(name) = ifname {
        let mut candidates: Vec<&Interface> = ifaces.iter().filter(|i| i.name == name).collect();
        candidates.sort_by_key(|i| !i.addr.is_ipv4());
        return candidates.first().map(|i| i.addr).ok_or_else(|| {
            Error::not_found(format!("UCCL_TCPX_IFNAME={name}: no interface with an address by that name"))
        });
    }
    let usable = |i: &&Interface| {
        i.up && !i.loopback && i.addr.is_ipv4() && !i.name.starts_with("docker") && !i.name.starts_with("veth")
    };
    Ok(ifaces.iter().find(usable).map(|i| i.addr).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)))
}

/// Which interfaces a list in NCCL_SOCKET_IFNAME's grammar names: comma-separated name prefixes,
/// `^` first to name the interfaces to leave out instead, `=` (after any `^`) for exact names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceSpec {
    exclude: bool,
    exact: bool,
    names: Vec<String>,
}

impl IfaceSpec {
    pub fn parse(spec: &str) -> Result<IfaceSpec> {
        let (exclude, rest) = match spec.strip_prefix('^') {
            Some(rest) => (true, rest),
            None => (false, spec),
        };
        let (exact, rest) = match rest.strip_prefix('=') {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        let names: Vec<String> = rest.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect();
        if names.is_empty() {
            return Err(Error::invalid(format!(
                "interface list {spec:?} names no interface (prefixes separated by commas, ^ to exclude, = for \
                 exact names)"
            )));
        }
        Ok(IfaceSpec { exclude, exact, names })
    }

    pub fn matches(&self, name: &str) -> bool {
        let named = self.names.iter().any(|n| if self.exact { name == n } else { name.starts_with(n.as_str()) });
        named != self.exclude
    }

    /// Whether the list names interfaces rather than leaving some out: only a named loopback
    /// interface is taken (an exclusion list never brings `lo` in).
    fn names_loopback(&self, iface: &Interface) -> bool {
        !self.exclude && self.matches(&iface.name)
    }
}

/// The IPv4 address of every interface that is up and that `spec` selects, in the kernel's order,
/// one per interface (its first); loopback only where named. An error where none is left.
pub fn select(spec: &IfaceSpec) -> Result<Vec<(String, IpAddr)>> {
    let mut out: Vec<(String, IpAddr)> = Vec::new();
    for iface in list()? {
        let wanted = iface.up
            && iface.addr.is_ipv4()
            && spec.matches(&iface.name)
            && (!iface.loopback || spec.names_loopback(&iface))
            && !out.iter().any(|(name, _)| *name == iface.name);
        if wanted {
            out.push((iface.name, iface.addr));
        }
    }
    if out.is_empty() {
        return Err(Error::not_found(format!(
            "UCCL_TCPX_SOCKET_IFNAME: no interface that is up with an IPv4 address matches {spec:?}"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_and_named_lookup_works() {
        let ifaces = list().unwrap();
        let lo = ifaces.iter().find(|i| i.loopback && i.addr == IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("lo");
        assert_eq!(pick_address(None, Some(&lo.name)).unwrap(), lo.addr);
    }

    #[test]
    fn explicit_wins_and_unknown_name_is_an_error() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(pick_address(Some(ip), Some("nope0")).unwrap(), ip);
        let err = pick_address(None, Some("no-such-if9")).unwrap_err();
        assert!(err.message().contains("no-such-if9"));
        assert!(!pick_address(None, None).unwrap().is_unspecified());
    }

    #[test]
    fn interface_lists_follow_nccls_grammar() {
        let names = ["eth0", "eth1", "eth10", "ens3", "lo", "dat1_1", "dat1_2", "ctl1"];
        let picked = |spec: &str| -> Vec<&str> {
            let spec = IfaceSpec::parse(spec).unwrap();
            names.iter().copied().filter(|n| spec.matches(n)).collect()
        };
        assert_eq!(picked("eth"), ["eth0", "eth1", "eth10"], "a prefix");
        assert_eq!(picked("eth1"), ["eth1", "eth10"], "a prefix, not a name");
        assert_eq!(picked("=eth1"), ["eth1"], "an exact name");
        assert_eq!(picked("=eth1,ens3"), ["eth1", "ens3"]);
        assert_eq!(picked("dat,ctl"), ["dat1_1", "dat1_2", "ctl1"]);
        assert_eq!(picked("^eth,lo"), ["ens3", "dat1_1", "dat1_2", "ctl1"], "an exclusion list");
        assert_eq!(picked("^=eth1"), ["eth0", "eth10", "ens3", "lo", "dat1_1", "dat1_2", "ctl1"]);
        for bad in ["", "^", "=", "^=", " , "] {
            assert!(IfaceSpec::parse(bad).is_err(), "{bad:?} names nothing");
        }
    }

    #[test]
    fn selection_takes_up_ipv4_interfaces_and_loopback_only_by_name() {
        let lo = list().unwrap().into_iter().find(|i| i.loopback && i.addr.is_ipv4()).expect("lo");
        let named = select(&IfaceSpec::parse(&format!("={}", lo.name)).unwrap()).unwrap();
        assert_eq!(named, [(lo.name.clone(), lo.addr)]);
        let all_but = select(&IfaceSpec::parse("^zzz").unwrap());
        assert!(all_but.iter().flatten().all(|(name, _)| *name != lo.name), "an exclusion list keeps lo out");
        let err = select(&IfaceSpec::parse("=no-such-if9").unwrap()).unwrap_err();
        assert!(err.message().contains("no-such-if9"), "{}", err.message());
    }
}
