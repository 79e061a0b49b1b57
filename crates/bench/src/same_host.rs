//! Host memory between two processes of one host: which path it takes, and, with `--same-host`,
//! what that path is measured against in the same run: a second connection from an engine with the
//! path disabled (`UCCL_TCPX_DISABLE_IPC=1`: loopback TCP through the socket transport), and memcpy
//! of the same sizes in this process.

use std::time::{Duration, Instant};

use uccl_tcpx::{Connection, HostPath};

/// How long the two ends may take to check each other's process before the run starts.
const CHECK_LIMIT: Duration = Duration::from_secs(10);
/// How long an end waits for the engine's collapses of its regions into huge pages
/// (`UCCL_TCPX_HOST_COPY_COLLAPSE`) before the timed transfers: about 0.4 s of a thread per GiB,
/// paced to a quarter of it.
const COLLAPSES_SETTLE: Duration = Duration::from_secs(5);

/// Waits for this process's collapses to finish, saying so on stderr when they did not.
pub fn settle_collapses(end: &str) {
    if !uccl_tcpx::internal::engine::collapses_settled(COLLAPSES_SETTLE) {
        eprintln!(
            "uccl-tcpx-bench: the {end}'s collapses into huge pages did not finish in {} s; timed transfers may see small pages",
            COLLAPSES_SETTLE.as_secs()
        );
    }
}

/// Waits until both ends checked each other, then says which directions copy directly.
pub fn describe_path(conn: &Connection) -> String {
    let deadline = Instant::now() + CHECK_LIMIT;
    while !conn.host_path().checked && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let HostPath { checked, reads_peer, peer_reads_us, .. } = conn.host_path();
    let way = |direct: bool| if direct { "copied directly" } else { "loopback TCP" };
    if !checked {
        return format!("loopback TCP (the same-host check did not finish within {CHECK_LIMIT:?})");
    }
    format!("reads {}, writes {}", way(reads_peer), way(peer_reads_us))
}

/// GB/s of `iters` memcpy calls of `size` bytes between two buffers of this process (each copy
/// reads what the previous one wrote, so none is optimised away).
pub fn memcpy_gbs(src: &[u8], dst: &mut [u8], size: usize, iters: usize) -> f64 {
    let (src, dst) = (&src[..size], &mut dst[..size]);
    dst.copy_from_slice(src);
    let start = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(std::hint::black_box(src));
        std::hint::black_box(&mut *dst);
    }
    size as f64 * iters as f64 / start.elapsed().as_secs_f64().max(1e-12) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memcpy_copies_and_measures_something() {
        let src: Vec<u8> = (0..1 << 20).map(|i| i as u8).collect();
        let mut dst = vec![0u8; 1 << 20];
        let gbs = memcpy_gbs(&src, &mut dst, 4096, 100);
        assert!(gbs > 0.0 && gbs.is_finite());
        assert_eq!(&dst[..4096], &src[..4096]);
        assert!(dst[4096..].iter().all(|&b| b == 0), "only the measured size is copied");
    }
}
