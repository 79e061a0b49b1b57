//! Additions to UCCL's C ABI (`uccl_tcpx_` prefix) that a faithful `p2p.Endpoint` needs and C
//! callers can use as well: an engine for a GPU named by the caller (or none), the number of GPUs,
//! the address an engine would advertise, and accepts and waits bounded in time, so that a caller
//! can stay responsive (to a signal, a shutdown) while it blocks.

use std::ffi::{c_char, c_int};
use std::sync::Arc;
use std::time::Duration;

use super::conn::{CONNS, ConnEntry, conn_ref, uccl_conn_t};
use super::engine::{ENGINES, UCCL_IP_ADDR_BUF_MIN, uccl_engine_t};
use super::{ffi_fn, non_null};
use crate::config::Config;
use crate::engine::Engine;
use crate::error::{Error, Result, UcclStatus};

/// `uccl_tcpx_engine_create_on`'s `gpu`: choose the GPU as `uccl_engine_create` does.
pub const UCCL_TCPX_GPU_DEFAULT: c_int = -1;
/// `uccl_tcpx_engine_create_on`'s `gpu`: no GPU at creation, whatever `UCCL_TCPX_GPU` or the
/// calling thread's current context say; the first device registration still chooses one.
pub const UCCL_TCPX_GPU_NONE: c_int = -2;

/// Creates an engine serving CUDA device `gpu` (an ordinal of the visible devices; it must exist),
/// or with `UCCL_TCPX_GPU_DEFAULT` as `uccl_engine_create` does, or with `UCCL_TCPX_GPU_NONE`
/// without a GPU until its first device registration (host memory needs none; this is what a
/// machine without a CUDA driver gets either way). Everything else is configured from the
/// environment as for `uccl_engine_create`. Returns NULL on failure.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_engine_create_on(gpu: c_int) -> *mut uccl_engine_t {
    crate::config::init_logging();
    ffi_fn!("uccl_tcpx_engine_create_on", {
        let mut config = Config::from_env()?;
        let engine = match gpu {
            UCCL_TCPX_GPU_DEFAULT => Engine::new(config)?,
            UCCL_TCPX_GPU_NONE => {
                config.gpu = None;
                // A fresh thread has no CUDA context current, so the engine does not take the
                // caller's GPU from it.
                std::thread::Builder::new()
                    .name("uccl-create".into())
                    .spawn(move || Engine::new(config))
                    .map_err(|e| Error::io("spawn engine creation thread", e))?
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?
            }
            ordinal if ordinal >= 0 => {
                config.gpu = Some(ordinal);
                Engine::new(config)?
            }
            other => {
                return Err(Error::invalid(format!(
                    "gpu is {other}: a device ordinal (>= 0), UCCL_TCPX_GPU_DEFAULT (-1) or UCCL_TCPX_GPU_NONE (-2)"
                )));
            }
        };
        log::debug!("engine created for gpu {gpu}: {}", engine.metadata());
        Ok(ENGINES.insert(Arc::new(engine)))
    })
}

/// The number of CUDA devices this process sees; 0 where no CUDA driver loads (host memory only).
/// Never fails.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_gpu_count() -> c_int {
    ffi_fn!("uccl_tcpx_gpu_count", {
        if crate::cuda::driver().is_err() {
            return Ok(0);
        }
        Ok(cudarc::driver::result::device::get_count().unwrap_or(0).max(0))
    })
}

/// Writes to `ip_addr_buf` (at least 46 bytes) as a C string the IP an engine created now with
/// this environment would advertise in its metadata (`UCCL_TCPX_IP`, else the address of
/// `UCCL_TCPX_IFNAME`, else the first non-loopback IPv4 interface that is up, else 127.0.0.1),
/// without creating one. Returns 0 or a negative status.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_default_ip(ip_addr_buf: *mut c_char, ip_addr_buf_len: libc::size_t) -> c_int {
    ffi_fn!("uccl_tcpx_default_ip", {
        non_null!(ip_addr_buf);
        check_ip_buf_len(ip_addr_buf_len)?;
        let config = Config::from_env()?;
        let ip = crate::sys::iface::pick_address(config.ip, config.ifname.as_deref())?;
        write_ip(ip_addr_buf, &ip.to_string());
        Ok(0)
    })
}

/// `uccl_engine_accept` waiting at most `timeout_ms` (negative: without a limit). Returns 0 with
/// `*conn`, the peer's IP (in `ip_addr_buf`, at least 46 bytes) and its GPU index set; 1 when no
/// peer connected in time (`*conn` is NULL; nothing else is written); or a negative status
/// (`UCCL_STATUS_ERR_CANCELED` after `uccl_engine_stop_accept`).
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_accept_timeout(
    engine: *mut uccl_engine_t,
    timeout_ms: c_int,
    ip_addr_buf: *mut c_char,
    ip_addr_buf_len: libc::size_t,
    remote_gpu_idx: *mut c_int,
    conn: *mut *mut uccl_conn_t,
) -> c_int {
    ffi_fn!("uccl_tcpx_accept_timeout", {
        non_null!(conn);
        // SAFETY: checked non-NULL; the caller's pointer is writable. Cleared first so that no
        // failure leaves a stale handle there.
        unsafe { *conn = std::ptr::null_mut() };
        non_null!(ip_addr_buf);
        non_null!(remote_gpu_idx);
        check_ip_buf_len(ip_addr_buf_len)?;
        let engine_ref = ENGINES.get(engine)?;
        let Some(accepted) = engine_ref.accept_within(limit(timeout_ms))? else {
            return Ok(UcclStatus::InProgress as c_int);
        };
        write_ip(ip_addr_buf, &accepted.peer.addr.ip().to_string());
        // SAFETY: checked non-NULL; the caller's int is writable.
        unsafe { *remote_gpu_idx = accepted.peer.gpu_index };
        let handle = CONNS.insert(Arc::new(ConnEntry { conn: accepted, engine: Arc::downgrade(&engine_ref) }));
        // SAFETY: checked non-NULL above.
        unsafe { *conn = handle };
        Ok(0)
    })
}

/// Waits at most `timeout_ms` (negative: without a limit) for a transfer to end. Returns 0 once it
/// succeeded (then `*bytes`, if `bytes` is not NULL, holds its byte count, and the id is unknown
/// afterwards, as after `uccl_engine_poll` reported it), 1 when it is still in progress after the
/// timeout (the id stays valid), or a negative status (its failure, also reported once).
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_wait(
    conn: *mut uccl_conn_t,
    transfer_id: u64,
    timeout_ms: c_int,
    bytes: *mut libc::size_t,
) -> c_int {
    ffi_fn!("uccl_tcpx_wait", {
        let conn = conn_ref(conn)?;
        let done = match limit(timeout_ms) {
            None => Some(conn.wait(transfer_id)?),
            Some(limit) => conn.wait_within(transfer_id, limit)?,
        };
        let Some(n) = done else { return Ok(UcclStatus::InProgress as c_int) };
        if !bytes.is_null() {
            // SAFETY: checked non-NULL; the caller's size_t is writable.
            unsafe { *bytes = n as usize };
        }
        Ok(0)
    })
}

fn limit(timeout_ms: c_int) -> Option<Duration> {
    u64::try_from(timeout_ms).ok().map(Duration::from_millis)
}

fn check_ip_buf_len(len: usize) -> Result<()> {
    if len < UCCL_IP_ADDR_BUF_MIN {
        return Err(Error::invalid(format!(
            "ip_addr_buf_len is {len}; at least {UCCL_IP_ADDR_BUF_MIN} bytes are needed for any address"
        )));
    }
    Ok(())
}

/// Writes `ip` and a NUL to a buffer already checked to hold UCCL_IP_ADDR_BUF_MIN bytes.
fn write_ip(buf: *mut c_char, ip: &str) {
    debug_assert!(ip.len() < UCCL_IP_ADDR_BUF_MIN);
    // SAFETY: the caller's buffer holds at least 46 bytes; an IP string is at most 45 plus the NUL.
    unsafe {
        std::ptr::copy_nonoverlapping(ip.as_ptr(), buf.cast::<u8>(), ip.len());
        *buf.add(ip.len()) = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::{CStr, CString, c_void};
    use std::ptr::null_mut;
    use std::time::Instant;

    use super::super::{
        FifoItem, last_error, uccl_engine_accept, uccl_engine_conn_destroy, uccl_engine_connect, uccl_engine_destroy,
        uccl_engine_get_metadata, uccl_engine_mr_destroy, uccl_engine_prepare_fifo, uccl_engine_read, uccl_engine_reg,
        uccl_engine_stop_accept, uccl_engine_write, uccl_tcpx_conn_link_stats, uccl_tcpx_conn_stats,
        uccl_tcpx_conn_stats_t, uccl_tcpx_link_stats_t,
    };
    use super::*;
    use testkit::child::ChildTest;

    fn invalid() -> c_int {
        UcclStatus::ErrInvalidParam as c_int
    }

    /// An engine as the environment of the test run makes it (it listens on every interface, so
    /// loopback reaches it).
    fn engine(gpu: c_int) -> *mut uccl_engine_t {
        let e = uccl_tcpx_engine_create_on(gpu);
        assert!(!e.is_null(), "{}", last_error());
        e
    }

    fn metadata(e: *mut uccl_engine_t) -> String {
        let mut text = null_mut();
        assert_eq!(uccl_engine_get_metadata(e, &mut text), 0);
        // SAFETY: the library returned a C string.
        let s = unsafe { CStr::from_ptr(text) }.to_str().unwrap().to_owned();
        super::super::uccl_engine_free_string(text);
        s
    }

    fn default_ip() -> (c_int, String) {
        let mut buf = [0x55 as c_char; UCCL_IP_ADDR_BUF_MIN];
        let rc = uccl_tcpx_default_ip(buf.as_mut_ptr(), buf.len());
        if rc != 0 {
            return (rc, last_error());
        }
        // SAFETY: the call wrote a NUL-terminated string on success.
        (rc, unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap().to_owned())
    }

    fn port_of(e: *mut uccl_engine_t) -> c_int {
        metadata(e).split('?').next().unwrap().rsplit(':').next().unwrap().parse().unwrap()
    }

    #[test]
    fn create_on_takes_a_gpu_none_or_the_default_and_refuses_the_rest() {
        for gpu in [UCCL_TCPX_GPU_NONE, UCCL_TCPX_GPU_DEFAULT] {
            let e = engine(gpu);
            let meta = metadata(e);
            if gpu == UCCL_TCPX_GPU_NONE || uccl_tcpx_gpu_count() == 0 {
                assert!(meta.ends_with("?0"), "an engine without a GPU names none: {meta}");
            }
            uccl_engine_destroy(e);
        }
        for bad in [-3, c_int::MIN] {
            assert!(uccl_tcpx_engine_create_on(bad).is_null());
            assert!(last_error().contains(&format!("gpu is {bad}")), "{}", last_error());
        }
        let beyond = uccl_tcpx_gpu_count();
        assert!(uccl_tcpx_engine_create_on(beyond).is_null(), "GPU {beyond} cannot exist");
        assert!(last_error().starts_with("uccl_tcpx_engine_create_on: "), "{}", last_error());
    }

    #[test]
    fn gpu_none_ignores_a_gpu_the_environment_names() {
        ChildTest::new("ffi::python_support::tests::gpu_none_child")
            .ignored()
            .env_cleared("UCCL_TCPX_")
            .env("UCCL_TCPX_GPU", "1023")
            .run();
    }

    /// The child of `gpu_none_ignores_a_gpu_the_environment_names`: UCCL_TCPX_GPU names a GPU no
    /// machine has, so only an engine that ignores it can be made.
    #[test]
    #[ignore = "run by gpu_none_ignores_a_gpu_the_environment_names in a child process"]
    fn gpu_none_child() {
        assert!(uccl_tcpx_engine_create_on(UCCL_TCPX_GPU_DEFAULT).is_null(), "the default rules take UCCL_TCPX_GPU");
        assert!(last_error().contains("UCCL_TCPX_GPU=1023"), "{}", last_error());
        let e = engine(UCCL_TCPX_GPU_NONE);
        assert!(metadata(e).ends_with("?0"), "no GPU: {}", metadata(e));
        uccl_engine_destroy(e);
    }

    #[test]
    fn gpu_count_matches_the_driver() {
        let n = uccl_tcpx_gpu_count();
        assert!(n >= 0);
        if !crate::cuda::available() {
            assert_eq!(n, 0, "no driver, no GPU");
        }
    }

    #[test]
    fn default_ip_is_the_address_an_engine_advertises() {
        let (rc, ip) = default_ip();
        assert_eq!(rc, 0, "{ip}");
        let e = engine(UCCL_TCPX_GPU_NONE);
        let meta = metadata(e);
        uccl_engine_destroy(e);
        let advertised = meta.rsplit_once(':').unwrap().0.trim_start_matches('[').trim_end_matches(']');
        assert_eq!(ip, advertised, "{meta}");
        let mut buf = [0 as c_char; 64];
        assert_eq!(uccl_tcpx_default_ip(buf.as_mut_ptr(), 45), invalid());
        assert!(last_error().contains("at least 46 bytes"), "{}", last_error());
        assert_eq!(uccl_tcpx_default_ip(null_mut(), 64), invalid());
        assert!(last_error().contains("`ip_addr_buf` is NULL"), "{}", last_error());
    }

    #[test]
    fn default_ip_follows_the_environment() {
        for value in ["10.1.2.3", "fd00::7", "not-an-ip"] {
            ChildTest::new("ffi::python_support::tests::default_ip_child")
                .ignored()
                .env_cleared("UCCL_TCPX_")
                .env("UCCL_TCPX_IP", value)
                .run();
        }
    }

    /// The child of `default_ip_follows_the_environment`: UCCL_TCPX_IP is set, well formed or not.
    #[test]
    #[ignore = "run by default_ip_follows_the_environment in a child process"]
    fn default_ip_child() {
        let (rc, got) = default_ip();
        match Config::from_env() {
            Ok(config) => {
                let named = config.ip.expect("the parent sets UCCL_TCPX_IP").to_string();
                assert_eq!((rc, got), (0, named));
            }
            Err(_) => {
                assert_eq!(rc, invalid(), "{got}");
                assert!(got.starts_with("uccl_tcpx_default_ip: ") && got.contains("UCCL_TCPX_IP"), "{got}");
            }
        }
    }

    #[test]
    fn accept_timeout_returns_in_time_then_accepts_and_stops() {
        let server = engine(UCCL_TCPX_GPU_NONE);
        let mut ip = [0 as c_char; UCCL_IP_ADDR_BUF_MIN];
        let mut gpu: c_int = -7;
        let mut conn: *mut uccl_conn_t = 8 as *mut uccl_conn_t;
        let started = Instant::now();
        let rc = uccl_tcpx_accept_timeout(server, 50, ip.as_mut_ptr(), ip.len(), &mut gpu, &mut conn);
        let waited = started.elapsed();
        assert_eq!(rc, 1, "{}", last_error());
        assert!(conn.is_null());
        assert_eq!(gpu, -7, "nothing is written when no peer came");
        // Not before its timeout; after it by no more than a loaded host's delay (a call that
        // ignored it would block for good).
        assert!(waited >= Duration::from_millis(45) && waited < testkit::PATIENCE, "{waited:?}");

        let port = port_of(server);
        let client = engine(UCCL_TCPX_GPU_NONE) as usize;
        let dialer = std::thread::spawn(move || {
            let host = CString::new("127.0.0.1").unwrap();
            let c = uccl_engine_connect(client as *mut _, host.as_ptr(), c"0".as_ptr(), port, false);
            (c as usize, client)
        });
        let rc = uccl_tcpx_accept_timeout(server, 10_000, ip.as_mut_ptr(), ip.len(), &mut gpu, &mut conn);
        assert_eq!(rc, 0, "{}", last_error());
        assert!(!conn.is_null());
        // SAFETY: the call wrote a NUL-terminated string.
        assert_eq!(unsafe { CStr::from_ptr(ip.as_ptr()) }.to_str().unwrap(), "127.0.0.1");
        assert_eq!(gpu, 0);
        let (client_conn, client) = dialer.join().unwrap();
        assert_ne!(client_conn, 0, "{}", last_error());

        assert_eq!(uccl_tcpx_accept_timeout(server, 0, ip.as_mut_ptr(), 45, &mut gpu, &mut conn), invalid());
        assert!(conn.is_null(), "a refused call clears the handle");
        assert_eq!(uccl_tcpx_accept_timeout(server, 0, ip.as_mut_ptr(), ip.len(), null_mut(), &mut conn), invalid());
        assert_eq!(uccl_tcpx_accept_timeout(server, 0, ip.as_mut_ptr(), ip.len(), &mut gpu, null_mut()), invalid());
        assert_eq!(
            uccl_tcpx_accept_timeout(null_mut(), 0, ip.as_mut_ptr(), ip.len(), &mut gpu, &mut conn),
            invalid(),
            "{}",
            last_error()
        );

        // stop_accept ends an unbounded wait promptly, as it ends uccl_engine_accept.
        let server_addr = server as usize;
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            uccl_engine_stop_accept(server_addr as *mut _);
        });
        let rc = uccl_tcpx_accept_timeout(server, -1, ip.as_mut_ptr(), ip.len(), &mut gpu, &mut conn);
        stopper.join().unwrap();
        assert_eq!(rc, UcclStatus::ErrCanceled as c_int, "{}", last_error());
        let mut old_gpu = 0;
        assert!(uccl_engine_accept(server, ip.as_mut_ptr(), ip.len(), &mut old_gpu).is_null());

        uccl_engine_conn_destroy(conn);
        uccl_engine_conn_destroy(client_conn as *mut _);
        uccl_engine_destroy(client as *mut _);
        uccl_engine_destroy(server);
    }

    #[test]
    fn wait_reports_in_progress_then_the_outcome_once() {
        let (server, client) = (engine(UCCL_TCPX_GPU_NONE), engine(UCCL_TCPX_GPU_NONE));
        let port = port_of(server);
        let server_addr = server as usize;
        let accepter = std::thread::spawn(move || {
            let (mut ip, mut gpu) = ([0 as c_char; UCCL_IP_ADDR_BUF_MIN], 0);
            uccl_engine_accept(server_addr as *mut _, ip.as_mut_ptr(), ip.len(), &mut gpu) as usize
        });
        let conn = uccl_engine_connect(client, c"127.0.0.1".as_ptr(), c"0".as_ptr(), port, false);
        assert!(!conn.is_null(), "{}", last_error());
        let served = accepter.join().unwrap() as *mut uccl_conn_t;
        assert!(!served.is_null());

        let target = vec![0u8; 1 << 20];
        let source: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let (mut target_mr, mut source_mr) = (0, 0);
        assert_eq!(uccl_engine_reg(server, target.as_ptr() as usize, target.len(), &mut target_mr), 0);
        assert_eq!(uccl_engine_reg(client, source.as_ptr() as usize, source.len(), &mut source_mr), 0);
        let mut blob = [0 as c_char; 64];
        assert_eq!(
            uccl_engine_prepare_fifo(server, target_mr, target.as_ptr().cast(), target.len(), blob.as_mut_ptr()),
            0
        );
        // SAFETY: 64 bytes written by prepare_fifo.
        let item = FifoItem::from_bytes(unsafe { &*blob.as_ptr().cast::<[u8; 64]>() });

        let mut id = 0u64;
        let data: *const c_void = source.as_ptr().cast();
        assert_eq!(uccl_engine_write(conn, source_mr, data, source.len(), item, &mut id), 0, "{}", last_error());
        let mut bytes = 0usize;
        let started = Instant::now();
        let rc = loop {
            // A zero timeout only polls: it must never block.
            let rc = uccl_tcpx_wait(conn, id, 0, &mut bytes);
            if rc != 1 || started.elapsed() > testkit::PATIENCE {
                break rc;
            }
            let rc = uccl_tcpx_wait(conn, id, 100, &mut bytes);
            if rc != 1 {
                break rc;
            }
        };
        assert_eq!((rc, bytes), (0, source.len()), "{}", last_error());
        assert_eq!(target, source);
        assert_eq!(uccl_tcpx_wait(conn, id, 100, null_mut()), UcclStatus::ErrNotFound as c_int, "reported once");

        // Without a limit, and with a NULL byte count.
        assert_eq!(uccl_engine_write(conn, source_mr, data, 4096, item, &mut id), 0, "{}", last_error());
        assert_eq!(uccl_tcpx_wait(conn, id, -1, null_mut()), 0, "{}", last_error());

        // A transfer the target refuses (past the advertised range) fails through the wait.
        let mut past = item;
        past.addr += 4096;
        assert_eq!(uccl_engine_write(conn, source_mr, data, source.len(), past, &mut id), 0, "{}", last_error());
        let rc = loop {
            let rc = uccl_tcpx_wait(conn, id, 100, null_mut());
            if rc != 1 {
                break rc;
            }
        };
        assert!(rc < 0, "a write past the advertised range must fail, got {rc}");

        assert!(uccl_tcpx_wait(null_mut(), 1, 0, null_mut()) < 0);
        assert!(uccl_tcpx_wait(conn, u64::MAX, 10, null_mut()) == UcclStatus::ErrNotFound as c_int);

        // A read back into the source registration, then the connection's counters.
        assert_eq!(uccl_engine_read(conn, source_mr, data, 4096, item, &mut id), 0, "{}", last_error());
        assert_eq!(uccl_tcpx_wait(conn, id, -1, null_mut()), 0, "{}", last_error());
        let full = size_of::<uccl_tcpx_conn_stats_t>();
        let mut stats = uccl_tcpx_conn_stats_t::default();
        assert_eq!(uccl_tcpx_conn_stats(conn, &mut stats, full), full as c_int, "{}", last_error());
        assert_eq!((stats.out_transfers, stats.out_bytes), (2, (1 << 20) + 4096));
        assert_eq!((stats.in_transfers, stats.in_bytes), (1, 4096));
        assert_eq!((stats.in_flight, stats.failed, stats.last_error), (0, 1, rc));
        assert_eq!(stats.errors[(-rc) as usize], 1, "{stats:?}");
        let mut served_stats = uccl_tcpx_conn_stats_t { out_transfers: 99, ..Default::default() };
        assert_eq!(uccl_tcpx_conn_stats(served, &mut served_stats, full), full as c_int);
        assert_eq!((served_stats.out_transfers, served_stats.in_transfers), (0, 0), "the peer's transfers count there");
        // A caller built against a shorter structure gets only its prefix.
        let mut old = uccl_tcpx_conn_stats_t { in_transfers: 77, ..Default::default() };
        assert_eq!(uccl_tcpx_conn_stats(conn, &mut old, 16), 16);
        assert_eq!((old.out_transfers, old.out_bytes, old.in_transfers), (2, (1 << 20) + 4096, 77));
        assert_eq!(uccl_tcpx_conn_stats(conn, &mut old, 4), invalid(), "smaller than the first field");
        let mut torn = uccl_tcpx_conn_stats_t { out_bytes: 5, ..Default::default() };
        assert_eq!(uccl_tcpx_conn_stats(conn, &mut torn, 12), 8, "whole fields only");
        assert_eq!((torn.out_transfers, torn.out_bytes), (2, 5));
        assert_eq!(uccl_tcpx_conn_stats(conn, null_mut(), full), invalid());
        assert!(uccl_tcpx_conn_stats(null_mut(), &mut old, full) < 0);

        // What the data sockets carried, per link: one here, 127.0.0.1 (the large transfers of two
        // engines of one process take the same-host path; tests/across_hosts.rs checks the bytes
        // against the interfaces' own counters).
        let entry = size_of::<uccl_tcpx_link_stats_t>();
        let n = uccl_tcpx_conn_link_stats(conn, null_mut(), 0, entry);
        assert_eq!(n, 1, "{}", last_error());
        // SAFETY: all-zero bytes are a valid value of this plain C structure.
        let mut links = [unsafe { std::mem::zeroed::<uccl_tcpx_link_stats_t>() }; 2];
        assert_eq!(uccl_tcpx_conn_link_stats(conn, links.as_mut_ptr(), links.len(), entry), 1);
        // SAFETY: the call wrote a NUL-terminated string.
        let ip = unsafe { CStr::from_ptr(links[0].link.as_ptr()) }.to_str().unwrap();
        assert_eq!(ip, "127.0.0.1");
        let l = links[0];
        assert!(l.out_sockets >= 1 && l.in_sockets >= 1 && l.out_errors + l.in_errors == 0, "{l:?}");
        assert!(l.out_bytes >= l.out_pieces && l.in_bytes >= l.in_pieces, "{l:?}");
        // SAFETY: as above.
        assert!(unsafe { CStr::from_ptr(links[1].link.as_ptr()) }.is_empty(), "one entry written");
        assert_eq!(uccl_tcpx_conn_link_stats(conn, null_mut(), 1, entry), invalid(), "NULL with room claimed");
        assert_eq!(uccl_tcpx_conn_link_stats(conn, links.as_mut_ptr(), 2, 4), invalid(), "an entry of 4 bytes");
        // A caller whose entries are shorter (an older header) gets its prefix at its own stride.
        let mut short = [[0xEEu8; 52]; 2];
        assert_eq!(uccl_tcpx_conn_link_stats(conn, short.as_mut_ptr().cast(), 2, 52), 1);
        assert_eq!(&short[0][..10], b"127.0.0.1\0");
        assert_eq!(u32::from_ne_bytes(short[0][48..52].try_into().unwrap()), l.out_sockets);
        assert!(short[1].iter().all(|&b| b == 0xEE), "nothing past the links there are");

        uccl_engine_conn_destroy(conn);
        uccl_engine_conn_destroy(served);
        uccl_engine_mr_destroy(server, target_mr);
        uccl_engine_mr_destroy(client, source_mr);
        uccl_engine_destroy(client);
        uccl_engine_destroy(server);
    }
}
