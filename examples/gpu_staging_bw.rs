//! Loopback throughput of one-sided writes between two engines in this process: GPU->GPU through
//! the pinned staging path next to host->host over the same transport (and GPU->host, host->GPU,
//! where only one side stages), for a few channel and chunk settings. Every run's last write is
//! checked byte for byte.
//!
//! `cargo run --release --example gpu_staging_bw [size_mib] [iterations] [channels:chunk_kib:window ...]`
//! (defaults 64, 20 and a small grid).

use std::time::Instant;

use uccl_tcpx::internal::cuda::{self, DeviceBuffer};
use uccl_tcpx::{Config, Engine, OneSided};

enum Buf {
    Host(Vec<u8>),
    Gpu(DeviceBuffer),
}

impl Buf {
    fn new(gpu: bool, len: usize) -> Buf {
        if gpu { Buf::Gpu(DeviceBuffer::new(0, len).expect("device memory")) } else { Buf::Host(vec![0u8; len]) }
    }
    fn addr(&self) -> usize {
        match self {
            Buf::Host(v) => v.as_ptr() as usize,
            Buf::Gpu(d) => d.addr(),
        }
    }
    fn write(&mut self, data: &[u8]) {
        match self {
            Buf::Host(v) => v.copy_from_slice(data),
            Buf::Gpu(d) => d.copy_from_host(0, data).expect("copy to device"),
        }
    }
    fn read(&self) -> Vec<u8> {
        match self {
            Buf::Host(v) => v.clone(),
            Buf::Gpu(d) => d.to_vec().expect("copy from device"),
        }
    }
}

fn run(config: &Config, (src_gpu, dst_gpu): (bool, bool), size: usize, iterations: usize) -> f64 {
    let a = Engine::new(config.clone()).expect("engine");
    let b = Engine::new(config.clone()).expect("engine");
    let conn = a.connect("127.0.0.1", "0", b.address().port()).expect("connect");
    let _accepted = b.accept().expect("accept");
    let mut src = Buf::new(src_gpu, size);
    let dst = Buf::new(dst_gpu, size);
    let data: Vec<u8> = (0..size).map(|i| (i as u64).wrapping_mul(0x9e37_79b9).rotate_right(7) as u8).collect();
    src.write(&data);
    let smr = a.register(src.addr(), size).expect("register source");
    let dmr = b.register(dst.addr(), size).expect("register destination");
    let remote = b.prepare_fifo(dmr, dst.addr(), size).expect("advertise");
    let op = [OneSided { mr: smr, addr: src.addr(), len: size, remote }];
    for _ in 0..2 {
        conn.wait(conn.write(&op).expect("write")).expect("warm-up write");
    }
    let start = Instant::now();
    for _ in 0..iterations {
        conn.wait(conn.write(&op).expect("write")).expect("write");
    }
    let secs = start.elapsed().as_secs_f64();
    assert!(dst.read() == data, "destination differs from the source after the last write");
    (size * iterations) as f64 / secs / 1e9
}

fn main() {
    let mut args = std::env::args().skip(1);
    let size = args.next().map_or(64, |s| s.parse::<usize>().expect("size in MiB")) << 20;
    let iterations = args.next().map_or(20, |s| s.parse().expect("iteration count"));
    let mut settings: Vec<(u16, u32, usize)> = args
        .map(|spec| {
            let parts: Vec<&str> = spec.split(':').collect();
            let [channels, chunk_kib, window] = parts[..] else {
                panic!("{spec:?}: expected channels:chunk_kib:window")
            };
            (channels.parse().unwrap(), chunk_kib.parse::<u32>().unwrap() << 10, window.parse().unwrap())
        })
        .collect();
    if settings.is_empty() {
        settings = vec![(2, 1 << 20, 8), (4, 1 << 20, 8), (4, 4 << 20, 16), (8, 4 << 20, 16)];
    }
    let gpu = cuda::available();
    if !gpu {
        println!("SKIPPED: no CUDA driver (host->host only)");
    }
    println!("{} MiB one-sided writes over loopback, {iterations} per run", size >> 20);
    for (channels, chunk, window) in settings {
        let config = Config {
            ip: Some("127.0.0.1".parse().unwrap()),
            num_channels: Some(channels),
            chunk_size: chunk,
            window,
            ..Config::default()
        };
        let host = run(&config, (false, false), size, iterations);
        let mut line =
            format!("channels {channels} chunk {:>4} KiB window {window:>2}: host->host {host:6.2} GB/s", chunk >> 10);
        if gpu {
            let staged = run(&config, (true, true), size, iterations);
            let from_gpu = run(&config, (true, false), size, iterations);
            let to_gpu = run(&config, (false, true), size, iterations);
            line += &format!(
                " | GPU->GPU {staged:6.2} GB/s ({:3.0}% of host) | GPU->host {from_gpu:6.2} | host->GPU {to_gpu:6.2}",
                100.0 * staged / host
            );
        }
        println!("{line}");
    }
}
