//! Which transport carries a connection's channels. A net plugin cannot carry traffic between two
//! ends of one host (`Caps::reaches_own_host`: loopback never reaches the NIC, so nothing steers it
//! into GPU memory, and TCPX exits the process at its first receive), so a plugin engine moves the
//! channels of a peer on its own host over the built-in socket transport, staged for GPU memory as
//! a socket engine's are, made when the first such peer connects.
//!
//! "Its own host" is the running kernel, not the network namespace: two engines in separate
//! namespaces of one machine (containers, or test hosts) are remote to the same-host copy paths,
//! but the bytes between them still cross only a virtual link, never a NIC, so the plugin cannot
//! carry them either.
//!
//! Both ends decide alike from what the handshake gave both: the two host identities (whether
//! they name one kernel) and the capability bit each announced (`CAP_LOCAL_PEERS_ON_SOCKETS`, set unless
//! `UCCL_TCPX_LOCAL_PEERS=plugin` keeps same-host peers on the plugin for tests on one host). Ends
//! that differ refuse the connection rather than let one of them reach the plugin. An engine that
//! announces no identity (`UCCL_TCPX_DISABLE_IPC=1`) has no same-host peers: every peer stays on
//! its transport.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::locality::Locality;
use crate::config::LocalPeers;
use crate::error::{Error, Result, UcclStatus};
use crate::proto::CAP_LOCAL_PEERS_ON_SOCKETS;
use crate::transport::Net;

/// Where a connection's channels go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The engine's transport.
    Transport,
    /// The built-in socket transport, for a same-host peer of an engine whose transport cannot
    /// reach its own host.
    LocalSockets,
}

/// Makes the socket transport for same-host peers (with the engine's parameters).
pub type MakeNet = Box<dyn Fn() -> Result<Arc<dyn Net>> + Send + Sync>;

/// The engine's transport and, made on first use, the one for same-host peers.
pub struct Routes {
    main: Arc<dyn Net>,
    local_peers: LocalPeers,
    make_local: MakeNet,
    local: OnceLock<Arc<dyn Net>>,
    /// Held while the local net is made, so two handshakes never make two.
    making: Mutex<()>,
}

impl Routes {
    pub fn new(main: Arc<dyn Net>, local_peers: LocalPeers, make_local: MakeNet) -> Routes {
        Routes { main, local_peers, make_local, local: OnceLock::new(), making: Mutex::new(()) }
    }

    /// The capability bits this engine announces about its same-host peers.
    pub fn capabilities(&self) -> u64 {
        match self.local_peers {
            LocalPeers::Socket => CAP_LOCAL_PEERS_ON_SOCKETS,
            LocalPeers::Plugin => 0,
        }
    }

    /// The route for a peer that announced `peer_capabilities` and runs on this machine's kernel or
    /// not (`same_kernel`); the peer, deciding from the same two facts, takes the same one or refuses
    /// with the same reason.
    pub fn decide(&self, same_kernel: bool, peer_capabilities: u64) -> Result<Route> {
        decide(
            self.main.caps().reaches_own_host,
            self.main.caps().name,
            self.capabilities(),
            peer_capabilities,
            same_kernel,
        )
    }

    /// The transport of `route`, made now if it is the first same-host connection.
    pub fn net(&self, route: Route) -> Result<Arc<dyn Net>> {
        match route {
            Route::Transport => Ok(self.main.clone()),
            Route::LocalSockets => {
                if let Some(net) = self.local.get() {
                    return Ok(net.clone());
                }
                let _making = self.making.lock();
                if let Some(net) = self.local.get() {
                    return Ok(net.clone());
                }
                let net = (self.make_local)().map_err(|e| e.context("the socket transport for peers on this host"))?;
                Ok(self.local.get_or_init(|| net).clone())
            }
        }
    }

    /// Whether any transport in use progresses only while polled and has requests outstanding.
    pub fn needs_polling(&self) -> bool {
        self.main.needs_polling() || self.local.get().is_some_and(|net| net.needs_polling())
    }

    /// Whether any transport in use has device copies in flight that only polling finds done.
    pub fn polls_device_copies(&self) -> bool {
        self.main.polls_device_copies() || self.local.get().is_some_and(|net| net.polls_device_copies())
    }

    /// Frees what every transport in use keeps idle past its bound and is due; when the next is.
    pub fn trim_staging(&self) -> Option<std::time::Duration> {
        let local = self.local.get().and_then(|net| net.trim_staging());
        match (self.main.trim_staging(), local) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Says once per connection which transport its channels use.
    pub fn log_choice(&self, peer: SocketAddr, route: Route, locality: Locality) {
        let name = self.main.caps().name;
        match route {
            Route::LocalSockets => log::info!(
                "the peer at {peer} runs on this machine ({}): its channels use the built-in socket transport, not \
                 the {name} net plugin (traffic between two ends of one machine never reaches the NIC)",
                if locality.is_local() { "this network namespace" } else { "another network namespace" }
            ),
            Route::Transport if locality.is_local() && !self.main.caps().reaches_own_host => log::info!(
                "the peer at {peer} shares this host and its channels use the {name} net plugin, as \
                 UCCL_TCPX_LOCAL_PEERS=plugin asks (for tests against the fake NIC on one host only)"
            ),
            Route::Transport => log::debug!("the channels to the peer at {peer} use the {name} transport"),
        }
    }
}

fn decide(reaches_own_host: bool, transport: &str, ours: u64, theirs: u64, same_kernel: bool) -> Result<Route> {
    if !same_kernel || reaches_own_host {
        return Ok(Route::Transport);
    }
    let (ours, theirs) = (ours & CAP_LOCAL_PEERS_ON_SOCKETS != 0, theirs & CAP_LOCAL_PEERS_ON_SOCKETS != 0);
    match (ours, theirs) {
        (true, true) => Ok(Route::LocalSockets),
        (false, false) => Ok(Route::Transport),
        _ => Err(Error::new(
            UcclStatus::ErrNotSupported,
            format!(
                "the two ends share a host and disagree on how to reach it: one keeps same-host peers on the \
                 {transport} net plugin (UCCL_TCPX_LOCAL_PEERS=plugin, for tests on one host), the other moves them \
                 to the socket transport, since the plugin cannot reach its own host; set the same \
                 UCCL_TCPX_LOCAL_PEERS on both"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: u64 = CAP_LOCAL_PEERS_ON_SOCKETS;

    #[test]
    fn only_peers_on_this_kernel_of_a_transport_that_cannot_reach_it_leave_it() {
        assert_eq!(decide(false, "p", ON, ON, true).unwrap(), Route::LocalSockets);
        assert_eq!(decide(false, "p", 0, 0, true).unwrap(), Route::Transport, "both keep the plugin");
        assert_eq!(decide(true, "socket", ON, ON, true).unwrap(), Route::Transport, "sockets reach it");
        // Other capability bits say nothing about the route.
        assert_eq!(decide(false, "p", ON, !ON, true).unwrap_err().status(), UcclStatus::ErrNotSupported);
        for (ours, theirs) in [(ON, ON), (0, ON), (ON, 0), (0, 0)] {
            assert_eq!(decide(false, "p", ours, theirs, false).unwrap(), Route::Transport);
        }
    }

    #[test]
    fn a_peer_in_another_network_namespace_of_this_machine_shares_its_kernel() {
        use crate::proto::HostIdentity;
        let ours = HostIdentity { boot_id: [7; 16], netns: 1, pid: 10 };
        let other_ns = HostIdentity { netns: 2, pid: 11, ..ours };
        let other_machine = HostIdentity { boot_id: [8; 16], ..ours };
        assert!(!ours.same_host(&other_ns) && ours.same_kernel(&other_ns));
        assert!(!ours.same_kernel(&other_machine));
        // An identity not given is never taken for this machine's.
        assert!(!ours.same_kernel(&HostIdentity::default()) && !HostIdentity::default().same_kernel(&ours));
    }

    #[test]
    fn ends_that_disagree_both_refuse_naming_the_knob() {
        let a = decide(false, "FakeDevmemTCPX_v7", ON, 0, true).unwrap_err();
        let b = decide(false, "FakeDevmemTCPX_v7", 0, ON, true).unwrap_err();
        for e in [&a, &b] {
            assert_eq!(e.status(), UcclStatus::ErrNotSupported);
            assert!(e.message().contains("UCCL_TCPX_LOCAL_PEERS"), "{e}");
            assert!(e.message().contains("FakeDevmemTCPX_v7"), "{e}");
        }
    }

    #[test]
    fn the_local_net_is_made_once_and_only_when_asked_for() {
        let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let main: Arc<dyn Net> = Arc::new(crate::transport::socket::SocketNet::new(
            "127.0.0.1".parse().unwrap(),
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(1),
            Arc::new(|| {}),
        ));
        let counter = made.clone();
        let local = main.clone();
        let routes = Routes::new(
            main.clone(),
            LocalPeers::Socket,
            Box::new(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(local.clone())
            }),
        );
        assert!(Arc::ptr_eq(&routes.net(Route::Transport).unwrap(), &main));
        assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| routes.net(Route::LocalSockets).unwrap());
            }
        });
        assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 1);

        let failing = Routes::new(main, LocalPeers::Plugin, Box::new(|| Err(Error::invalid("no sockets today"))));
        assert_eq!(failing.capabilities(), 0);
        let err = failing.net(Route::LocalSockets).err().unwrap();
        assert!(err.message().contains("no sockets today") && err.message().contains("peers on this host"), "{err}");
    }
}
