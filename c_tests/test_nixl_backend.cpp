// Uses the C++ API exactly the way NIXL's UCCL backend does (same calls, same argument forms,
// same order), written against the header names UCCL installs: two agents in one process, each
// with an accept thread, both connecting to each other (two connections per pair), registrations
// published as hex FIFO items, vector READ/WRITE, completion through xfer_status followed by a
// notification, notifications drained as std::vector, and NIXL's teardown order.
#include "uccl_engine.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <signal.h>
#include <unistd.h>

namespace {

int g_failures = 0;
#define EXPECT(cond)                                                             \
  do {                                                                           \
    if (!(cond)) {                                                               \
      char err_[256] = {0};                                                      \
      uccl_engine_last_error(err_, sizeof err_);                                 \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s (last_error: %s)\n", __FILE__, \
                   __LINE__, #cond, err_);                                       \
      g_failures++;                                                              \
    }                                                                            \
  } while (0)

constexpr int FIFO_ITEM_SIZE = FIFO_SIZE;

// What NIXL keeps per registration.
struct BackendMD {
  void *addr = nullptr;
  size_t length = 0;
  int ref_cnt = 0;
  uccl_mr_t mr_id = 0;
  char fifo_item[FIFO_SIZE];
  char ipc_info[IPC_INFO_SIZE];
  bool has_ipc = false;
};

struct RemoteMD {
  uintptr_t addr = 0;
  size_t len = 0;
  char fifo_item[FIFO_SIZE];
};

struct ReqH {
  uccl_conn_t *conn = nullptr;
  uint64_t transfer_id = 0;
  std::string notif_msg;
  std::vector<FifoItem> fifo_items;
};

// "ip:port?gpu" as NIXL parses it: first ':' then '?'.
bool parse_conn_string(std::string const &s, std::unique_ptr<char[]> &ip, int &port,
                       std::string &gpu) {
  size_t colon = s.find(':');
  if (colon == std::string::npos) return false;
  size_t q = s.find('?', colon);
  if (q == std::string::npos) return false;
  std::string ip_str = s.substr(0, colon);
  ip = std::make_unique<char[]>(ip_str.length() + 1);
  strcpy(ip.get(), ip_str.c_str());
  port = std::stoi(s.substr(colon + 1, q - colon - 1));
  gpu = s.substr(q + 1);
  return true;
}

class Agent {
 public:
  explicit Agent(std::string name) : name_(std::move(name)) {
    size_t num_cpus = 4;  // NIXL's default
    engine_ = uccl_engine_create(num_cpus, false);
    EXPECT(engine_ != nullptr);
    listener_ = std::thread(&Agent::listen, this);
  }

  ~Agent() {
    stop_ = true;
    uccl_engine_stop_accept(engine_);
    if (listener_.joinable()) listener_.join();
    {
      std::lock_guard<std::mutex> lock(mem_mutex_);
      for (auto &[addr, md] : mem_) {
        if (md && md->mr_id != 0) uccl_engine_mr_destroy(engine_, md->mr_id);
        delete md;
      }
    }
    {
      std::lock_guard<std::mutex> lock(conn_mutex_);
      for (auto &[agent, conn] : connected_) uccl_engine_conn_destroy(reinterpret_cast<uccl_conn_t *>(conn));
      for (uint64_t conn : accepted_) uccl_engine_conn_destroy(reinterpret_cast<uccl_conn_t *>(conn));
    }
    uccl_engine_destroy(engine_);
  }

  std::string conn_info() const {
    char *metadata = nullptr;
    int result = uccl_engine_get_metadata(engine_, &metadata);
    EXPECT(result == 0 && metadata != nullptr);
    std::string str = metadata ? std::string(metadata) : std::string();
    delete[] metadata;  // as NIXL releases it
    return str;
  }

  bool load_remote_conn_info(std::string const &remote_agent, std::string const &info) {
    std::lock_guard<std::mutex> lock(conn_mutex_);
    std::unique_ptr<char[]> ip_addr;
    int port = 0;
    std::string gpu;
    if (!parse_conn_string(info, ip_addr, port, gpu)) return false;
    uccl_conn_t *conn = uccl_engine_connect(engine_, ip_addr.get(), gpu.c_str(), port, false);
    if (!conn) return false;
    uccl_engine_start_listener(conn);
    connected_[remote_agent] = reinterpret_cast<uint64_t>(conn);
    return true;
  }

  BackendMD *register_mem(void *addr, size_t len) {
    std::lock_guard<std::mutex> lock(mem_mutex_);
    uintptr_t key = reinterpret_cast<uintptr_t>(addr);
    if (mem_.count(key)) {
      mem_[key]->ref_cnt++;
      return mem_[key];
    }
    uccl_mr_t mr;
    int result = uccl_engine_reg(engine_, key, len, mr);  // uccl_mr_t& form
    if (result != 0) return nullptr;
    auto *md = new BackendMD();
    md->addr = addr;
    md->length = len;
    md->ref_cnt = 1;
    md->mr_id = mr;
    memset(md->fifo_item, 0, FIFO_SIZE);
    result = uccl_engine_prepare_fifo(engine_, mr, addr, len, md->fifo_item);
    if (result != 0) {
      uccl_engine_mr_destroy(engine_, mr);
      delete md;
      return nullptr;
    }
    result = uccl_engine_get_ipc_info(engine_, key, md->ipc_info, &md->has_ipc);
    EXPECT(result == 0);
    EXPECT(!md->has_ipc);
    mem_[key] = md;
    return md;
  }

  void deregister_mem(BackendMD *md) {
    std::lock_guard<std::mutex> lock(mem_mutex_);
    if (--md->ref_cnt > 0) return;
    uccl_engine_mr_destroy(engine_, md->mr_id);
    mem_.erase(reinterpret_cast<uintptr_t>(md->addr));
    delete md;
  }

  // getPublicData: hex of the FIFO item, then "00" (no IPC info) or "01" + hex of it.
  static std::string public_data(BackendMD const *md) {
    std::string str;
    for (int i = 0; i < FIFO_ITEM_SIZE; i++) {
      char hex[3];
      snprintf(hex, sizeof(hex), "%02x", static_cast<unsigned char>(md->fifo_item[i]));
      str += hex;
    }
    str += md->has_ipc ? "01" : "00";
    return str;
  }

  // loadRemoteMD
  static bool load_remote_md(uintptr_t addr, size_t len, std::string const &hex_str, RemoteMD *out) {
    if (hex_str.length() < FIFO_ITEM_SIZE * 2) return false;
    out->addr = addr;
    out->len = len;
    for (int i = 0; i < FIFO_ITEM_SIZE; i++) {
      std::string byte_str = hex_str.substr(static_cast<size_t>(i) * 2, 2);
      out->fifo_item[i] = static_cast<char>(strtoul(byte_str.c_str(), NULL, 16));
    }
    return true;
  }

  struct Desc {
    uintptr_t addr;
    size_t len;
    void *md;
  };

  ReqH *prep_xfer(std::string const &remote_agent, std::vector<Desc> const &local,
                  std::vector<Desc> const &remote) {
    uccl_conn_t *conn = nullptr;
    {
      std::lock_guard<std::mutex> lock(conn_mutex_);
      auto it = connected_.find(remote_agent);
      if (it == connected_.end()) return nullptr;
      conn = reinterpret_cast<uccl_conn_t *>(it->second);
    }
    auto *h = new ReqH();
    h->conn = conn;
    h->fifo_items.resize(local.size());
    for (size_t i = 0; i < local.size(); i++) {
      auto *rmd = static_cast<RemoteMD *>(remote[i].md);
      deserialize_fifo_item(rmd->fifo_item, &h->fifo_items[i]);
      uccl_engine_update_fifo(h->fifo_items[i], remote[i].addr, static_cast<uint32_t>(remote[i].len));
      if (uccl_engine_conn_is_local(conn)) {
        char ipc_buf[IPC_INFO_SIZE] = {0};
        uccl_engine_update_ipc_info(ipc_buf, remote[i].addr, rmd->addr, remote[i].len);
      }
    }
    return h;
  }

  // postXfer: NIXL passes the ipc pointers for READ in current versions and leaves them out in
  // older ones; both forms are exercised.
  int post_xfer(bool read, std::vector<Desc> const &local, ReqH *h, std::string const &notif) {
    std::vector<uccl_mr_t> mr_ids;
    std::vector<void *> addr_v;
    std::vector<size_t> size_v;
    {
      std::lock_guard<std::mutex> lock(mem_mutex_);
      for (Desc const &d : local) {
        auto *lmd = static_cast<BackendMD *>(d.md);
        mr_ids.push_back(mem_.at(reinterpret_cast<uintptr_t>(lmd->addr))->mr_id);
        addr_v.push_back(reinterpret_cast<void *>(d.addr));
        size_v.push_back(d.len);
      }
    }
    size_t lcnt = local.size();
    uint64_t transfer_id = 0;
    int result;
    if (read) {
      std::vector<char *> ipc_ptrs(lcnt, nullptr);
      result = uccl_engine_read_vector(h->conn, mr_ids, addr_v, size_v, h->fifo_items,
                                       static_cast<int>(lcnt), &transfer_id, ipc_ptrs);
    } else {
      result = uccl_engine_write_vector(h->conn, mr_ids, addr_v, size_v, h->fifo_items,
                                        static_cast<int>(lcnt), &transfer_id);
    }
    if (result != 0) return result;
    h->transfer_id = transfer_id;
    h->notif_msg = notif;
    return 0;
  }

  // checkXfer: true when done; then a notification goes to the peer.
  bool check_xfer(ReqH *h) {
    int is_done = uccl_engine_xfer_status(h->conn, h->transfer_id);
    if (!is_done) return false;
    notify_msg_t notify_msg = {};
    strncpy(notify_msg.name, name_.c_str(), sizeof(notify_msg.name) - 1);
    std::string serialized = "msg=" + h->notif_msg;
    EXPECT(serialized.size() <= sizeof(notify_msg_t::msg));
    memcpy(notify_msg.msg, serialized.c_str(), serialized.size());
    EXPECT(uccl_engine_send_notif(h->conn, &notify_msg) == 0);
    return true;
  }

  // getNotifs
  static std::vector<std::pair<std::string, std::string>> get_notifs() {
    std::vector<std::pair<std::string, std::string>> out;
    std::vector<notify_msg_t> notify_msgs = uccl_engine_get_notifs();
    for (size_t i = 0; i < notify_msgs.size(); i++) {
      size_t msg_len = sizeof(notify_msgs[i].msg);
      std::string serialized_str(notify_msgs[i].msg, msg_len);
      std::string remote_name(notify_msgs[i].name);
      out.emplace_back(remote_name, serialized_str.c_str());
    }
    return out;
  }

  size_t accepted() {
    std::lock_guard<std::mutex> lock(conn_mutex_);
    return accepted_.size();
  }

 private:
  void listen() {
    while (!stop_) {
      char ip_buf[256];
      int remote_gpu_idx;
      uccl_conn_t *conn = uccl_engine_accept(engine_, ip_buf, sizeof(ip_buf), &remote_gpu_idx);
      if (!conn) {
        if (stop_) break;
        continue;
      }
      uccl_engine_start_listener(conn);
      std::lock_guard<std::mutex> lock(conn_mutex_);
      accepted_.push_back(reinterpret_cast<uint64_t>(conn));
    }
  }

  std::string name_;
  uccl_engine_t *engine_ = nullptr;
  std::thread listener_;
  std::atomic<bool> stop_{false};
  std::mutex mem_mutex_, conn_mutex_;
  std::unordered_map<uint64_t, BackendMD *> mem_;
  std::unordered_map<std::string, uint64_t> connected_;
  std::vector<uint64_t> accepted_;
};

template <class Pred>
bool wait_until(Pred pred, int ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

uint8_t pattern(size_t i, unsigned seed) {
  return static_cast<uint8_t>((i * 2654435761u) >> 13 ^ seed * 77u ^ i);
}

void watchdog(int) {
  static char const msg[] = "WATCHDOG: test_nixl_backend did not finish in time\n";
  ssize_t ignored = write(STDERR_FILENO, msg, sizeof msg - 1);
  (void)ignored;
  _exit(3);
}

}  // namespace

int main() {
  signal(SIGALRM, watchdog);
  alarm(100);
  setvbuf(stdout, nullptr, _IOLBF, 0);
  {
    Agent a("agent-A"), b("agent-B");
    // Both sides load each other's connection info, while each accept thread accepts the other.
    std::string info_a = a.conn_info(), info_b = b.conn_info();
    std::printf("conn info: %s / %s\n", info_a.c_str(), info_b.c_str());
    std::thread t([&] { EXPECT(b.load_remote_conn_info("agent-A", info_a)); });
    EXPECT(a.load_remote_conn_info("agent-B", info_b));
    t.join();
    EXPECT(wait_until([&] { return a.accepted() == 1 && b.accepted() == 1; }, 30000));

    const size_t n = 4, len = 1000003, region = n * (len + 4096);
    std::vector<uint8_t> abuf(region), bbuf(region);
    BackendMD *amd = a.register_mem(abuf.data(), region);
    BackendMD *bmd = b.register_mem(bbuf.data(), region);
    EXPECT(amd != nullptr && bmd != nullptr);
    if (!amd || !bmd) return 1;
    EXPECT(a.register_mem(abuf.data(), region) == amd && amd->ref_cnt == 2);  // ref-counted
    a.deregister_mem(amd);

    // B publishes its registration; A loads it.
    std::string pub = Agent::public_data(bmd);
    EXPECT(pub.size() == FIFO_SIZE * 2 + 2 && pub.substr(FIFO_SIZE * 2) == "00");
    RemoteMD rmd;
    EXPECT(Agent::load_remote_md(reinterpret_cast<uintptr_t>(bbuf.data()), region, pub, &rmd));

    std::vector<Agent::Desc> local, remote;
    for (size_t i = 0; i < n; i++) {
      local.push_back({reinterpret_cast<uintptr_t>(abuf.data()) + i * (len + 4096), len, amd});
      remote.push_back({reinterpret_cast<uintptr_t>(bbuf.data()) + i * (len + 1), len, &rmd});
    }

    for (int round = 0; round < 2; round++) {
      bool read = round == 1;
      if (read)
        for (size_t i = 0; i < region; i++) bbuf[i] = pattern(i, 9);
      else
        for (size_t i = 0; i < region; i++) abuf[i] = pattern(i, 5);
      std::vector<uint8_t> a_before = abuf, b_before = bbuf;

      ReqH *h = a.prep_xfer("agent-B", local, remote);
      EXPECT(h != nullptr);
      if (!h) break;
      std::string notif = read ? "read-done" : "write-done";
      EXPECT(a.post_xfer(read, local, h, notif) == 0);
      EXPECT(wait_until([&] { return a.check_xfer(h); }, 30000));
      delete h;

      for (size_t i = 0; i < n; i++) {
        uint8_t const *l = abuf.data() + i * (len + 4096);
        uint8_t const *r = bbuf.data() + i * (len + 1);
        EXPECT(memcmp(l, r, len) == 0);
      }
      // Nothing outside the descriptors changed.
      std::vector<uint8_t> &dst = read ? abuf : bbuf;
      std::vector<uint8_t> &before = read ? a_before : b_before;
      size_t stride = read ? len + 4096 : len + 1;
      size_t changed_outside = 0;
      for (size_t i = 0; i < region; i++) {
        size_t k = i / stride, off = i % stride;
        bool inside = k < n && off < len;
        if (!inside && dst[i] != before[i]) changed_outside++;
      }
      EXPECT(changed_outside == 0);

      std::vector<std::pair<std::string, std::string>> notifs;
      EXPECT(wait_until([&] {
        auto more = Agent::get_notifs();
        notifs.insert(notifs.end(), more.begin(), more.end());
        return !notifs.empty();
      }, 30000));
      EXPECT(notifs.size() == 1 && notifs[0].first == "agent-A" &&
             notifs[0].second == "msg=" + notif);
    }
    a.deregister_mem(amd);
    b.deregister_mem(bmd);
  }
  alarm(0);
  std::printf("test_nixl_backend: %s\n", g_failures ? "FAILED" : "PASSED");
  return g_failures ? 1 : 0;
}
