//! What a net plugin's vendor requires beyond the ncclNet v7 ABI, as one value the driver reads
//! (aws-ofi-nccl keeps its platform rules the same way, over one generic driver). TCPX's is
//! `tcpx::PROFILE`.

use std::ops::Range;

pub struct Profile {
    /// Two ends on one host can connect over the plugin (`Caps::reaches_own_host`).
    pub reaches_own_host: bool,
    /// A listen comm serves only one accept, so each channel listens on its own
    /// (`Caps::listen_per_channel`).
    pub listen_per_channel: bool,
    /// Comms bind to the GPU current when they are made, where a CUDA driver and a CUDA-capable
    /// device exist (`Caps::binds_gpu`).
    pub binds_gpu: bool,
    /// Requests per comm, received-but-unconsumed included; every device reports at most this.
    pub max_requests: usize,
    /// Bytes of a listen handle where `connect` keeps its in-progress state: never shipped to a
    /// peer, and zeroed in a fresh attempt's copy.
    pub connect_state: Range<usize>,
    /// Sets the plugin's environment defaults before its `init` (under the loader's lock).
    pub set_environment: fn(),
}
