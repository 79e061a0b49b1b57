//! Which of the data links each socket of a send comm takes (`UCCL_TCPX_SOCKET_IFNAME`): socket k
//! from this host's link (s + k) to the peer's link (s + k), each list modulo its length, `s` a
//! start that rotates with every comm.

use std::net::{Ipv4Addr, SocketAddr};

use super::tune;
use crate::error::{Error, Result};

/// Where one data socket goes: to `to`, from `from` where this host has data links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Route {
    pub to: SocketAddr,
    pub from: Option<Ipv4Addr>,
}

impl Route {
    /// Binds the unconnected `sock` to its link's address (any port): on hosts whose NICs share
    /// a subnet the route alone would send every socket out of one of them. Its unsent bytes are
    /// bounded, so that it takes pieces as fast as its link drains them.
    pub fn bind(&self, sock: &socket2::Socket) -> Result<()> {
        let Some(from) = self.from else { return Ok(()) };
        sock.bind(&SocketAddr::new(from.into(), 0).into())
            .map_err(|e| Error::io(format!("bind a data socket to link {from}"), e))?;
        tune::pace_to_link(sock)
    }
}

/// The data links of a send comm: socket k's route, for each k.
#[derive(Clone, Debug)]
pub(super) struct Routes {
    /// The listener's address, for every socket where either end has no data links.
    pub addr: SocketAddr,
    pub ours: Vec<Ipv4Addr>,
    pub theirs: Vec<Ipv4Addr>,
    /// The link of socket 0.
    pub first: usize,
}

impl Routes {
    /// Links pair up rank by rank, so both hosts must have as many: with other counts a rank
    /// could pair NICs of different networks, and every socket goes to `addr` instead.
    pub fn new(addr: SocketAddr, ours: Vec<Ipv4Addr>, theirs: Vec<Ipv4Addr>, first: usize) -> Routes {
        if !ours.is_empty() && !theirs.is_empty() && ours.len() != theirs.len() {
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            let why = format!(
                "this host has {} data links and the peer at {addr} {}: its data sockets use its address instead",
                ours.len(),
                theirs.len()
            );
            if SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                log::debug!("{why}")
            } else {
                log::warn!("{why}")
            }
            return Routes { addr, ours: Vec::new(), theirs: Vec::new(), first };
        }
        Routes { addr, ours, theirs, first }
    }

    /// Whether the sockets run over data links.
    pub fn over_links(&self) -> bool {
        !self.ours.is_empty() && !self.theirs.is_empty()
    }

    pub fn route(&self, index: u8) -> Route {
        if !self.over_links() {
            return Route { to: self.addr, from: None };
        }
        let k = self.first + index as usize;
        Route {
            to: SocketAddr::new(self.theirs[k % self.theirs.len()].into(), self.addr.port()),
            from: Some(self.ours[k % self.ours.len()]),
        }
    }

    /// Links the comm's sockets run over.
    pub fn links(&self) -> usize {
        if self.over_links() { self.ours.len() } else { 1 }
    }
}
