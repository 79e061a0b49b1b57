// A program built the way code written for UCCL's libuccl_p2p.so is built: it includes none of our
// headers, declares UCCL's C++ functions and types itself (as UCCL documents them: no extern "C",
// std::vector by value, references, bool returns) and links libuccl_p2p.so alone. So every call
// below goes through the mangled names libuccl_p2p.so must export, with libstdc++'s layouts of
// std::vector and std::string crossing the boundary, and each one is checked to have done its job:
// bytes moved between two engines, notifications received, handles and statuses as promised.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

// ---- UCCL's types ----------------------------------------------------------------------------------

typedef struct uccl_engine uccl_engine_t;
typedef struct uccl_conn uccl_conn_t;
typedef uint64_t uccl_mr_t;

struct FifoItem {  // 64 bytes; passed by value to read/write
  uint64_t addr;
  uint32_t size;
  uint32_t rkey;
  uint32_t nmsgs;
  uint32_t rid;
  uint64_t idx;
  char padding[32];
};
static_assert(sizeof(FifoItem) == 64, "FifoItem");

typedef struct notify_msg {
  char name[256];
  char msg[256];
} notify_msg_t;

typedef struct notify_msg_v {
  std::string name;
  std::string msg;
} notify_msg_v_t;

// ---- UCCL's functions, with C++ linkage ------------------------------------------------------------

uccl_engine_t *uccl_engine_create(int num_cpus, bool in_python);
void uccl_engine_destroy(uccl_engine_t *engine);
uccl_conn_t *uccl_engine_connect(uccl_engine_t *engine, char const *ip_addr, char const *remote_gpu,
                                 int remote_port, bool same_process = false);
int uccl_engine_start_listener(uccl_conn_t *conn);
int uccl_engine_stop_listener(uccl_conn_t *conn);
uccl_conn_t *uccl_engine_accept(uccl_engine_t *engine, char *ip_addr_buf, size_t ip_addr_buf_len,
                                int *remote_gpu_idx);
void uccl_engine_stop_accept(uccl_engine_t *engine);
int uccl_engine_reg(uccl_engine_t *engine, uintptr_t data, size_t size, uccl_mr_t &mr_id);
void uccl_engine_mr_destroy(uccl_engine_t *engine, uccl_mr_t mr);
int uccl_engine_prepare_fifo(uccl_engine_t *engine, uccl_mr_t mr, void const *data, size_t size,
                             char *fifo_buf);
int uccl_engine_update_fifo(FifoItem &fifo_item, uint64_t remote_addr, uint32_t size);
void serialize_fifo_item(FifoItem const &item, char *buf);
void deserialize_fifo_item(char const *buf, FifoItem *item);
bool uccl_engine_conn_is_local(uccl_conn_t *conn);
int uccl_engine_get_ipc_info(uccl_engine_t *engine, uintptr_t addr, char *ipc_buf, bool *has_ipc);
int uccl_engine_update_ipc_info(char *ipc_buf, uintptr_t addr, uintptr_t base_addr, size_t size);
int uccl_engine_read(uccl_conn_t *conn, uccl_mr_t mr, void const *data, size_t size,
                     FifoItem fifo_item, uint64_t *transfer_id);
int uccl_engine_write(uccl_conn_t *conn, uccl_mr_t mr, void const *data, size_t size,
                      FifoItem fifo_item, uint64_t *transfer_id);
int uccl_engine_read_vector(uccl_conn_t *conn, std::vector<uccl_mr_t> mr_ids,
                            std::vector<void *> dst_v, std::vector<size_t> size_v,
                            std::vector<FifoItem> fifo_items, int num_iovs, uint64_t *transfer_id,
                            std::vector<char *> ipc_bufs = {});
int uccl_engine_write_vector(uccl_conn_t *conn, std::vector<uccl_mr_t> mr_ids,
                             std::vector<void *> dst_v, std::vector<size_t> size_v,
                             std::vector<FifoItem> fifo_items, int num_iovs, uint64_t *transfer_id,
                             std::vector<char *> ipc_bufs = {});
int uccl_engine_send(uccl_conn_t *conn, uccl_mr_t mr, void const *data, size_t size,
                     uint64_t *transfer_id);
int uccl_engine_send_vector(uccl_conn_t *conn, std::vector<uccl_mr_t> mr_ids,
                            std::vector<void const *> src_v, std::vector<size_t> size_v,
                            int num_iovs, uint64_t *transfer_id);
int uccl_engine_recv(uccl_conn_t *conn, uccl_mr_t mr, void *data, size_t max_size);
bool uccl_engine_xfer_status(uccl_conn_t *conn, uint64_t transfer_id);
void uccl_engine_conn_destroy(uccl_conn_t *conn);
int uccl_engine_get_metadata(uccl_engine_t *engine, char **metadata_str);
std::vector<notify_msg_t> uccl_engine_get_notifs();
std::vector<notify_msg_v_t> uccl_engine_get_notifs_v();
int uccl_engine_send_notif(uccl_conn_t *conn, notify_msg_t *notify_msg);
int uccl_engine_send_notif_v(uccl_conn_t *conn, notify_msg_v_t const *notify_msg);

// ---- checks ----------------------------------------------------------------------------------------

namespace {

int failures = 0;

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::fprintf(stderr, "%s:%d: CHECK(%s)\n", __FILE__, __LINE__, #cond); \
      failures++;                                                       \
    }                                                                   \
  } while (0)

#define REQUIRE(cond)                                                     \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::fprintf(stderr, "%s:%d: REQUIRE(%s)\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                       \
    }                                                                     \
  } while (0)

using Clock = std::chrono::steady_clock;

uint8_t pattern(size_t i, uint32_t seed) {
  return static_cast<uint8_t>((i * 2654435761u + seed * 40503u) >> 7);
}

void fill(std::vector<uint8_t> &v, size_t off, size_t n, uint32_t seed) {
  for (size_t i = 0; i < n; i++) v[off + i] = pattern(i, seed);
}

bool holds(std::vector<uint8_t> const &v, size_t off, size_t n, uint32_t seed) {
  for (size_t i = 0; i < n; i++)
    if (v[off + i] != pattern(i, seed)) {
      std::fprintf(stderr, "  byte %zu of [%zu, +%zu): %u, want %u\n", i, off, n, v[off + i],
                   pattern(i, seed));
      return false;
    }
  return true;
}

// xfer_status, polled as NIXL polls it, bounded.
bool done(uccl_conn_t *conn, uint64_t id) {
  auto deadline = Clock::now() + std::chrono::seconds(30);
  while (!uccl_engine_xfer_status(conn, id)) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  return true;
}

template <typename T, typename F>
std::vector<T> collect(size_t want, F drain) {
  std::vector<T> got;
  auto deadline = Clock::now() + std::chrono::seconds(30);
  while (got.size() < want && Clock::now() < deadline) {
    for (T &n : drain()) got.push_back(n);
    if (got.size() < want) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return got;
}

FifoItem advertise(uccl_engine_t *e, uccl_mr_t mr, uint8_t const *base, size_t off, size_t len) {
  char raw[64], again[64];
  REQUIRE(uccl_engine_prepare_fifo(e, mr, base, len + off, raw) == 0);
  FifoItem item;
  deserialize_fifo_item(raw, &item);
  serialize_fifo_item(item, again);
  CHECK(std::memcmp(raw, again, sizeof raw) == 0);
  CHECK(item.addr == reinterpret_cast<uintptr_t>(base));
  REQUIRE(uccl_engine_update_fifo(item, item.addr + off, static_cast<uint32_t>(len)) == 0);
  CHECK(item.addr == reinterpret_cast<uintptr_t>(base) + off && item.size == len);
  return item;
}

}  // namespace

int main() {
  constexpr size_t N = 1 << 20;
  uccl_engine_t *a = uccl_engine_create(2, false);
  uccl_engine_t *b = uccl_engine_create(2, false);
  REQUIRE(a && b);

  // Metadata "ip:port?gpu", released with delete[] as UCCL's callers do.
  char *md = nullptr;
  REQUIRE(uccl_engine_get_metadata(b, &md) == 0 && md);
  std::string meta(md);
  delete[] md;
  size_t colon = meta.find(':'), q = meta.find('?');
  REQUIRE(colon != std::string::npos && q != std::string::npos && colon < q);
  std::string gpu = meta.substr(q + 1);
  int port = std::atoi(meta.substr(colon + 1, q - colon - 1).c_str());
  REQUIRE(port > 0);

  // Connect a -> b (the defaulted same_process) while b accepts.
  uccl_conn_t *ab = nullptr;
  std::thread connector([&] { ab = uccl_engine_connect(a, "127.0.0.1", gpu.c_str(), port); });
  char ip[256];
  int remote_gpu = -1;
  uccl_conn_t *ba = uccl_engine_accept(b, ip, sizeof ip, &remote_gpu);
  connector.join();
  REQUIRE(ab && ba);
  CHECK(std::strcmp(ip, "127.0.0.1") == 0);
  CHECK(uccl_engine_start_listener(ab) == 0);
  CHECK(uccl_engine_start_listener(ba) == 0);
  CHECK(uccl_engine_conn_is_local(ab));  // one process, one host: the same-host path

  std::vector<uint8_t> abuf(N), abuf2(N), bbuf(N);
  uccl_mr_t amr = 0, amr2 = 0, bmr = 0;
  REQUIRE(uccl_engine_reg(a, reinterpret_cast<uintptr_t>(abuf.data()), N, amr) == 0);
  REQUIRE(uccl_engine_reg(a, reinterpret_cast<uintptr_t>(abuf2.data()), N, amr2) == 0);
  REQUIRE(uccl_engine_reg(b, reinterpret_cast<uintptr_t>(bbuf.data()), N, bmr) == 0);
  CHECK(amr != amr2);

  // IPC info: none exists, and the helper still rewrites offset and size.
  char ipc[128];
  bool has_ipc = true;
  CHECK(uccl_engine_get_ipc_info(b, reinterpret_cast<uintptr_t>(bbuf.data()), ipc, &has_ipc) == 0);
  CHECK(!has_ipc);
  CHECK(uccl_engine_update_ipc_info(ipc, 0x1010, 0x1000, 64) == 0);

  // write: a -> b, the whole buffer.
  uint64_t id = 0;
  fill(abuf, 0, N, 1);
  CHECK(uccl_engine_write(ab, amr, abuf.data(), N, advertise(b, bmr, bbuf.data(), 0, N), &id) == 0);
  CHECK(done(ab, id));
  CHECK(holds(bbuf, 0, N, 1));
  CHECK(!uccl_engine_xfer_status(ab, id));  // reported once

  // read: b -> a, a window in the middle.
  fill(bbuf, 4096, 65536, 2);
  CHECK(uccl_engine_read(ab, amr2, abuf2.data(), 65536, advertise(b, bmr, bbuf.data(), 4096, 65536),
                         &id) == 0);
  CHECK(done(ab, id));
  CHECK(holds(abuf2, 0, 65536, 2));

  // write_vector / read_vector: three pieces each, one id, the vectors intact afterwards (the
  // callee must neither free nor keep the caller's temporaries).
  {
    size_t const off[3] = {0, 300000, 700000}, len[3] = {1000, 250000, 300000};
    std::vector<uccl_mr_t> mrs(3, amr);
    std::vector<void *> src(3);
    std::vector<size_t> sizes(len, len + 3);
    std::vector<FifoItem> items(3);
    for (int i = 0; i < 3; i++) {
      fill(abuf, off[i], len[i], 10 + i);
      src[i] = abuf.data() + off[i];
      items[i] = advertise(b, bmr, bbuf.data(), off[i] + 17, len[i]);
    }
    CHECK(uccl_engine_write_vector(ab, mrs, src, sizes, items, 3, &id) == 0);
    CHECK(done(ab, id));
    for (int i = 0; i < 3; i++) CHECK(holds(bbuf, off[i] + 17, len[i], 10 + i));
    CHECK(mrs.size() == 3 && src.size() == 3 && sizes[2] == len[2] && items.size() == 3);

    std::vector<void *> dst(3);
    for (int i = 0; i < 3; i++) {
      fill(bbuf, off[i] + 5, len[i], 20 + i);
      dst[i] = abuf2.data() + off[i];
      items[i] = advertise(b, bmr, bbuf.data(), off[i] + 5, len[i]);
    }
    std::vector<char *> no_ipc;  // passed explicitly, as NIXL does
    CHECK(uccl_engine_read_vector(ab, std::vector<uccl_mr_t>(3, amr2), dst, sizes, items, 3, &id,
                                  no_ipc) == 0);
    CHECK(done(ab, id));
    for (int i = 0; i < 3; i++) CHECK(holds(abuf2, off[i], len[i], 20 + i));

    // Vectors shorter than num_iovs are refused before anything is posted.
    CHECK(uccl_engine_read_vector(ab, mrs, dst, sizes, items, 4, &id) < 0);
    CHECK(uccl_engine_write_vector(ab, mrs, src, sizes, items, 0, &id) < 0);
  }

  // send / send_vector and recv (UCCL's current engine returns -1 from these; this one moves data).
  {
    fill(abuf, 0, 5000, 30);
    CHECK(uccl_engine_send(ab, amr, abuf.data(), 5000, &id) == 0);
    std::fill(bbuf.begin(), bbuf.end(), 0);
    CHECK(uccl_engine_recv(ba, bmr, bbuf.data(), N) == 5000);
    CHECK(done(ab, id));
    CHECK(holds(bbuf, 0, 5000, 30));

    fill(abuf, 10000, 777, 31);
    fill(abuf, 20000, 4321, 32);
    std::vector<void const *> srcs = {abuf.data() + 10000, abuf.data() + 20000};
    CHECK(uccl_engine_send_vector(ab, {amr, amr}, srcs, {777, 4321}, 2, &id) == 0);
    CHECK(uccl_engine_recv(ba, bmr, bbuf.data(), N) == 777);
    CHECK(uccl_engine_recv(ba, bmr, bbuf.data() + 1000, N - 1000) == 4321);
    CHECK(done(ab, id));
    CHECK(holds(bbuf, 0, 777, 31));
    CHECK(holds(bbuf, 1000, 4321, 32));
  }

  // Notifications: the fixed struct keeps all 256 message bytes, zeros included; the variable one
  // carries a message of any length.
  {
    notify_msg_t n;
    std::memset(&n, 0, sizeof n);
    std::strcpy(n.name, "p2p-abi");
    for (size_t i = 0; i < sizeof n.msg; i++) n.msg[i] = static_cast<char>(pattern(i, 40));
    n.msg[3] = 0;
    CHECK(uccl_engine_send_notif(ab, &n) == 0);
    std::vector<notify_msg_t> got = collect<notify_msg_t>(1, [] { return uccl_engine_get_notifs(); });
    REQUIRE(got.size() == 1);
    CHECK(std::strcmp(got[0].name, "p2p-abi") == 0);
    CHECK(std::memcmp(got[0].msg, n.msg, sizeof n.msg) == 0);

    // Far beyond the fixed form's 256 bytes, with zero bytes: it arrives whole.
    notify_msg_v_t v{"p2p-abi-v", std::string(1 << 20, 'x')};
    for (size_t i = 0; i < v.msg.size(); i += 1000) v.msg[i] = static_cast<char>(pattern(i, 41));
    v.msg.back() = '\0';
    CHECK(uccl_engine_send_notif_v(ba, &v) == 0);  // the other direction
    std::vector<notify_msg_v_t> gv =
        collect<notify_msg_v_t>(1, [] { return uccl_engine_get_notifs_v(); });
    REQUIRE(gv.size() == 1);
    CHECK(gv[0].name == v.name);
    CHECK(gv[0].msg == v.msg);
    CHECK(uccl_engine_get_notifs().empty());
  }

  // stop_listener is exported (UCCL's library has it): 0 for a connection, -1 for NULL, and a
  // later start_listener succeeds again (a restart), where a second one without it fails.
  CHECK(uccl_engine_start_listener(ab) < 0);
  CHECK(uccl_engine_stop_listener(ab) == 0);
  CHECK(uccl_engine_start_listener(ab) == 0);
  CHECK(uccl_engine_stop_listener(nullptr) == -1);

  // stop_accept makes accept return NULL at once.
  uccl_engine_stop_accept(b);
  CHECK(uccl_engine_accept(b, ip, sizeof ip, &remote_gpu) == nullptr);

  uccl_engine_conn_destroy(ab);
  uccl_engine_conn_destroy(ba);
  uccl_engine_mr_destroy(a, amr);
  uccl_engine_mr_destroy(a, amr2);
  uccl_engine_mr_destroy(b, bmr);
  uccl_engine_destroy(a);
  uccl_engine_destroy(b);

  std::printf("p2p_abi: %s (%d failures)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
