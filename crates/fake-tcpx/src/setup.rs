//! How long connection setup takes, as TCPX's `connect.cc` spends it: `tcpxAsyncConnectV5` and
//! `tcpxAsyncAcceptV5_v5` each sleep 100 ms before every socket (the data sockets and the ctrl
//! socket), and accept then sleeps the flow-steering wait so the rules are active before data flows.

use std::time::{Duration, Instant};

use crate::config::SetupTiming;

impl SetupTiming {
    /// What the connecting side spends before its comm exists, for a listener with `data_sockets`.
    pub fn connect_time(&self, data_sockets: u32) -> Duration {
        self.socket_delay * (data_sockets + 1)
    }

    /// When an accept started at `started`, whose peer's connection arrived at `arrived`, completes.
    pub fn accept_ready(&self, started: Instant, arrived: Instant) -> Instant {
        (started + self.socket_delay * (self.data_sockets + 1)).max(arrived) + self.steering_wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcpx_timing() {
        let t = SetupTiming {
            socket_delay: Duration::from_millis(100),
            data_sockets: 2,
            steering_wait: Duration::from_millis(500),
        };
        assert_eq!(t.connect_time(2), Duration::from_millis(300));
        assert_eq!(t.connect_time(4), Duration::from_millis(500), "the listener's socket count counts");
        let s = Instant::now();
        assert_eq!(t.accept_ready(s, s), s + Duration::from_millis(800));
        let late = s + Duration::from_secs(1);
        assert_eq!(t.accept_ready(s, late), late + Duration::from_millis(500));
    }
}
