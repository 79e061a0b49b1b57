//! A connection's counters for C callers, in all and per data link. The structure only grows at its end, and callers pass
//! the size they were compiled with, so a program built against an older header keeps working
//! with a newer library (it gets the fields it knows) and a newer program with an older library
//! learns how much was filled.

use std::ffi::{c_char, c_int};

use super::conn::{conn_ref, uccl_conn_t};
use super::engine::UCCL_IP_ADDR_BUF_MIN;
use super::ffi_fn;
use crate::engine::stats::{ConnStats, LinkTotals, STATUS_SLOTS};
use crate::error::Error;

/// Slots of `uccl_tcpx_conn_stats_t::errors`: slot `n` counts failures with status `-n`.
pub const UCCL_TCPX_STATUS_SLOTS: usize = 16;
const _: () = assert!(UCCL_TCPX_STATUS_SLOTS == STATUS_SLOTS);

/// What a connection's transfers moved and how they ended, counted from its creation. A transfer
/// counts once it ended, for the way its bytes went: writes and sends out, reads and receives in.
/// Transfers the peer runs against this side's memory count at the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct uccl_tcpx_conn_stats_t {
    /// Writes and sends that succeeded, and their bytes.
    pub out_transfers: u64,
    pub out_bytes: u64,
    /// Reads and receives that succeeded, and their bytes.
    pub in_transfers: u64,
    pub in_bytes: u64,
    /// Transfers posted and not ended.
    pub in_flight: u64,
    /// Transfers that failed once they had an id (a call refused by its argument checks returns
    /// its status and is counted nowhere).
    pub failed: u64,
    /// Failed transfers by status: `errors[n]` counts status `-n` (`UCCL_STATUS_ERR_TIMEOUT` is
    /// -14, so `errors[14]`).
    pub errors: [u64; UCCL_TCPX_STATUS_SLOTS],
    /// Stretches in which a transport declined posts for now and they were retried (one per
    /// stretch).
    pub retries: u64,
    /// The status of the latest failure; 0 while none failed.
    pub last_error: i32,
    pub reserved: u32,
    /// The peer's mid-size messages (sends past the inline bound, up to 1 MiB) that arrived before
    /// a receive was posted for them: each waited in the connection's landing memory and was
    /// copied into its receive. Counting up with every message: receives posted earlier save that
    /// copy.
    pub landed: u64,
    /// Times the connection closed its channels after they moved nothing for
    /// `UCCL_TCPX_IDLE_CLOSE_MS`, and opened new ones for a transfer (which waited for them).
    pub idle_closes: u64,
    pub reopens: u64,
}

impl From<ConnStats> for uccl_tcpx_conn_stats_t {
    fn from(s: ConnStats) -> Self {
        uccl_tcpx_conn_stats_t {
            out_transfers: s.out.transfers,
            out_bytes: s.out.bytes,
            in_transfers: s.inbound.transfers,
            in_bytes: s.inbound.bytes,
            in_flight: s.in_flight,
            failed: s.failed,
            errors: s.errors,
            retries: s.retries,
            last_error: s.last_error,
            reserved: 0,
            landed: s.landed,
            idle_closes: s.idle_closes,
            reopens: s.reopens,
        }
    }
}

/// Reads `conn`'s counters into `stats`, of which the caller owns `stats_size` bytes (pass
/// `sizeof(uccl_tcpx_conn_stats_t)`); at most that many are written, in whole fields, never more
/// than this library's structure holds. Returns the number of bytes written (a caller built against a
/// newer header learns which fields this library filled), or a negative status: a NULL or unknown
/// connection, a NULL `stats`, or a size smaller than the first field.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_conn_stats(
    conn: *mut uccl_conn_t,
    stats: *mut uccl_tcpx_conn_stats_t,
    stats_size: libc::size_t,
) -> c_int {
    ffi_fn!("uccl_tcpx_conn_stats", {
        let conn = conn_ref(conn)?;
        if stats.is_null() {
            return Err(Error::invalid("stats is NULL"));
        }
        if stats_size < size_of::<u64>() {
            return Err(Error::invalid(format!(
                "stats_size is {stats_size}: pass sizeof(uccl_tcpx_conn_stats_t) ({} with this library's header)",
                size_of::<uccl_tcpx_conn_stats_t>()
            )));
        }
        let filled = uccl_tcpx_conn_stats_t::from(conn.stats());
        // Whole fields only: every field up to `last_error` is 8 bytes, so a size between two
        // fields ends at the earlier one instead of writing half of a counter.
        let n = stats_size.min(size_of::<uccl_tcpx_conn_stats_t>()) & !7;
        // SAFETY: `stats` is non-NULL and the caller owns `stats_size` >= n bytes there; the source
        // is a live local of at least n bytes; a byte copy needs no alignment.
        unsafe { std::ptr::copy_nonoverlapping((&raw const filled).cast::<u8>(), stats.cast::<u8>(), n) };
        Ok(n as c_int)
    })
}

/// What a connection's data sockets on one link carried, both ways, summed over its channels.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct uccl_tcpx_link_stats_t {
    /// The link's local address as text, NUL-terminated: a data link of `UCCL_TCPX_SOCKET_IFNAME`,
    /// else the engine's own address.
    pub link: [c_char; UCCL_IP_ADDR_BUF_MIN],
    pub reserved: [u8; 2],
    /// Data sockets on the link, sending and receiving.
    pub out_sockets: u32,
    pub in_sockets: u32,
    /// Payload bytes and pieces moved whole, and sockets that failed, sending.
    pub out_bytes: u64,
    pub out_pieces: u64,
    pub out_errors: u64,
    /// The same, receiving.
    pub in_bytes: u64,
    pub in_pieces: u64,
    pub in_errors: u64,
}

impl From<&LinkTotals> for uccl_tcpx_link_stats_t {
    fn from(t: &LinkTotals) -> Self {
        let mut link = [0 as c_char; UCCL_IP_ADDR_BUF_MIN];
        // An IP's text is at most 45 bytes, so the NUL always fits.
        for (dst, b) in link.iter_mut().zip(t.link.to_string().bytes().take(UCCL_IP_ADDR_BUF_MIN - 1)) {
            *dst = b as c_char;
        }
        uccl_tcpx_link_stats_t {
            link,
            reserved: [0; 2],
            out_sockets: t.out.sockets,
            in_sockets: t.inbound.sockets,
            out_bytes: t.out.bytes,
            out_pieces: t.out.pieces,
            out_errors: t.out.errors,
            in_bytes: t.inbound.bytes,
            in_pieces: t.inbound.pieces,
            in_errors: t.inbound.errors,
        }
    }
}

/// Writes what `conn`'s data sockets carried per link into `links`, an array of `capacity`
/// entries of `entry_size` bytes each (pass `sizeof(uccl_tcpx_link_stats_t)`: a caller built
/// against an older, shorter entry gets the fields it knows, at its own stride), and returns how
/// many links there are (call with `capacity` 0 and NULL to learn the count), or a negative
/// status. The counts outlive a failure of the connection. A transport without per-socket counts
/// (a net plugin) reports none.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_conn_link_stats(
    conn: *mut uccl_conn_t,
    links: *mut uccl_tcpx_link_stats_t,
    capacity: libc::size_t,
    entry_size: libc::size_t,
) -> c_int {
    ffi_fn!("uccl_tcpx_conn_link_stats", {
        let conn = conn_ref(conn)?;
        if capacity > 0 {
            if links.is_null() {
                return Err(Error::invalid(format!("links is NULL with capacity {capacity}")));
            }
            if entry_size < size_of::<u64>() {
                return Err(Error::invalid(format!(
                    "entry_size is {entry_size}: pass sizeof(uccl_tcpx_link_stats_t) ({} with this library's header)",
                    size_of::<uccl_tcpx_link_stats_t>()
                )));
            }
        }
        let totals = conn.link_stats();
        let n = entry_size.min(size_of::<uccl_tcpx_link_stats_t>());
        for (k, t) in totals.iter().take(capacity).enumerate() {
            let entry = uccl_tcpx_link_stats_t::from(t);
            // SAFETY: the caller owns `capacity` > k entries of `entry_size` >= n bytes at `links`;
            // the source is a local of at least n bytes; a byte copy needs no alignment.
            unsafe {
                let at = links.cast::<u8>().add(k * entry_size);
                std::ptr::copy_nonoverlapping((&raw const entry).cast::<u8>(), at, n);
            }
        }
        c_int::try_from(totals.len()).map_err(|_| Error::internal("more links than an int counts"))
    })
}
