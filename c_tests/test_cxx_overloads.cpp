// Every C++ form that uccl_engine.h (through uccl_tcpx/engine_cxx.hpp) and common.h add for C++:
// first pinned at compile time against the exact declarations of UCCL's current uccl_engine.h and
// common.h, then called and checked at run time.
#include "harness.h"

#include "common.h"
#include "uccl_engine.h"

#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---- exact signatures (taking the address with the precise type fails to compile otherwise) ----

#define PIN(name, type) static_cast<type>(&name)
[[maybe_unused]] static void pin_signatures() {
  using std::vector;
  (void)PIN(uccl_engine_create, uccl_engine_t *(*)(int, bool));
  (void)PIN(uccl_engine_destroy, void (*)(uccl_engine_t *));
  (void)PIN(uccl_engine_connect,
            uccl_conn_t *(*)(uccl_engine_t *, char const *, char const *, int, bool));
  (void)PIN(uccl_engine_start_listener, int (*)(uccl_conn_t *));
  (void)PIN(uccl_engine_stop_listener, int (*)(uccl_conn_t *));
  (void)PIN(uccl_engine_accept, uccl_conn_t *(*)(uccl_engine_t *, char *, size_t, int *));
  (void)PIN(uccl_engine_reg, int (*)(uccl_engine_t *, uintptr_t, size_t, uccl_mr_t &));
  (void)PIN(uccl_engine_read,
            int (*)(uccl_conn_t *, uccl_mr_t, void const *, size_t, FifoItem, uint64_t *));
  (void)PIN(uccl_engine_write,
            int (*)(uccl_conn_t *, uccl_mr_t, void const *, size_t, FifoItem, uint64_t *));
  (void)PIN(uccl_engine_read_vector,
            int (*)(uccl_conn_t *, vector<uccl_mr_t>, vector<void *>, vector<size_t>,
                    vector<FifoItem>, int, uint64_t *, vector<char *>));
  (void)PIN(uccl_engine_write_vector,
            int (*)(uccl_conn_t *, vector<uccl_mr_t>, vector<void *>, vector<size_t>,
                    vector<FifoItem>, int, uint64_t *, vector<char *>));
  (void)PIN(uccl_engine_send, int (*)(uccl_conn_t *, uccl_mr_t, void const *, size_t, uint64_t *));
  (void)PIN(uccl_engine_send_vector,
            int (*)(uccl_conn_t *, vector<uccl_mr_t>, vector<void const *>, vector<size_t>, int,
                    uint64_t *));
  (void)PIN(uccl_engine_recv, int (*)(uccl_conn_t *, uccl_mr_t, void *, size_t));
  (void)PIN(uccl_engine_xfer_status, bool (*)(uccl_conn_t *, uint64_t));
  (void)PIN(uccl_engine_conn_destroy, void (*)(uccl_conn_t *));
  (void)PIN(uccl_engine_mr_destroy, void (*)(uccl_engine_t *, uccl_mr_t));
  (void)PIN(uccl_engine_get_metadata, int (*)(uccl_engine_t *, char **));
  (void)PIN(uccl_engine_get_notifs, vector<notify_msg_t> (*)());
  (void)PIN(uccl_engine_get_notifs_v, vector<notify_msg_v_t> (*)());
  (void)PIN(uccl_engine_send_notif, int (*)(uccl_conn_t *, notify_msg_t *));
  (void)PIN(uccl_engine_send_notif_v, int (*)(uccl_conn_t *, notify_msg_v_t const *));
  (void)PIN(uccl_engine_prepare_fifo,
            int (*)(uccl_engine_t *, uccl_mr_t, void const *, size_t, char *));
  (void)PIN(uccl_engine_update_fifo, int (*)(FifoItem &, uint64_t, uint32_t));
  (void)PIN(uccl_engine_conn_is_local, bool (*)(uccl_conn_t *));
  (void)PIN(uccl_engine_get_ipc_info, int (*)(uccl_engine_t *, uintptr_t, char *, bool *));
  (void)PIN(uccl_engine_update_ipc_info, int (*)(char *, uintptr_t, uintptr_t, size_t));
  (void)PIN(uccl_engine_stop_accept, void (*)(uccl_engine_t *));
  (void)PIN(serialize_fifo_item, void (*)(FifoItem const &, char *));
  (void)PIN(deserialize_fifo_item, void (*)(char const *, FifoItem *));
}

static_assert(std::is_same_v<decltype(notify_msg_v_t::name), std::string>, "notify_msg_v_t::name");
static_assert(std::is_same_v<decltype(notify_msg_v_t::msg), std::string>, "notify_msg_v_t::msg");
static_assert(std::is_same_v<uccl_mr_t, uint64_t>, "uccl_mr_t is uint64_t in UCCL's header");
static_assert(sizeof(notify_msg_t::msg) == MSG_SIZE && sizeof(md_t) == 2 * MSG_SIZE, "sizes");
static_assert(sizeof(FifoItem) == FIFO_SIZE, "FifoItem");

namespace {

constexpr size_t KiB = 1024;

struct Pair {
  uccl_engine_t *a = nullptr, *b = nullptr;
  uccl_conn_t *ca = nullptr, *cb = nullptr;
};

// Connects a -> b with the four-argument connect (same_process defaulted) at b's metadata address.
bool open_pair(Pair *p) {
  p->a = uccl_engine_create(ENGINE_CPUS, false);
  p->b = uccl_engine_create(ENGINE_CPUS, false);
  if (!p->a || !p->b) return false;
  metadata_t md;
  if (!engine_metadata(p->b, &md)) return false;
  std::thread t([&] {
    p->ca = uccl_engine_connect(p->a, "127.0.0.1", md.gpu, md.port);
    if (!p->ca) uccl_engine_stop_accept(p->b);
  });
  char ip[64];
  int gpu = -1;
  p->cb = uccl_engine_accept(p->b, ip, sizeof ip, &gpu);
  t.join();
  return p->ca && p->cb;
}

void test_metadata(Pair const &p) {
  // The C++ form hands out a new[] string: delete[] releases it, as UCCL's callers do.
  char *md = nullptr;
  CHECK_EQ(uccl_engine_get_metadata(p.a, &md), UCCL_STATUS_OK);
  REQUIRE(md != nullptr);
  metadata_t parsed;
  CHECKF(parse_metadata(md, &parsed), "metadata \"%s\"", md);
  std::string first(md);
  delete[] md;
  // uccl_engine_free_string is the matching release in C++ translation units.
  md = nullptr;
  CHECK_EQ(uccl_engine_get_metadata(p.a, &md), UCCL_STATUS_OK);
  CHECK(md != nullptr && first == md);
  uccl_engine_free_string(md);
  uccl_engine_free_string(nullptr);
  // Failures pass through untouched.
  md = nullptr;
  CHECK(uccl_engine_get_metadata(nullptr, &md) < 0);
  CHECK(md == nullptr);
  CHECK_EQ(uccl_engine_get_metadata(p.a, nullptr), UCCL_STATUS_ERR_INVALID_PARAM);
}

void test_fifo_helpers(uccl_engine_t *b, uccl_mr_t bmr, uint8_t *bbuf) {
  char raw[FIFO_SIZE], raw2[FIFO_SIZE];
  REQUIRE(uccl_engine_prepare_fifo(b, bmr, bbuf, 64 * KiB, raw) == UCCL_STATUS_OK);
  FifoItem item, c_item;
  deserialize_fifo_item(raw, &item);
  uccl_engine_deserialize_fifo_item(raw, &c_item);
  CHECK(memcmp(&item, &c_item, sizeof item) == 0);
  serialize_fifo_item(item, raw2);
  CHECK(memcmp(raw, raw2, FIFO_SIZE) == 0);
  CHECK(item.addr == reinterpret_cast<uintptr_t>(bbuf));
  CHECK_EQ(item.size, 64 * KiB);

  // The reference form of update_fifo.
  CHECK_EQ(uccl_engine_update_fifo(item, item.addr + 100, 200), UCCL_STATUS_OK);
  CHECK(item.addr == reinterpret_cast<uintptr_t>(bbuf) + 100);
  CHECK_EQ(item.size, 200);
  CHECK_EQ(uccl_engine_update_fifo(item, item.addr, 0), UCCL_STATUS_ERR_INVALID_PARAM);
}

uint64_t wait_status(uccl_conn_t *conn, uint64_t id, char const *what) {
  // xfer_status, as NIXL polls it; bounded.
  double deadline = now_ms() + DEFAULT_WAIT_MS;
  while (!uccl_engine_xfer_status(conn, id)) {
    if (now_ms() > deadline) {
      fprintf(stderr, "  %s: not done after %d ms\n", what, DEFAULT_WAIT_MS);
      note_failure();
      return 0;
    }
    sleep_ms(1);
  }
  return 1;
}

void test_vectors(Pair const &p) {
  const size_t n = 3, len = 256 * KiB + 3;
  const size_t buf_len = n * 512 * KiB;
  uint8_t *abuf = xalloc(buf_len), *bbuf = xalloc(buf_len);
  uccl_mr_t amr = 0, bmr = 0;
  REQUIRE(uccl_engine_reg(p.a, reinterpret_cast<uintptr_t>(abuf), buf_len, amr) == 0);
  REQUIRE(uccl_engine_reg(p.b, reinterpret_cast<uintptr_t>(bbuf), buf_len, bmr) == 0);
  CHECK(amr != 0 && bmr != 0);

  test_fifo_helpers(p.b, bmr, bbuf);

  char raw[FIFO_SIZE];
  REQUIRE(uccl_engine_prepare_fifo(p.b, bmr, bbuf, buf_len, raw) == 0);
  FifoItem base;
  deserialize_fifo_item(raw, &base);

  std::vector<uccl_mr_t> mrs(n, amr);
  std::vector<void *> local(n);
  std::vector<size_t> sizes(n, len);
  std::vector<FifoItem> items(n, base);
  for (size_t i = 0; i < n; i++) {
    local[i] = abuf + i * 512 * KiB;
    REQUIRE(uccl_engine_update_fifo(items[i], reinterpret_cast<uintptr_t>(bbuf) + i * 300 * KiB,
                                    static_cast<uint32_t>(len)) == 0);
    fill_pattern(static_cast<uint8_t *>(local[i]), len, 100 + static_cast<uint32_t>(i));
  }
  memset(bbuf, 0, buf_len);

  // write_vector with the defaulted ipc_bufs, as NIXL calls it.
  uint64_t id = 0;
  CHECK_EQ(uccl_engine_write_vector(p.ca, mrs, local, sizes, items, static_cast<int>(n), &id),
           UCCL_STATUS_OK);
  wait_status(p.ca, id, "write_vector");
  for (size_t i = 0; i < n; i++)
    CHECK(check_pattern(bbuf + i * 300 * KiB, len, 100 + static_cast<uint32_t>(i),
                        "write_vector item"));

  // read_vector with an explicit ipc_bufs vector (entries unused: no IPC path).
  for (size_t i = 0; i < n; i++) {
    fill_pattern(bbuf + i * 300 * KiB, len, 200 + static_cast<uint32_t>(i));
    memset(local[i], 0, len);
  }
  std::vector<char *> ipc(n, nullptr);
  CHECK_EQ(uccl_engine_read_vector(p.ca, mrs, local, sizes, items, static_cast<int>(n), &id, ipc),
           UCCL_STATUS_OK);
  size_t bytes = 0;
  CHECK_EQ(wait_xfer(p.ca, id, &bytes, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
  CHECK_EQ(bytes, n * len);
  for (size_t i = 0; i < n; i++)
    CHECK(check_pattern(static_cast<uint8_t *>(local[i]), len, 200 + static_cast<uint32_t>(i),
                        "read_vector item"));

  // Vectors shorter than num_iovs are refused before the C call could read past them.
  CHECK_EQ(uccl_engine_read_vector(p.ca, mrs, local, sizes, items, static_cast<int>(n) + 1, &id),
           UCCL_STATUS_ERR_INVALID_PARAM);
  CHECK_EQ(uccl_engine_write_vector(p.ca, mrs, local, sizes, items, static_cast<int>(n), &id,
                                    std::vector<char *>(1)),
           UCCL_STATUS_ERR_INVALID_PARAM);
  // num_iovs <= 0 is the library's to report, with last_error set.
  CHECK_EQ(uccl_engine_write_vector(p.ca, {}, {}, {}, {}, 0, &id), UCCL_STATUS_ERR_INVALID_PARAM);
  char err[256];
  last_error_text(err, sizeof err);
  CHECKF(strstr(err, "num_iovs") != nullptr, "last_error \"%s\"", err);

  // send_vector with vectors: one message per item, matched by receives on B.
  std::vector<void const *> src(local.begin(), local.end());
  std::vector<uint64_t> rids(n);
  for (size_t i = 0; i < n; i++) {
    fill_pattern(static_cast<uint8_t *>(local[i]), len, 300 + static_cast<uint32_t>(i));
    CHECK_EQ(uccl_engine_recv_async(p.cb, bmr, bbuf + i * 300 * KiB, len, &rids[i]), 0);
  }
  CHECK_EQ(uccl_engine_send_vector(p.ca, mrs, src, sizes, static_cast<int>(n), &id),
           UCCL_STATUS_OK);
  for (size_t i = 0; i < n; i++) {
    CHECK_EQ(wait_xfer(p.cb, rids[i], nullptr, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
    CHECK(check_pattern(bbuf + i * 300 * KiB, len, 300 + static_cast<uint32_t>(i),
                        "send_vector message"));
  }
  CHECK_EQ(wait_xfer(p.ca, id, nullptr, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
  CHECK_EQ(uccl_engine_send_vector(p.ca, mrs, src, sizes, static_cast<int>(n) + 1, &id),
           UCCL_STATUS_ERR_INVALID_PARAM);

  uccl_engine_mr_destroy(p.a, amr);
  uccl_engine_mr_destroy(p.b, bmr);
  free(abuf);
  free(bbuf);
}

// Collects `want` notifications through `get`, bounded.
template <class T, class Get>
std::vector<T> collect(size_t want, Get get) {
  std::vector<T> out;
  double deadline = now_ms() + DEFAULT_WAIT_MS;
  while (out.size() < want && now_ms() < deadline) {
    std::vector<T> more = get();
    out.insert(out.end(), more.begin(), more.end());
    if (out.size() < want) sleep_ms(1);
  }
  return out;
}

void test_notifications(Pair const &p) {
  // Nothing pending before we start.
  CHECK(uccl_engine_get_notifs().empty());

  // The fixed-size form, drained through the std::vector overload.
  notify_msg_t m;
  memset(&m, 0, sizeof m);
  strcpy(m.name, "agent-a");
  for (size_t i = 0; i < MSG_SIZE; i++) m.msg[i] = static_cast<char>(i);
  for (int k = 0; k < 70; k++) {  // more than one internal batch of 64
    m.msg[0] = static_cast<char>(k);
    CHECK_EQ(uccl_engine_send_notif(p.ca, &m), 0);
  }
  // A message sent after them on the same connection completes only once the peer has read
  // everything before it, so then a single call must return all 70 (more than one internal batch).
  {
    uint8_t sbuf[64] = {1}, rbuf[64];
    uccl_mr_t smr = 0, rmr = 0;
    uint64_t sid = 0, rid = 0;
    REQUIRE(uccl_engine_reg(p.a, reinterpret_cast<uintptr_t>(sbuf), sizeof sbuf, smr) == 0);
    REQUIRE(uccl_engine_reg(p.b, reinterpret_cast<uintptr_t>(rbuf), sizeof rbuf, rmr) == 0);
    CHECK_EQ(uccl_engine_recv_async(p.cb, rmr, rbuf, sizeof rbuf, &rid), 0);
    CHECK_EQ(uccl_engine_send(p.ca, smr, sbuf, sizeof sbuf, &sid), 0);
    CHECK_EQ(wait_xfer(p.ca, sid, nullptr, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
    CHECK_EQ(wait_xfer(p.cb, rid, nullptr, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
    uccl_engine_mr_destroy(p.a, smr);
    uccl_engine_mr_destroy(p.b, rmr);
  }
  std::vector<notify_msg_t> got = uccl_engine_get_notifs();
  CHECK_EQ(got.size(), 70);
  for (size_t k = 0; k < got.size(); k++) {
    CHECK(strcmp(got[k].name, "agent-a") == 0);
    CHECK_EQ(static_cast<uint8_t>(got[k].msg[0]), k);
    CHECK(memcmp(got[k].msg + 1, m.msg + 1, MSG_SIZE - 1) == 0);
  }

  // The variable-length form.
  std::string long_msg(100000, 'x');
  for (size_t i = 0; i < long_msg.size(); i++) long_msg[i] = static_cast<char>('a' + i % 26);
  long_msg[5] = '\0';
  long_msg.back() = '\0';  // zero bytes survive, trailing ones too
  notify_msg_v_t v1{"agent-v", "hello from C++"};
  notify_msg_v_t v2{"agent-long", long_msg};
  notify_msg_v_t v3{"agent-empty", ""};
  CHECK_EQ(uccl_engine_send_notif_v(p.ca, &v1), 0);
  CHECK_EQ(uccl_engine_send_notif_v(p.cb, &v2), 0);  // the other direction
  CHECK_EQ(uccl_engine_send_notif_v(p.ca, &v3), 0);
  CHECK_EQ(uccl_engine_send_notif_v(p.ca, nullptr), UCCL_STATUS_ERR_INVALID_PARAM);
  std::vector<notify_msg_v_t> gv =
      collect<notify_msg_v_t>(3, [] { return uccl_engine_get_notifs_v(); });
  CHECK_EQ(gv.size(), 3);
  bool seen[3] = {false, false, false};
  for (notify_msg_v_t const &n : gv) {
    if (n.name == "agent-v") {
      seen[0] = true;
      CHECK(n.msg == "hello from C++");
    } else if (n.name == "agent-long") {
      seen[1] = true;
      // Longer than the fixed form's 256 bytes: it comes back whole.
      CHECK(n.msg == long_msg);
    } else if (n.name == "agent-empty") {
      seen[2] = true;
      CHECK(n.msg.empty());
    } else {
      fprintf(stderr, "  unexpected notification from \"%s\"\n", n.name.c_str());
      note_failure();
    }
  }
  CHECK(seen[0] && seen[1] && seen[2]);
  CHECK(uccl_engine_get_notifs_v().empty());
}

}  // namespace

int main() {
  test_begin("test_cxx_overloads", 100);
  Pair p;
  REQUIRE(open_pair(&p));
  test_metadata(p);
  test_vectors(p);
  test_notifications(p);
  uccl_engine_conn_destroy(p.ca);
  uccl_engine_conn_destroy(p.cb);
  uccl_engine_destroy(p.a);
  uccl_engine_destroy(p.b);
  watchdog_disarm();
  return finish("test_cxx_overloads");
}
