//! Where the engine may connect for a peer's channels. A peer's listen handle names an address, and
//! dialing whatever it names would let anyone who reaches the control port make the engine open
//! connections to any host it can reach. The engine dials the address its control connection to that
//! peer runs between instead, unless the operator allowed the named address (`UCCL_TCPX_ALLOW_DIAL`,
//! for multi-homed peers whose data interface is not the one they connect from).
//!
//! Net plugins' handles are opaque (`Net::handle_address` is `None`): nothing can be checked there,
//! and only authentication keeps strangers from steering those connects.

use std::net::IpAddr;

use crate::config::Cidr;
use crate::error::Result;
use crate::transport::{Net, NetHandle};

/// Points every handle in `handles` that names an address other than `control_peer` and outside
/// `allowed` at `control_peer` (same port).
pub fn confine(net: &dyn Net, handles: &mut [NetHandle], control_peer: IpAddr, allowed: &[Cidr]) -> Result<()> {
    let peer = control_peer.to_canonical();
    for handle in handles {
        let Some(named) = net.handle_address(handle) else { continue };
        if named.to_canonical() == peer || allowed.iter().any(|block| block.contains(named)) {
            continue;
        }
        log::info!(
            "the peer at {peer} names {named} for its channels; dialing {peer} (UCCL_TCPX_ALLOW_DIAL can allow {named})"
        );
        net.set_handle_address(handle, peer)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::transport::plugin::{PluginNet, mock};
    use crate::transport::socket::SocketNet;

    fn net() -> SocketNet {
        SocketNet::new("127.0.0.1".parse().unwrap(), Duration::from_secs(1), Duration::from_secs(1), Arc::new(|| {}))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn handles_naming_another_address_are_pointed_at_the_peer_unless_allowed() {
        let net = net();
        let (named, _listen) = net.listen(0).unwrap();
        let port = |h: &NetHandle| u16::from_le_bytes([h[6], h[7]]);
        let cases = [
            ("127.0.0.1", vec![], "127.0.0.1"),
            ("::ffff:127.0.0.1", vec![], "127.0.0.1"),
            ("10.1.2.3", vec![], "10.1.2.3"),
            ("10.1.2.3", vec!["127.0.0.0/8"], "127.0.0.1"),
            ("10.1.2.3", vec!["127.0.0.2/32", "192.168.0.0/16"], "10.1.2.3"),
        ];
        for (peer, allowed, dialed) in cases {
            let allowed: Vec<Cidr> = allowed.iter().map(|b| b.parse().unwrap()).collect();
            let mut handles = [named, named];
            confine(&net, &mut handles, ip(peer), &allowed).unwrap();
            for h in &handles {
                assert_eq!(net.handle_address(h), Some(ip(dialed)), "peer {peer}, allowed {allowed:?}");
                assert_eq!(port(h), port(&named), "the port is the peer's");
            }
        }
    }

    #[test]
    fn opaque_handles_are_left_alone() {
        let plugin = PluginNet::with_plugin(mock::plugin(), None, None).unwrap();
        let (handle, _listen) = plugin.listen(0).unwrap();
        let mut handles = [handle];
        confine(&plugin, &mut handles, ip("192.0.2.1"), &[]).unwrap();
        assert_eq!(handles, [handle]);
        assert!(plugin.set_handle_address(&mut handles[0], ip("192.0.2.1")).is_err());
    }
}
