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
#include <initializer_list>
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
