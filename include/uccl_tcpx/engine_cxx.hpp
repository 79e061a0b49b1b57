/*
 * uccl-tcpx: the C++ forms of UCCL's uccl_engine.h, as inline functions over the C ABI.
 *
 * UCCL's header is C++: std::vector parameters, references, a defaulted argument, functions that
 * return std::vector, notify_msg_v_t with std::string members, and serialize_fifo_item /
 * deserialize_fifo_item from its common.h. This file declares exactly those signatures, so code
 * written against UCCL's uccl_engine.h + common.h (NIXL's UCCL backend, for one) compiles
 * unchanged against uccl-tcpx. Everything here is inline and forwards to the extern "C" functions
 * of uccl_engine.h, so libuccl_tcpx.so is all such code links. (libuccl_p2p.so exports the same
 * functions under UCCL's mangled names, for binaries built against UCCL's own header.)
 *
 * uccl_engine.h includes this file at its end in every C++ translation unit unless
 * UCCL_TCPX_C_ONLY is defined; including it directly is equivalent.
 *
 * Differences from UCCL that a C++ caller can observe (all documented again at each function):
 *  - uccl_engine_get_metadata returns a string allocated with new[], to be released with delete[]
 *    as UCCL's callers do. In C++ translation units the names uccl_engine_get_metadata and
 *    uccl_engine_free_string are macros for the inline functions below, so both spellings of the
 *    release (delete[] and uccl_engine_free_string) are correct there. A string obtained in a C
 *    translation unit must be released with uccl_engine_free_string in a C translation unit.
 *  - uccl_engine_send, uccl_engine_send_vector and uccl_engine_recv send and receive (UCCL's
 *    current engine returns -1 from them).
 *  - Failures are negative uccl_status_t values, not only -1; 0 is success everywhere, as there.
 *  - Argument checks done here (vectors shorter than num_iovs) return
 *    UCCL_STATUS_ERR_INVALID_PARAM without updating uccl_engine_last_error().
 */
#ifndef UCCL_TCPX_ENGINE_CXX_HPP
#define UCCL_TCPX_ENGINE_CXX_HPP

#ifndef __cplusplus
#error "uccl_tcpx/engine_cxx.hpp is C++ only; C code includes uccl_engine.h"
#endif

#include "../uccl_engine.h"
#include "cxx_detail.hpp" /* notify_msg_v_t and the helpers shared with libuccl_p2p.so */

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

/* Kept from UCCL's header, where it is vestigial; nothing here uses it. */
typedef struct md {
  notify_msg_t notify_data;
} md_t;

/* ---- connect: same_process defaults to false, as in UCCL ----------------------------------- */

/* A redeclaration of the C function that adds the default argument: the function (and its
 * address) stays the extern "C" one. */
uccl_conn_t *uccl_engine_connect(uccl_engine_t *engine, const char *ip_addr,
                                 const char *remote_gpu, int remote_port,
                                 bool same_process = false);

/* ---- metadata: a delete[]-able string ------------------------------------------------------- */

/* uccl_engine_get_metadata for C++ callers: the string is copied into `new char[]`, so `delete[]`
 * releases it, as UCCL's callers do. Failures and a NULL `metadata_str` behave as in C (the status
 * is returned, `*metadata_str` is left alone). A failed allocation returns
 * UCCL_STATUS_ERR_INTERNAL. */
inline int uccl_tcpx_cxx_get_metadata(uccl_engine_t *engine, char **metadata_str) {
  return uccl_tcpx::detail::get_metadata_new(::uccl_engine_get_metadata, engine, metadata_str);
}

/* uccl_engine_free_string for C++ callers: releases what uccl_tcpx_cxx_get_metadata returned.
 * NULL is a no-op. */
inline void uccl_tcpx_cxx_free_string(char *s) { delete[] s; }

/* From here on, C++ code calling these names gets the two functions above. */
#define uccl_engine_get_metadata uccl_tcpx_cxx_get_metadata
#define uccl_engine_free_string uccl_tcpx_cxx_free_string

/* ---- references instead of pointers ---------------------------------------------------------- */

inline int uccl_engine_reg(uccl_engine_t *engine, uintptr_t data, size_t size, uccl_mr_t &mr_id) {
  return ::uccl_engine_reg(engine, data, size, &mr_id);
}

/* Sets `addr` and `size`; the target still checks the range against what it advertised. Returns 0,
 * or UCCL_STATUS_ERR_INVALID_PARAM for a zero size or a range that wraps around (UCCL always
 * returns 0). */
inline int uccl_engine_update_fifo(FifoItem &fifo_item, uint64_t remote_addr, uint32_t size) {
  return ::uccl_engine_update_fifo(&fifo_item, remote_addr, size);
}

/* ---- FifoItem wire form, as UCCL's common.h declares it --------------------------------------- */

inline void serialize_fifo_item(FifoItem const &item, char *buf) {
  ::uccl_engine_serialize_fifo_item(&item, buf);
}

inline void deserialize_fifo_item(char const *buf, FifoItem *item) {
  ::uccl_engine_deserialize_fifo_item(buf, item);
}

/* ---- vector transfers --------------------------------------------------------------------------- */

/* `num_iovs` one-sided reads under one transfer id (poll it with uccl_engine_xfer_status or
 * uccl_engine_poll). `dst_v[i]` are the local destinations. `ipc_bufs` may be empty; the engine does
 * not read its entries (on a local connection it gets the owner's IPC handle from the owner, after
 * the owner authorized the request), but a non-empty vector must hold `num_iovs` entries. */
inline int uccl_engine_read_vector(uccl_conn_t *conn, std::vector<uccl_mr_t> mr_ids,
                                   std::vector<void *> dst_v, std::vector<size_t> size_v,
                                   std::vector<FifoItem> fifo_items, int num_iovs,
                                   uint64_t *transfer_id, std::vector<char *> ipc_bufs = {}) {
  return uccl_tcpx::detail::one_sided_vector(::uccl_engine_read_vector, conn, mr_ids, dst_v, size_v,
                                             fifo_items, num_iovs, transfer_id, ipc_bufs);
}

/* As uccl_engine_read_vector; `dst_v[i]` are the local sources (the name is UCCL's). */
inline int uccl_engine_write_vector(uccl_conn_t *conn, std::vector<uccl_mr_t> mr_ids,
                                    std::vector<void *> dst_v, std::vector<size_t> size_v,
                                    std::vector<FifoItem> fifo_items, int num_iovs,
                                    uint64_t *transfer_id, std::vector<char *> ipc_bufs = {}) {
  return uccl_tcpx::detail::one_sided_vector(::uccl_engine_write_vector, conn, mr_ids, dst_v,
                                             size_v, fifo_items, num_iovs, transfer_id, ipc_bufs);
}

/* `num_iovs` messages, each matched by one receive on the peer, under one transfer id. (UCCL's
 * current engine returns -1 here; this one sends.) */
inline int uccl_engine_send_vector(uccl_conn_t *conn, std::vector<uccl_mr_t> mr_ids,
                                   std::vector<void const *> src_v, std::vector<size_t> size_v,
                                   int num_iovs, uint64_t *transfer_id) {
  return uccl_tcpx::detail::send_vector(conn, mr_ids, src_v, size_v, num_iovs, transfer_id);
}

/* ---- notifications ------------------------------------------------------------------------------ */

/* Drains every notification received so far by any engine of the process (as UCCL's does). `name`
 * is a C string; `msg` holds the first 256 bytes of the message, zero padded. */
inline std::vector<notify_msg_t> uccl_engine_get_notifs() {
  return uccl_tcpx::detail::drain_notifs();
}

/* Sends `name` (at most 255 bytes, no NUL) and `msg` (up to 64 MiB), which receivers get whole from
 * uccl_engine_get_notifs_v. A NULL `msg` returns UCCL_STATUS_ERR_INVALID_PARAM and sets
 * last_error. */
inline int uccl_engine_send_notif_v(uccl_conn_t *conn, notify_msg_v_t const *msg) {
  if (msg == nullptr) return ::uccl_engine_send_notif(conn, nullptr);
  return ::uccl_engine_send_notif_v(conn, msg->name.data(), msg->name.size(), msg->msg.data(),
                                    msg->msg.size());
}

/* Drains the same queue as uccl_engine_get_notifs(), as name/message strings, every message whole
 * (zero bytes included). */
inline std::vector<notify_msg_v_t> uccl_engine_get_notifs_v() {
  return uccl_tcpx::detail::drain_notifs_v();
}

#endif /* UCCL_TCPX_ENGINE_CXX_HPP */
