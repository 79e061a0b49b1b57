/*
 * uccl-tcpx: what the C++ forms of uccl_engine.h (uccl_tcpx/engine_cxx.hpp, inline) and
 * libuccl_p2p.so (the same functions exported under UCCL's mangled names) share: UCCL's
 * notify_msg_v_t and the helpers both build the C++ functions from. Not an interface of its own;
 * include uccl_engine.h instead.
 */

// Outside the guard: uccl_engine.h ends by including engine_cxx.hpp, which includes this file and
// needs its content, so this file's guard must not be set yet when that happens.
#include "../uccl_engine.h"

#ifndef UCCL_TCPX_CXX_DETAIL_HPP
#define UCCL_TCPX_CXX_DETAIL_HPP

#ifndef __cplusplus
#error "uccl_tcpx/cxx_detail.hpp is C++ only"
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <new>
#include <string>
#include <vector>

/* A notification with a name and a message of any length (UCCL: C++ only). */
typedef struct notify_msg_v {
  std::string name;
  std::string msg;
} notify_msg_v_t;

namespace uccl_tcpx {
namespace detail {

/* Whether vectors passed for num_iovs entries hold that many (the C functions would read past
 * shorter ones). num_iovs <= 0 is left to the C function, which reports it through last_error. */
inline bool vectors_cover(int num_iovs, std::initializer_list<std::size_t> sizes) {
  if (num_iovs <= 0) return true;
  for (std::size_t s : sizes)
    if (s < static_cast<std::size_t>(num_iovs)) return false;
  return true;
}

/* uccl_engine_get_metadata with the string copied into `new char[]`, so that `delete[]` releases
 * it, as UCCL's callers do. `c_get_metadata` is the C function, passed in because libuccl_p2p.so
 * declares it under another name. Failures and a NULL `metadata_str` behave as in C (the status
 * is returned, `*metadata_str` is left alone); a failed allocation returns
 * UCCL_STATUS_ERR_INTERNAL. */
inline int get_metadata_new(int (*c_get_metadata)(uccl_engine_t *, char **), uccl_engine_t *engine,
                            char **metadata_str) {
  if (metadata_str == nullptr) return c_get_metadata(engine, metadata_str);
  char *owned = nullptr;
  int rc = c_get_metadata(engine, &owned);
  if (rc != UCCL_STATUS_OK) return rc;
  std::size_t n = std::strlen(owned) + 1;
  char *copy = new (std::nothrow) char[n];
  if (copy == nullptr) {
    ::uccl_engine_free_string(owned);
    return UCCL_STATUS_ERR_INTERNAL;
  }
  std::memcpy(copy, owned, n);
  ::uccl_engine_free_string(owned);
  *metadata_str = copy;
  return UCCL_STATUS_OK;
}

/* uccl_engine_read_vector and uccl_engine_write_vector of the C ABI. */
typedef int (*one_sided_vector_fn)(uccl_conn_t *, uccl_mr_t const *, void *const *,
                                   std::size_t const *, FifoItem const *, int, uint64_t *,
                                   char *const *);

/* The C++ form of a one-sided vector call (`c_call`): every vector must hold `num_iovs` entries,
 * except that `ipc_bufs` may be empty (then NULL is passed). */
inline int one_sided_vector(one_sided_vector_fn c_call, uccl_conn_t *conn,
                            std::vector<uccl_mr_t> const &mr_ids, std::vector<void *> const &bufs,
                            std::vector<std::size_t> const &size_v,
                            std::vector<FifoItem> const &fifo_items, int num_iovs,
                            uint64_t *transfer_id, std::vector<char *> const &ipc_bufs) {
  if (!vectors_cover(num_iovs, {mr_ids.size(), bufs.size(), size_v.size(), fifo_items.size()}) ||
      (!ipc_bufs.empty() && !vectors_cover(num_iovs, {ipc_bufs.size()})))
    return UCCL_STATUS_ERR_INVALID_PARAM;
  return c_call(conn, mr_ids.data(), bufs.data(), size_v.data(), fifo_items.data(), num_iovs,
                transfer_id, ipc_bufs.empty() ? nullptr : ipc_bufs.data());
}

/* The C++ form of uccl_engine_send_vector: every vector must hold `num_iovs` entries. */
inline int send_vector(uccl_conn_t *conn, std::vector<uccl_mr_t> const &mr_ids,
                       std::vector<void const *> const &src_v,
                       std::vector<std::size_t> const &size_v, int num_iovs,
                       uint64_t *transfer_id) {
  if (!vectors_cover(num_iovs, {mr_ids.size(), src_v.size(), size_v.size()}))
    return UCCL_STATUS_ERR_INVALID_PARAM;
  return ::uccl_engine_send_vector(conn, mr_ids.data(), src_v.data(), size_v.data(), num_iovs,
                                   transfer_id);
}

/* Everything queued, in the fixed 256-byte form. */
inline std::vector<notify_msg_t> drain_notifs() {
  constexpr std::size_t kBatch = 64;
  std::vector<notify_msg_t> out;
  for (;;) {
    std::size_t have = out.size();
    // Grown before draining: a failed allocation throws before a notification leaves the queue.
    out.resize(have + kBatch);
    std::size_t got = ::uccl_engine_get_notifs(out.data() + have, kBatch);
    out.resize(have + got);
    if (got < kBatch) return out;
  }
}

/* Entries filled by uccl_engine_get_notifs_v, released however the batch is left. */
struct NotifBatch {
  static constexpr std::size_t kSize = 16;
  uccl_notif_v_t entries[kSize];
  std::size_t count = 0;

  NotifBatch() = default;
  NotifBatch(NotifBatch const &) = delete;
  NotifBatch &operator=(NotifBatch const &) = delete;
  ~NotifBatch() {
    for (std::size_t i = 0; i < count; i++) ::uccl_engine_free_notif_v(&entries[i]);
  }
};

/* Everything queued, messages whole. */
inline std::vector<notify_msg_v_t> drain_notifs_v() {
  std::vector<notify_msg_v_t> out;
  for (;;) {
    NotifBatch batch;
    batch.count = ::uccl_engine_get_notifs_v(batch.entries, NotifBatch::kSize);
    for (std::size_t i = 0; i < batch.count; i++) {
      uccl_notif_v_t const &n = batch.entries[i];
      out.push_back(
          notify_msg_v_t{std::string(n.name, n.name_len), std::string(n.msg, n.msg_len)});
    }
    if (batch.count < NotifBatch::kSize) return out;
  }
}

}  // namespace detail
}  // namespace uccl_tcpx

#endif /* UCCL_TCPX_CXX_DETAIL_HPP */
