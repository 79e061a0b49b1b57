//! Transfers: one-sided write/read, two-sided send/recv, completion polling.

use std::ffi::{c_char, c_int, c_void};

use super::conn::{conn_ref, uccl_conn_t};
use super::fifo::FifoItem;
use super::memory::uccl_mr_t;
use super::{ffi_fn, non_null};
use crate::engine::OneSided;
use crate::error::{Error, Result};

fn store_id(transfer_id: *mut u64, id: u64) -> c_int {
    // SAFETY: callers check `transfer_id` non-NULL before posting.
    unsafe { *transfer_id = id };
    0
}

/// Turns the C vector arguments into one-sided items after checking every pointer and the count.
fn one_sided_items(
    mr_ids: *const uccl_mr_t,
    dst_v: *const *mut c_void,
    size_v: *const libc::size_t,
    fifo_items: *const FifoItem,
    num_iovs: c_int,
) -> Result<Vec<OneSided>> {
    let n = iov_count(num_iovs)?;
    let (mrs, ptrs, sizes, items) = (
        iov_array(mr_ids, n, "mr_ids")?,
        iov_array(dst_v, n, "dst_v")?,
        iov_array(size_v, n, "size_v")?,
        iov_array(fifo_items, n, "fifo_items")?,
    );
    Ok((0..n).map(|i| OneSided { mr: mrs[i], addr: ptrs[i] as usize, len: sizes[i], remote: items[i] }).collect())
}

/// Borrows the `n` elements of one C vector argument, rejecting NULL with a message naming it.
fn iov_array<'a, T>(ptr: *const T, n: usize, name: &str) -> Result<&'a [T]> {
    if ptr.is_null() {
        return Err(Error::invalid(format!("argument `{name}` is NULL")));
    }
    // SAFETY: each vector argument holds `num_iovs` elements per the contract; checked non-NULL.
    Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
}

/// Shared tail of the four one-sided calls; argument errors surface in the same order for all.
fn post_one_sided(
    conn: *mut uccl_conn_t,
    transfer_id: *mut u64,
    write: bool,
    ops: Result<Vec<OneSided>>,
) -> Result<c_int> {
    non_null!(transfer_id);
    let ops = ops?;
    let conn = conn_ref(conn)?;
    let id = if write { conn.write(&ops)? } else { conn.read(&ops)? };
    Ok(store_id(transfer_id, id))
}

fn iov_count(num_iovs: c_int) -> Result<usize> {
    if num_iovs <= 0 {
        return Err(Error::invalid(format!("num_iovs is {num_iovs}, must be positive")));
    }
    Ok(num_iovs as usize)
}

/// One-sided write of local `[data, data + size)` to the remote range `fifo_item` describes.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_write(
    conn: *mut uccl_conn_t,
    mr: uccl_mr_t,
    data: *const c_void,
    size: libc::size_t,
    fifo_item: FifoItem,
    transfer_id: *mut u64,
) -> c_int {
    let op = OneSided { mr, addr: data as usize, len: size, remote: fifo_item };
    ffi_fn!("uccl_engine_write", { post_one_sided(conn, transfer_id, true, Ok(vec![op])) })
}

/// One-sided read of the remote range `fifo_item` describes into local `[data, data + size)`.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_read(
    conn: *mut uccl_conn_t,
    mr: uccl_mr_t,
    data: *const c_void,
    size: libc::size_t,
    fifo_item: FifoItem,
    transfer_id: *mut u64,
) -> c_int {
    let op = OneSided { mr, addr: data as usize, len: size, remote: fifo_item };
    ffi_fn!("uccl_engine_read", { post_one_sided(conn, transfer_id, false, Ok(vec![op])) })
}

/// `num_iovs` one-sided writes under one transfer id; `dst_v[i]` are the local sources.
/// `ipc_bufs` may be NULL and is not read: on a local connection the engine copies directly (host
/// memory between engines of one process, and between processes of one host with
/// `process_vm_readv` where the kernel allows it; GPU memory between engines of one host through
/// the owner's CUDA IPC handle), after the target authorized the items as it would a network
/// peer's, and it learns the handle from the owner itself.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_write_vector(
    conn: *mut uccl_conn_t,
    mr_ids: *const uccl_mr_t,
    dst_v: *const *mut c_void,
    size_v: *const libc::size_t,
    fifo_items: *const FifoItem,
    num_iovs: c_int,
    transfer_id: *mut u64,
    ipc_bufs: *const *mut c_char,
) -> c_int {
    let _ = ipc_bufs;
    ffi_fn!("uccl_engine_write_vector", {
        post_one_sided(conn, transfer_id, true, one_sided_items(mr_ids, dst_v, size_v, fifo_items, num_iovs))
    })
}

/// `num_iovs` one-sided reads under one transfer id; `dst_v[i]` are the local destinations.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_read_vector(
    conn: *mut uccl_conn_t,
    mr_ids: *const uccl_mr_t,
    dst_v: *const *mut c_void,
    size_v: *const libc::size_t,
    fifo_items: *const FifoItem,
    num_iovs: c_int,
    transfer_id: *mut u64,
    ipc_bufs: *const *mut c_char,
) -> c_int {
    let _ = ipc_bufs;
    ffi_fn!("uccl_engine_read_vector", {
        post_one_sided(conn, transfer_id, false, one_sided_items(mr_ids, dst_v, size_v, fifo_items, num_iovs))
    })
}

/// Sends one message, matched by the peer's next receive. Non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_send_async(
    conn: *mut uccl_conn_t,
    mr: uccl_mr_t,
    data: *const c_void,
    size: libc::size_t,
    transfer_id: *mut u64,
) -> c_int {
    ffi_fn!("uccl_engine_send_async", {
        non_null!(transfer_id);
        Ok(store_id(transfer_id, conn_ref(conn)?.send(&[(mr, data as usize, size)])?))
    })
}

/// The same call as `uccl_engine_send_async` (non-blocking).
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_send(
    conn: *mut uccl_conn_t,
    mr: uccl_mr_t,
    data: *const c_void,
    size: libc::size_t,
    transfer_id: *mut u64,
) -> c_int {
    uccl_engine_send_async(conn, mr, data, size, transfer_id)
}

/// Sends `num_iovs` messages (each matched by one peer receive) under one transfer id.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_send_vector(
    conn: *mut uccl_conn_t,
    mr_ids: *const uccl_mr_t,
    src_v: *const *const c_void,
    size_v: *const libc::size_t,
    num_iovs: c_int,
    transfer_id: *mut u64,
) -> c_int {
    ffi_fn!("uccl_engine_send_vector", {
        non_null!(transfer_id);
        let n = iov_count(num_iovs)?;
        let (mrs, ptrs, sizes) =
            (iov_array(mr_ids, n, "mr_ids")?, iov_array(src_v, n, "src_v")?, iov_array(size_v, n, "size_v")?);
        let msgs: Vec<(u64, usize, usize)> = (0..n).map(|i| (mrs[i], ptrs[i] as usize, sizes[i])).collect();
        Ok(store_id(transfer_id, conn_ref(conn)?.send(&msgs)?))
    })
}

/// Posts a receive of at most `max_size` bytes; receives match the peer's sends in order. As with
/// UCCL's RDMA transport, `[data, data + max_size)` may run past the end of region `mr` (it must
/// start inside it): a message fails this receive (and the peer's send) with
/// `UCCL_STATUS_ERR_NOT_ALLOWED`, writing nothing, if its bytes would not all land in the region.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_recv_async(
    conn: *mut uccl_conn_t,
    mr: uccl_mr_t,
    data: *mut c_void,
    max_size: libc::size_t,
    transfer_id: *mut u64,
) -> c_int {
    ffi_fn!("uccl_engine_recv_async", {
        non_null!(transfer_id);
        Ok(store_id(transfer_id, conn_ref(conn)?.recv(mr, data as usize, max_size)?))
    })
}

/// Blocking receive; returns the bytes received or a negative status. `max_size` must fit an int.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_recv(
    conn: *mut uccl_conn_t,
    mr: uccl_mr_t,
    data: *mut c_void,
    max_size: libc::size_t,
) -> c_int {
    ffi_fn!("uccl_engine_recv", {
        if max_size > c_int::MAX as usize {
            return Err(Error::invalid(format!(
                "max_size {max_size} cannot be reported as an int; use uccl_engine_recv_async"
            )));
        }
        let conn = conn_ref(conn)?;
        let id = conn.recv(mr, data as usize, max_size)?;
        Ok(conn.wait(id)? as c_int)
    })
}

/// 1 while in progress, 0 once done (then `*bytes` holds the byte count; `bytes` may be NULL), or a
/// negative status. A finished transfer is reported once; its id is unknown afterwards. On a
/// connection to another process of this host, a poll first copies the reads of this transfer
/// whose target granted them and which no thread copies yet (copies the caller waits for anyway),
/// so it may return only after those copies; it runs no other transfer's work.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_poll(conn: *mut uccl_conn_t, transfer_id: u64, bytes: *mut libc::size_t) -> c_int {
    ffi_fn!("uccl_engine_poll", {
        match conn_ref(conn)?.poll(transfer_id)? {
            None => Ok(1),
            Some(n) => {
                if !bytes.is_null() {
                    // SAFETY: checked non-NULL; the caller's size_t is writable.
                    unsafe { *bytes = n as usize };
                }
                Ok(0)
            }
        }
    })
}

/// True once when the transfer finished successfully; false while in progress or on error (the
/// error, which also ends the transfer, is in `uccl_engine_last_error`; `uccl_engine_poll` tells them apart).
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_xfer_status(conn: *mut uccl_conn_t, transfer_id: u64) -> bool {
    ffi_fn!("uccl_engine_xfer_status", { Ok(conn_ref(conn)?.poll(transfer_id)?.is_some()) })
}

#[cfg(test)]
mod tests {
    use std::ptr::{null, null_mut};

    use super::super::last_error;
    use super::*;
    use crate::error::UcclStatus;

    /// The status and last error one call left.
    fn outcome(rc: c_int) -> (c_int, String) {
        (rc, last_error())
    }

    fn refused(name: &str, why: &str) -> (c_int, String) {
        (UcclStatus::ErrInvalidParam as c_int, format!("{name}: {why}"))
    }

    /// The one-sided vector calls check their arguments before the connection, in one order: the
    /// id, the count, then each array. In every case all is valid but what the case names.
    #[test]
    fn one_sided_vector_calls_name_the_first_bad_argument() {
        let (mrs, dsts, sizes, items) = ([0 as uccl_mr_t], [null_mut::<c_void>()], [0usize], [FifoItem::default()]);
        let (mrs, dsts, sizes, items) = (mrs.as_ptr(), dsts.as_ptr(), sizes.as_ptr(), items.as_ptr());
        let mut id = 0u64;
        let id = &raw mut id;
        for (name, write) in [("uccl_engine_write_vector", true), ("uccl_engine_read_vector", false)] {
            let call = |mrs, dsts, sizes, items, num, id| {
                outcome(if write {
                    uccl_engine_write_vector(null_mut(), mrs, dsts, sizes, items, num, id, null())
                } else {
                    uccl_engine_read_vector(null_mut(), mrs, dsts, sizes, items, num, id, null())
                })
            };
            assert_eq!(call(mrs, dsts, sizes, items, 1, null_mut()), refused(name, "argument `transfer_id` is NULL"));
            assert_eq!(call(null(), null(), sizes, items, 0, id), refused(name, "num_iovs is 0, must be positive"));
            assert_eq!(call(null(), null(), sizes, items, 1, id), refused(name, "argument `mr_ids` is NULL"));
            assert_eq!(call(mrs, null(), null(), items, 1, id), refused(name, "argument `dst_v` is NULL"));
            assert_eq!(call(mrs, dsts, null(), null(), 1, id), refused(name, "argument `size_v` is NULL"));
            assert_eq!(call(mrs, dsts, sizes, null(), 1, id), refused(name, "argument `fifo_items` is NULL"));
        }
    }

    #[test]
    fn send_vector_names_the_first_bad_argument() {
        let (mrs, srcs, sizes) = ([0 as uccl_mr_t], [null::<c_void>()], [0usize]);
        let (mrs, srcs, sizes) = (mrs.as_ptr(), srcs.as_ptr(), sizes.as_ptr());
        let mut id = 0u64;
        let id = &raw mut id;
        let call = |mrs, srcs, sizes, num, id| outcome(uccl_engine_send_vector(null_mut(), mrs, srcs, sizes, num, id));
        let name = "uccl_engine_send_vector";
        assert_eq!(call(mrs, srcs, sizes, 1, null_mut()), refused(name, "argument `transfer_id` is NULL"));
        assert_eq!(call(null(), null(), sizes, -1, id), refused(name, "num_iovs is -1, must be positive"));
        assert_eq!(call(null(), null(), sizes, 1, id), refused(name, "argument `mr_ids` is NULL"));
        assert_eq!(call(mrs, null(), null(), 1, id), refused(name, "argument `src_v` is NULL"));
        assert_eq!(call(mrs, srcs, null(), 1, id), refused(name, "argument `size_v` is NULL"));
    }
}
