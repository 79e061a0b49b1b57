/*
 * libuccl_p2p.so, part 1 of 2: the C++ functions UCCL's libuccl_p2p.so exports, defined over the C
 * ABI of libuccl_tcpx.so.
 *
 * UCCL's uccl_engine.h has no extern "C", so a program or plugin built against it (NIXL's UCCL
 * backend, for one) calls C++-mangled names whose parameter types are part of the name:
 * `uccl_engine_create(int, bool)` is `_Z18uccl_engine_createib`, the vector calls take
 * `std::vector` by value, `get_notifs` returns one. This file defines each of those functions with
 * UCCL's exact declaration, so the compiler produces the same names and calling conventions, and
 * forwards to the C function of the same purpose. It covers the functions of UCCL's released library
 * (the `uccl` 0.1.1 wheel) and of its current header (which adds `send_vector`, the `_v`
 * notification calls and `serialize_fifo_item` / `deserialize_fifo_item`).
 *
 * `std::vector` and `std::string` cross this boundary, so caller and library must agree on their
 * layout: libstdc++ with the __cxx11 string ABI (GCC >= 5, `_GLIBCXX_USE_CXX11_ABI=1`, the default),
 * which is also what UCCL's library is built with.
 *
 * The C library itself stays free of C++: C programs link libuccl_tcpx.so and never load libstdc++.
 * Part 2 (generated from uccl_engine.h, see p2p/forwarders.cmake) makes this library export the C
 * functions too, so that a build that links only -luccl_p2p (NIXL's does) resolves them.
 *
 * Semantics are UCCL's with the C ABI's statuses: 0 is success, failures are negative (UCCL: -1).
 * Where UCCL's current engine has no implementation (send, send_vector and recv return -1 there),
 * these forward to the working C functions.
 */

// Only the C declarations of our header: its C++ section declares inline functions with the very
// names and signatures this file defines out of line.
#define UCCL_TCPX_C_ONLY 1

// The C functions whose parameter lists equal UCCL's C++ ones cannot share a name with them in one
// translation unit (a later declaration would inherit the C linkage). Here they are declared under
// other names that still bind to their C symbols; the C++ definitions below take the real names.
#pragma redefine_extname uccl_tcpx_c_create uccl_engine_create
#pragma redefine_extname uccl_tcpx_c_destroy uccl_engine_destroy
#pragma redefine_extname uccl_tcpx_c_connect uccl_engine_connect
#pragma redefine_extname uccl_tcpx_c_start_listener uccl_engine_start_listener
#pragma redefine_extname uccl_tcpx_c_stop_listener uccl_engine_stop_listener
#pragma redefine_extname uccl_tcpx_c_accept uccl_engine_accept
#pragma redefine_extname uccl_tcpx_c_read uccl_engine_read
#pragma redefine_extname uccl_tcpx_c_write uccl_engine_write
#pragma redefine_extname uccl_tcpx_c_send uccl_engine_send
#pragma redefine_extname uccl_tcpx_c_recv uccl_engine_recv
#pragma redefine_extname uccl_tcpx_c_xfer_status uccl_engine_xfer_status
#pragma redefine_extname uccl_tcpx_c_conn_destroy uccl_engine_conn_destroy
#pragma redefine_extname uccl_tcpx_c_mr_destroy uccl_engine_mr_destroy
#pragma redefine_extname uccl_tcpx_c_get_metadata uccl_engine_get_metadata
#pragma redefine_extname uccl_tcpx_c_send_notif uccl_engine_send_notif
#pragma redefine_extname uccl_tcpx_c_prepare_fifo uccl_engine_prepare_fifo
#pragma redefine_extname uccl_tcpx_c_conn_is_local uccl_engine_conn_is_local
#pragma redefine_extname uccl_tcpx_c_get_ipc_info uccl_engine_get_ipc_info
#pragma redefine_extname uccl_tcpx_c_update_ipc_info uccl_engine_update_ipc_info
#pragma redefine_extname uccl_tcpx_c_stop_accept uccl_engine_stop_accept
#define uccl_engine_create uccl_tcpx_c_create
#define uccl_engine_destroy uccl_tcpx_c_destroy
#define uccl_engine_connect uccl_tcpx_c_connect
#define uccl_engine_start_listener uccl_tcpx_c_start_listener
#define uccl_engine_stop_listener uccl_tcpx_c_stop_listener
#define uccl_engine_accept uccl_tcpx_c_accept
#define uccl_engine_read uccl_tcpx_c_read
#define uccl_engine_write uccl_tcpx_c_write
#define uccl_engine_send uccl_tcpx_c_send
#define uccl_engine_recv uccl_tcpx_c_recv
#define uccl_engine_xfer_status uccl_tcpx_c_xfer_status
#define uccl_engine_conn_destroy uccl_tcpx_c_conn_destroy
#define uccl_engine_mr_destroy uccl_tcpx_c_mr_destroy
#define uccl_engine_get_metadata uccl_tcpx_c_get_metadata
#define uccl_engine_send_notif uccl_tcpx_c_send_notif
#define uccl_engine_prepare_fifo uccl_tcpx_c_prepare_fifo
#define uccl_engine_conn_is_local uccl_tcpx_c_conn_is_local
#define uccl_engine_get_ipc_info uccl_tcpx_c_get_ipc_info
#define uccl_engine_update_ipc_info uccl_tcpx_c_update_ipc_info
#define uccl_engine_stop_accept uccl_tcpx_c_stop_accept
#include <uccl_engine.h>
#undef uccl_engine_create
#undef uccl_engine_destroy
#undef uccl_engine_connect
#undef uccl_engine_start_listener
#undef uccl_engine_stop_listener
#undef uccl_engine_accept
#undef uccl_engine_read
#undef uccl_engine_write
#undef uccl_engine_send
#undef uccl_engine_recv
#undef uccl_engine_xfer_status
#undef uccl_engine_conn_destroy
#undef uccl_engine_mr_destroy
#undef uccl_engine_get_metadata
#undef uccl_engine_send_notif
#undef uccl_engine_prepare_fifo
#undef uccl_engine_conn_is_local
#undef uccl_engine_get_ipc_info
#undef uccl_engine_update_ipc_info
#undef uccl_engine_stop_accept

#include <uccl_tcpx/cxx_detail.hpp> /* notify_msg_v_t and the helpers engine_cxx.hpp uses too */

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#if !defined(__GLIBCXX__) || !_GLIBCXX_USE_CXX11_ABI
#error "libuccl_p2p.so is built with libstdc++'s __cxx11 ABI (GCC >= 5), as UCCL's library is"
#endif

static_assert(sizeof(FifoItem) == FIFO_SIZE, "FifoItem is passed by value: 64 bytes, as in UCCL");
static_assert(sizeof(notify_msg_t) == 2 * MSG_SIZE, "notify_msg_t is UCCL's 512-byte struct");

#define UCCL_P2P_EXPORT __attribute__((visibility("default")))

/* ---- engine and connections -------------------------------------------------------------------- */

UCCL_P2P_EXPORT uccl_engine_t *uccl_engine_create(int num_cpus, bool in_python) {
  return uccl_tcpx_c_create(num_cpus, in_python);
}

UCCL_P2P_EXPORT void uccl_engine_destroy(uccl_engine_t *engine) { uccl_tcpx_c_destroy(engine); }

UCCL_P2P_EXPORT uccl_conn_t *uccl_engine_connect(uccl_engine_t *engine, char const *ip_addr,
                                                 char const *remote_gpu, int remote_port,
                                                 bool same_process) {
  return uccl_tcpx_c_connect(engine, ip_addr, remote_gpu, remote_port, same_process);
}

UCCL_P2P_EXPORT uccl_conn_t *uccl_engine_accept(uccl_engine_t *engine, char *ip_addr_buf,
                                                size_t ip_addr_buf_len, int *remote_gpu_idx) {
  return uccl_tcpx_c_accept(engine, ip_addr_buf, ip_addr_buf_len, remote_gpu_idx);
}

UCCL_P2P_EXPORT void uccl_engine_stop_accept(uccl_engine_t *engine) {
  uccl_tcpx_c_stop_accept(engine);
}

UCCL_P2P_EXPORT int uccl_engine_start_listener(uccl_conn_t *conn) {
  return uccl_tcpx_c_start_listener(conn);
}

/* Exported by UCCL's library though its header does not declare it. As in UCCL, a later
 * start_listener succeeds again, and NULL gives -1. */
UCCL_P2P_EXPORT int uccl_engine_stop_listener(uccl_conn_t *conn) {
  return conn ? uccl_tcpx_c_stop_listener(conn) : -1;
}

UCCL_P2P_EXPORT void uccl_engine_conn_destroy(uccl_conn_t *conn) { uccl_tcpx_c_conn_destroy(conn); }

UCCL_P2P_EXPORT bool uccl_engine_conn_is_local(uccl_conn_t *conn) {
  return uccl_tcpx_c_conn_is_local(conn);
}

/* UCCL's callers release the string with delete[], so it is copied into new[] storage. */
UCCL_P2P_EXPORT int uccl_engine_get_metadata(uccl_engine_t *engine, char **metadata_str) {
  return uccl_tcpx::detail::get_metadata_new(uccl_tcpx_c_get_metadata, engine, metadata_str);
}

/* ---- memory ------------------------------------------------------------------------------------ */

UCCL_P2P_EXPORT int uccl_engine_reg(uccl_engine_t *engine, uintptr_t data, size_t size,
                                    uccl_mr_t &mr_id) {
  return ::uccl_engine_reg(engine, data, size, &mr_id);
}

UCCL_P2P_EXPORT void uccl_engine_mr_destroy(uccl_engine_t *engine, uccl_mr_t mr) {
  uccl_tcpx_c_mr_destroy(engine, mr);
}

UCCL_P2P_EXPORT int uccl_engine_prepare_fifo(uccl_engine_t *engine, uccl_mr_t mr, void const *data,
                                             size_t size, char *fifo_buf) {
  return uccl_tcpx_c_prepare_fifo(engine, mr, data, size, fifo_buf);
}

UCCL_P2P_EXPORT int uccl_engine_update_fifo(FifoItem &fifo_item, uint64_t remote_addr,
                                            uint32_t size) {
  return ::uccl_engine_update_fifo(&fifo_item, remote_addr, size);
}

UCCL_P2P_EXPORT void serialize_fifo_item(FifoItem const &item, char *buf) {
  ::uccl_engine_serialize_fifo_item(&item, buf);
}

UCCL_P2P_EXPORT void deserialize_fifo_item(char const *buf, FifoItem *item) {
  ::uccl_engine_deserialize_fifo_item(buf, item);
}

UCCL_P2P_EXPORT int uccl_engine_get_ipc_info(uccl_engine_t *engine, uintptr_t addr, char *ipc_buf,
                                             bool *has_ipc) {
  return uccl_tcpx_c_get_ipc_info(engine, addr, ipc_buf, has_ipc);
}

UCCL_P2P_EXPORT int uccl_engine_update_ipc_info(char *ipc_buf, uintptr_t addr, uintptr_t base_addr,
                                                size_t size) {
  return uccl_tcpx_c_update_ipc_info(ipc_buf, addr, base_addr, size);
}

/* ---- transfers --------------------------------------------------------------------------------- */

UCCL_P2P_EXPORT int uccl_engine_read(uccl_conn_t *conn, uccl_mr_t mr, void const *data, size_t size,
                                     FifoItem fifo_item, uint64_t *transfer_id) {
  return uccl_tcpx_c_read(conn, mr, data, size, fifo_item, transfer_id);
}

UCCL_P2P_EXPORT int uccl_engine_write(uccl_conn_t *conn, uccl_mr_t mr, void const *data,
                                      size_t size, FifoItem fifo_item, uint64_t *transfer_id) {
  return uccl_tcpx_c_write(conn, mr, data, size, fifo_item, transfer_id);
}

/* One transfer id for the batch. `dst_v[i]` are the local destinations; `ipc_bufs` may be empty
 * (there is no IPC path), else it must hold num_iovs entries. */
UCCL_P2P_EXPORT int uccl_engine_read_vector(uccl_conn_t *conn, std::vector<uccl_mr_t> mr_ids,
                                            std::vector<void *> dst_v, std::vector<size_t> size_v,
                                            std::vector<FifoItem> fifo_items, int num_iovs,
                                            uint64_t *transfer_id, std::vector<char *> ipc_bufs) {
  return uccl_tcpx::detail::one_sided_vector(::uccl_engine_read_vector, conn, mr_ids, dst_v, size_v,
                                             fifo_items, num_iovs, transfer_id, ipc_bufs);
}

/* As read_vector; `dst_v[i]` are the local sources (the parameter name is UCCL's). */
UCCL_P2P_EXPORT int uccl_engine_write_vector(uccl_conn_t *conn, std::vector<uccl_mr_t> mr_ids,
                                             std::vector<void *> dst_v, std::vector<size_t> size_v,
                                             std::vector<FifoItem> fifo_items, int num_iovs,
                                             uint64_t *transfer_id, std::vector<char *> ipc_bufs) {
  return uccl_tcpx::detail::one_sided_vector(::uccl_engine_write_vector, conn, mr_ids, dst_v,
                                             size_v, fifo_items, num_iovs, transfer_id, ipc_bufs);
}

UCCL_P2P_EXPORT int uccl_engine_send(uccl_conn_t *conn, uccl_mr_t mr, void const *data, size_t size,
                                     uint64_t *transfer_id) {
  return uccl_tcpx_c_send(conn, mr, data, size, transfer_id);
}

UCCL_P2P_EXPORT int uccl_engine_send_vector(uccl_conn_t *conn, std::vector<uccl_mr_t> mr_ids,
                                            std::vector<void const *> src_v,
                                            std::vector<size_t> size_v, int num_iovs,
                                            uint64_t *transfer_id) {
  return uccl_tcpx::detail::send_vector(conn, mr_ids, src_v, size_v, num_iovs, transfer_id);
}

UCCL_P2P_EXPORT int uccl_engine_recv(uccl_conn_t *conn, uccl_mr_t mr, void *data, size_t max_size) {
  return uccl_tcpx_c_recv(conn, mr, data, max_size);
}

UCCL_P2P_EXPORT bool uccl_engine_xfer_status(uccl_conn_t *conn, uint64_t transfer_id) {
  return uccl_tcpx_c_xfer_status(conn, transfer_id);
}

/* ---- notifications ----------------------------------------------------------------------------- */

UCCL_P2P_EXPORT int uccl_engine_send_notif(uccl_conn_t *conn, notify_msg_t *notify_msg) {
  return uccl_tcpx_c_send_notif(conn, notify_msg);
}

UCCL_P2P_EXPORT int uccl_engine_send_notif_v(uccl_conn_t *conn, notify_msg_v_t const *notify_msg) {
  // The C function reports the NULL argument (and sets the last error).
  if (notify_msg == nullptr) return uccl_tcpx_c_send_notif(conn, nullptr);
  return ::uccl_engine_send_notif_v(conn, notify_msg->name.data(), notify_msg->name.size(),
                                    notify_msg->msg.data(), notify_msg->msg.size());
}

/* Drains what every engine of the process received: `name` a C string, `msg` the first 256 bytes of
 * the message, zero padded. */
UCCL_P2P_EXPORT std::vector<notify_msg_t> uccl_engine_get_notifs() {
  return uccl_tcpx::detail::drain_notifs();
}

/* The same queue, every message whole. */
UCCL_P2P_EXPORT std::vector<notify_msg_v_t> uccl_engine_get_notifs_v() {
  return uccl_tcpx::detail::drain_notifs_v();
}
