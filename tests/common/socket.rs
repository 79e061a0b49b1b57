//! The socket transport's comms over loopback, for tests that drive them directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uccl_tcpx::config::SocketConfig;
use uccl_tcpx::transport::socket::SocketNet;
use uccl_tcpx::transport::{Net, RecvComm, SendComm};

pub fn socket_net(options: SocketConfig) -> SocketNet {
    let nop: Arc<dyn Fn() + Send + Sync> = Arc::new(|| {});
    SocketNet::new("127.0.0.1".parse().unwrap(), Duration::from_secs(5), Duration::from_secs(30), nop)
        .with_options(options)
}

/// A connected send comm and the receive comm the listener accepted for it.
pub fn comm_pair(net: &SocketNet) -> (Box<dyn SendComm>, Box<dyn RecvComm>) {
    let (mut handle, mut listen) = net.listen(0).unwrap();
    let send = net.connect(0, &mut handle).unwrap().expect("socket connect completes at once");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(recv) = listen.accept().unwrap() {
            return (send, recv);
        }
        assert!(Instant::now() < deadline, "accept timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}
