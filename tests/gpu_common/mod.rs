//! Buffers on either side of the PCIe bus for the GPU tests, and their skip rule.
#![allow(dead_code)]

use uccl_tcpx::cuda::{self, DeviceBuffer};
use uccl_tcpx::transport::MemKind;

/// Where a test buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Host,
    Gpu,
}

/// GPU tests pass without doing anything where no CUDA driver exists, and say so.
pub fn no_gpu() -> bool {
    if cuda::available() {
        return false;
    }
    println!("SKIPPED: no CUDA driver");
    true
}

pub enum Mem {
    Host(Vec<u8>),
    Device(DeviceBuffer),
}

impl Mem {
    /// `len` zeroed bytes on `side` (GPU 0).
    pub fn new(side: Side, len: usize) -> Mem {
        match side {
            Side::Host => Mem::Host(vec![0u8; len]),
            Side::Gpu => {
                let mut buf = DeviceBuffer::new(0, len).expect("allocate device memory");
                buf.fill(0).expect("clear device memory");
                Mem::Device(buf)
            }
        }
    }

    pub fn side(&self) -> Side {
        match self {
            Mem::Host(_) => Side::Host,
            Mem::Device(_) => Side::Gpu,
        }
    }

    pub fn kind(&self) -> MemKind {
        match self {
            Mem::Host(_) => MemKind::Host,
            Mem::Device(_) => MemKind::Cuda { device: 0 },
        }
    }

    pub fn addr(&self) -> usize {
        match self {
            Mem::Host(v) => v.as_ptr() as usize,
            Mem::Device(d) => d.addr(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Mem::Host(v) => v.len(),
            Mem::Device(d) => d.len(),
        }
    }

    pub fn write(&mut self, offset: usize, data: &[u8]) {
        match self {
            Mem::Host(v) => v[offset..offset + data.len()].copy_from_slice(data),
            Mem::Device(d) => d.copy_from_host(offset, data).expect("copy to device"),
        }
    }

    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        match self {
            Mem::Host(v) => v[offset..offset + len].to_vec(),
            Mem::Device(d) => {
                let mut out = vec![0u8; len];
                d.copy_to_host(offset, &mut out).expect("copy from device");
                out
            }
        }
    }

    pub fn clear(&mut self) {
        match self {
            Mem::Host(v) => v.fill(0),
            Mem::Device(d) => d.fill(0).expect("clear device memory"),
        }
    }
}

/// Compares without printing megabytes on failure: names the first differing byte.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} of {}: got {:#04x}, want {:#04x}", want.len(), got[i], want[i]);
    }
}
