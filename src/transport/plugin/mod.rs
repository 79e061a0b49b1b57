//! Any ncclNet v7 plugin (GPUDirect-TCPX in production, the fake devmem NIC in tests) behind the
//! transport traits.

pub mod abi;
