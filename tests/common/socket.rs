//! The socket transport on loopback, for tests that drive its comms directly.

use std::sync::Arc;
use std::time::Duration;

use uccl_tcpx::SocketConfig;
use uccl_tcpx::internal::transport::socket::SocketNet;

/// The socket transport on loopback with `options`, whose `connect_timeout` bounds how long a
/// listener waits for a connection's hello and for all the sockets of a comm.
pub fn socket_net_with(connect_timeout: Duration, options: SocketConfig) -> SocketNet {
    let nop: Arc<dyn Fn() + Send + Sync> = Arc::new(|| {});
    SocketNet::new("127.0.0.1".parse().unwrap(), connect_timeout, Duration::from_secs(30), nop).with_options(options)
}

pub fn socket_net(options: SocketConfig) -> SocketNet {
    socket_net_with(Duration::from_secs(30), options)
}
