//! What a transport is and can do, answered once when it is opened and read from then on: NCCL's
//! `net_v7.h` answers with a properties struct beside its function table, and so does a `Net`
//! here (`Net::caps`). Every answer is stated by every transport (no default stands in for "no").
//! What changes at run time stays a method of `Net`: whether the progress thread must poll, which
//! device a channel uses once the GPU is known, the address a handle names.

/// A transport's fixed answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Its name in the handshake: both ends of a connection run the same transport.
    pub name: &'static str,
    /// A listen comm serves only one accept (TCPX), so every channel needs its own listen and the
    /// peer one handle per channel.
    pub listen_per_channel: bool,
    /// The largest `reg_mr` the comms take, in bytes; larger regions are registered in windows.
    pub max_registration: usize,
    /// The transport binds its comms to the GPU current when they are made (TCPX does, at listen,
    /// connect, accept and regMr), so the engine must know its GPU before the first listen or
    /// connect.
    pub binds_gpu: bool,
    /// Two ends on one host can connect over it. TCPX cannot: traffic between them never reaches
    /// the NIC, so nothing steers it into GPU memory, and its first receive ends the process
    /// ("data landed on host memory").
    pub reaches_own_host: bool,
    /// The comms take vectored requests (`isendv` / `irecvv`) of any memory they move, in one
    /// registration of any size.
    pub vectored: bool,
    /// A comm holds buffers and threads however idle (TCPX: about 7 MiB and a helper thread a
    /// comm), so a connection closes channels that moved nothing for a while unless told otherwise
    /// (`UCCL_TCPX_IDLE_CLOSE_MS`).
    pub idle_comms_cost: bool,
    /// What else both ends' transports must agree on, after `name` in the handshake (empty where
    /// nothing): TCPXO's flow count, across which its sends and receives pair by position.
    pub agreement: &'static str,
}

impl Caps {
    /// The transport as the handshake names it: ends that differ here refuse each other.
    pub fn handshake_name(&self) -> String {
        format!("{}{}", self.name, self.agreement)
    }
}

/// What one device of a transport offers (ncclNet's `getProperties`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Properties {
    pub name: String,
    /// sysfs PCI path of the device, used to pair GPUs with close NICs; None for virtual interfaces.
    pub pci_path: Option<String>,
    pub supports_host: bool,
    pub supports_cuda: bool,
    pub speed_mbps: u32,
    /// Received data lands in a device bounce pool and must be gathered by an unpack kernel.
    pub device_unpack: bool,
    /// Maximum outstanding requests per comm, received-but-unconsumed included.
    pub max_requests: usize,
}
