// What UCCL's p2p engine (September-October 2025) takes from its RDMA transport.h, used the way the
// engine uses it, through uccl_tcpx/rdma_compat/transport.h: its settings (ucclParam*), the NUMA
// node of the device it serves (RDMAFactory), the FifoItem helpers in namespace uccl and
// FifoItem::engine_offset set per chunk, the connector's GPU index reported by accept, a receive
// posted larger than its registration, and hard errors that abort the process (in children).
#include "harness.h"

#include <uccl_tcpx/rdma_compat/transport.h>

#include <cstddef>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>

#include <sys/stat.h>
#include <sys/wait.h>

namespace {

constexpr size_t kChunk = 64 * 1024;

// The engine's fixed table: GPU index -> device.
int gpu_to_dev[8] = {0};

struct Link {
  uccl::ConnID conn{};
  uccl::UcclFlow *flow() const { return static_cast<uccl::UcclFlow *>(conn.context); }
};

// As Endpoint::Endpoint, connect() and accept(): `a` (GPU `a_gpu`) connects to `b` (GPU `b_gpu`).
bool connect_as_engine(uccl::RDMAEndpoint &a, int a_gpu, uccl::RDMAEndpoint &b, int b_gpu,
                       Link *ab, Link *ba, int *reported_gpu) {
  for (int i = 0; i < 8; i++) gpu_to_dev[i] = a.get_best_dev_idx(i);
  CHECK(a.initialize_engine_by_dev(gpu_to_dev[a_gpu], true));
  CHECK(b.initialize_engine_by_dev(b.get_best_dev_idx(b_gpu), true));
  uint16_t port = b.get_p2p_listen_port(gpu_to_dev[b_gpu]);
  std::string ip;
  int remote_dev = -5;
  std::thread connector([&] {
    ab->conn = a.uccl_connect(gpu_to_dev[a_gpu], a_gpu, gpu_to_dev[b_gpu], b_gpu, "127.0.0.1", port);
    if (ab->conn.context == nullptr) b.stop_accept();
  });
  ba->conn = b.uccl_accept(gpu_to_dev[b_gpu], b.get_p2p_listen_fd(gpu_to_dev[b_gpu]), b_gpu, ip,
                           &remote_dev, reported_gpu);
  connector.join();
  return ab->conn.context != nullptr && ba->conn.context != nullptr;
}

// Polls one request to completion (bounded); returns its status.
int wait_req(uccl::RDMAEndpoint &ep, uccl::ucclRequest *ureq) {
  double deadline = now_ms() + DEFAULT_WAIT_MS;
  while (!ep.uccl_poll_ureq_once(ureq)) {
    if (now_ms() > deadline) return WAIT_TIMED_OUT;
    std::this_thread::yield();
  }
  return uccl::TcpxEndpoint::request_status(ureq);
}

// engine.cc's recv(): one uccl_recv_async of `size` bytes, polled until done.
int recv_like_engine(uccl::RDMAEndpoint &ep, Link const &l, uccl::Mhandle *mh, void *data,
                     int size, uccl::ucclRequest *ureq) {
  void *d = data;
  int s = size;
  uccl::Mhandle *m = mh;
  int rc;
  do {
    rc = ep.uccl_recv_async(l.flow(), &m, &d, &s, 1, ureq);
  } while (rc == -1);
  return rc;
}

int send_like_engine(uccl::RDMAEndpoint &ep, Link const &l, uccl::Mhandle *mh, void const *data,
                     size_t size, uccl::ucclRequest *ureq) {
  int rc;
  do {
    rc = ep.uccl_send_async(l.flow(), mh, data, size, ureq);
  } while (rc == -1);
  return rc;
}

std::string slurp(std::string const &path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Runs `body` in a child whose stderr goes to a file; returns the child's wait status and stderr.
template <class Body>
int in_child(Body body, std::string *err) {
  char path[] = "/tmp/uccl_transport_child_XXXXXX";
  int fd = mkstemp(path);
  if (fd < 0) return -1;
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(fd, STDERR_FILENO);
    alarm(60);
    body();
    _exit(0);
  }
  close(fd);
  int status = 0;
  waitpid(pid, &status, 0);
  *err = slurp(path);
  unlink(path);
  return status;
}

bool aborted(int status) { return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT; }

// A message larger than the registered room of the receive, on two endpoints of one process;
// with `report`, returns the receive's status (the kAbort default never gets there).
int oversized_message(bool report) {
  uccl::RDMAEndpoint a(ENGINE_CPUS), b(ENGINE_CPUS);
  if (report) b.set_error_policy(uccl::ErrorPolicy::kReport);
  Link ab, ba;
  int gpu = -1;
  if (!connect_as_engine(a, 0, b, 0, &ab, &ba, &gpu)) return WAIT_TIMED_OUT;
  uint8_t *src = xalloc(8192), *dst = xalloc(8192);
  fill_pattern(src, 8192, 1);
  memset(dst, 0x3C, 8192);
  uccl::Mhandle *smh = nullptr, *dmh = nullptr;
  if (a.uccl_regmr(0, src, 8192, 0, &smh) != 0 || b.uccl_regmr(0, dst, 4096, 0, &dmh) != 0) {
    free(src);
    free(dst);
    return WAIT_TIMED_OUT;
  }
  uccl::ucclRequest rreq, sreq;
  if (recv_like_engine(b, ba, dmh, dst, 8192, &rreq) != 0) return WAIT_TIMED_OUT;
  a.set_error_policy(uccl::ErrorPolicy::kReport);  // the sender's failure is not the point here
  send_like_engine(a, ab, smh, src, 4097, &sreq);
  int st = wait_req(b, &rreq);
  if (!check_fill(dst, 8192, 0x3C, "receive buffer after a refused message")) st = -999;
  (void)wait_req(a, &sreq);
  a.uccl_deregmr(smh);
  b.uccl_deregmr(dmh);
  free(src);
  free(dst);
  return st;
}

void test_settings() {
  using uccl_tcpx::detail::uccl_param;
  // The parser behind every setting: unset/empty -> default, decimal in range, else refused.
  unsetenv("UCCL_TCPX_TEST_PARAM");
  CHECK_EQ(uccl_param("UCCL_TCPX_TEST_PARAM", 4, 1, 256), 4);
  setenv("UCCL_TCPX_TEST_PARAM", "", 1);
  CHECK_EQ(uccl_param("UCCL_TCPX_TEST_PARAM", 4, 1, 256), 4);
  setenv("UCCL_TCPX_TEST_PARAM", "17", 1);
  CHECK_EQ(uccl_param("UCCL_TCPX_TEST_PARAM", 4, 1, 256), 17);
  for (char const *bad : {"0", "257", "-1", "4x", " 4", "0x10", "abc", "99999999999999999999"}) {
    setenv("UCCL_TCPX_TEST_PARAM", bad, 1);
    std::string what;
    try {
      (void)uccl_param("UCCL_TCPX_TEST_PARAM", 4, 1, 256);
    } catch (std::invalid_argument const &e) {
      what = e.what();
    }
    CHECKF(what == std::string("UCCL_TCPX_TEST_PARAM=\"") + bad +
                       "\" is not a decimal integer in [1, 256]",
           "value \"%s\": got \"%s\"", bad, what.c_str());
  }
  unsetenv("UCCL_TCPX_TEST_PARAM");

  // The engine's three settings, from UCCL's variables, in children (each value is read once per
  // process).
  std::string err;
  int st = in_child(
      [] {
        setenv("UCCL_NUM_GPU_RT_STREAMS", "2", 1);
        setenv("UCCL_RCMODE", "0", 1);
        setenv("UCCL_NUM_ENGINES", "6", 1);
        bool ok = ucclParamNumGpuRtStreams() == 2 && ucclParamRCMode() == 0 &&
                  ucclParamNUM_ENGINES() == 6;
        _exit(ok ? 0 : 1);
      },
      &err);
  CHECKF(WIFEXITED(st) && WEXITSTATUS(st) == 0, "settings from the environment: status %d %s", st,
         err.c_str());

  // A refused value fails the endpoint's construction, naming the variable.
  st = in_child(
      [] {
        setenv("UCCL_NUM_ENGINES", "0", 1);
        try {
          uccl::RDMAEndpoint ep(ENGINE_CPUS);
        } catch (std::invalid_argument const &e) {
          fprintf(stderr, "%s\n", e.what());
          _exit(7);
        }
        _exit(0);
      },
      &err);
  CHECKF(WIFEXITED(st) && WEXITSTATUS(st) == 7, "UCCL_NUM_ENGINES=0: status %d", st);
  CHECKF(err.find("UCCL_NUM_ENGINES=\"0\" is not a decimal integer in [1, 256]") !=
             std::string::npos,
         "UCCL_NUM_ENGINES=0 said: %s", err.c_str());

  // Defaults, read as the engine reads them.
  unsetenv("UCCL_NUM_GPU_RT_STREAMS");
  unsetenv("UCCL_RCMODE");
  unsetenv("UCCL_NUM_ENGINES");
  int n_streams = std::max(1, static_cast<int>(ucclParamNumGpuRtStreams()));
  CHECK_EQ(n_streams, 4);
  CHECK(ucclParamRCMode());
  CHECK_EQ(ucclParamNUM_ENGINES(), 4);
}

void test_numa_from_sysfs() {
  // A sysfs tree of our own: a GPU on node 1, a NIC on node 3, a device without locality (-1) and
  // one with a garbled file.
  char root[] = "/tmp/uccl_sysfs_XXXXXX";
  REQUIRE(mkdtemp(root) != nullptr);
  std::string r = root;
  auto put = [&](std::string const &dir, char const *value) {
    std::string path = r;
    size_t start = 1;
    while (start <= dir.size()) {
      size_t slash = dir.find('/', start);
      if (slash == std::string::npos) slash = dir.size();
      path = r + dir.substr(0, slash);
      mkdir(path.c_str(), 0700);
      start = slash + 1;
    }
    std::ofstream(path + "/numa_node") << value;
  };
  put("/bus/pci/devices/0000:4a:00.0", "1\n");
  put("/bus/pci/devices/0000:4b:00.0", "-1\n");
  put("/bus/pci/devices/0000:4c:00.0", "one\n");
  put("/class/net/eth9/device", "3\n");
  using namespace uccl_tcpx::sysfs;
  CHECK_EQ(pci_numa_node("0000:4a:00.0", r), 1);
  CHECK_EQ(pci_numa_node("0000:4b:00.0", r), -1);
  CHECK_EQ(pci_numa_node("0000:4c:00.0", r), -1);
  CHECK_EQ(pci_numa_node("0000:ff:00.0", r), -1);
  CHECK_EQ(pci_numa_node("../../etc", r), -1);
  CHECK_EQ(netdev_numa_node("eth9", r), 3);
  CHECK_EQ(netdev_numa_node("lo", r), -1);
  Device d = describe("10.1.2.3:5000?0000:4a:00.0", r);
  CHECK(d.name == "gpu 0000:4a:00.0");
  CHECK_EQ(d.numa, 1);
  // Host-only metadata names the NIC that holds the address; loopback has no device behind it.
  d = describe("127.0.0.1:5000?0", r);
  CHECK(d.name == "nic lo");
  CHECK_EQ(d.numa, -1);
  d = describe("203.0.113.254:5000?0", r);  // an address no interface holds (TEST-NET-3)
  CHECK(d.name == "host");
  std::string cleanup = "rm -rf '" + r + "'";
  CHECK_EQ(system(cleanup.c_str()), 0);
}

void test_factory_and_fifo(uccl::RDMAEndpoint &a, uccl::RDMAEndpoint &b) {
  // engine.cc:78: the NUMA node of the device serving the local GPU.
  int local_gpu_idx = 0;
  int numa = uccl::RDMAFactory::get_factory_dev(a.get_best_dev_idx(local_gpu_idx))->numa_node;
  uccl_tcpx::sysfs::Device d = uccl_tcpx::sysfs::describe(a.metadata());
  CHECKF(numa == (d.numa < 0 ? 0 : d.numa), "numa_node %d for %s (sysfs %d)", numa,
         d.name.c_str(), d.numa);
  uccl::FactoryDevice *fd = uccl::RDMAFactory::get_factory_dev(a.get_best_dev_idx(0));
  CHECK(fd->name == d.name);
  CHECK_EQ(fd->sysfs_numa_node, d.numa);
  CHECK_EQ(fd->dev, a.get_best_dev_idx(0));
  // Two endpoints of one device share its index.
  CHECK_EQ(a.get_best_dev_idx(0), b.get_best_dev_idx(1));
  bool threw = false;
  try {
    (void)uccl::RDMAFactory::get_factory_dev(1000);
  } catch (std::out_of_range const &) {
    threw = true;
  }
  CHECK(threw);

  // FifoItem: UCCL's fields, engine_offset at byte 32 over the padding C sees.
  CHECK_EQ(sizeof(uccl::FifoItem), 64u);
  CHECK_EQ(offsetof(FifoItem, engine_offset), 32u);
  CHECK_EQ(offsetof(FifoItem, padding), 32u);
  uccl::FifoItem item;
  memset(&item, 0, sizeof item);
  item.addr = 0x1122334455667788ull;
  item.size = 4096;
  item.engine_offset = 0xA1B2C3D4u;
  char wire[FIFO_SIZE];
  uccl::serialize_fifo_item(item, wire);
  uint32_t off_on_wire = 0;
  memcpy(&off_on_wire, wire + 32, 4);
  CHECK_EQ(off_on_wire, 0xA1B2C3D4u);
  uccl::FifoItem back;
  uccl::deserialize_fifo_item(wire, &back);
  CHECK(memcmp(&back, &item, sizeof item) == 0);
}

void test_engine_flow(uccl::RDMAEndpoint &a, uccl::RDMAEndpoint &b) {
  // The connector's GPU index reaches the acceptor (engine.cc connect/accept).
  Link ab, ba;
  int reported = -5;
  REQUIRE(connect_as_engine(a, 1, b, 0, &ab, &ba, &reported));
  CHECK_EQ(reported, 1);
  Link ab3, ba3;
  REQUIRE(connect_as_engine(a, 3, b, 0, &ab3, &ba3, &reported));
  CHECK_EQ(reported, 3);
  // The C function behind it refuses a negative index other than -1 before connecting.
  int port = static_cast<int>(b.get_p2p_listen_port(b.get_best_dev_idx(0)));
  CHECK(uccl_engine_connect_from_gpu(a.engine(), "127.0.0.1", "0", port, -2) == nullptr);
  char err[256];
  last_error_text(err, sizeof err);
  CHECKF(strstr(err, "local_gpu_idx -2 is neither -1 nor a GPU index") != nullptr, "said: %s", err);

  // test_engine_send.py's shape: an 8 KiB receive into a 4 KiB registration takes 4 KiB.
  uint8_t *src = xalloc(1 << 20), *dst = xalloc(1 << 20);
  uccl::Mhandle *smh = nullptr, *dmh = nullptr;
  REQUIRE(a.uccl_regmr(0, src, 1 << 20, 0, &smh) == 0);
  REQUIRE(b.uccl_regmr(0, dst, 4096, 0, &dmh) == 0);
  fill_pattern(src, 4096, 5);
  memset(dst, 0x77, 8192);
  uccl::ucclRequest rreq, sreq;
  REQUIRE(recv_like_engine(b, ba, dmh, dst, 8192, &rreq) == 0);
  CHECK_EQ(send_like_engine(a, ab, smh, src, 4096, &sreq), 0);
  CHECK_EQ(wait_req(a, &sreq), 0);
  CHECK_EQ(wait_req(b, &rreq), 0);
  CHECK_EQ(rreq.recv.data_len[0], 4096);
  CHECK(check_pattern(dst, 4096, 5, "8 KiB receive into 4 KiB registration"));
  CHECK(check_fill(dst + 4096, 4096, 0x77, "past the registration"));
  b.uccl_deregmr(dmh);

  // engine.cc write()/read(): chunks, each a copy of the slot item with addr, size and
  // engine_offset set.
  const size_t len = 4 * kChunk + 123;
  REQUIRE(b.uccl_regmr(0, dst, 1 << 20, 0, &dmh) == 0);
  char fifo_buf[FIFO_SIZE];
  uccl::Mhandle *adv = dmh;
  REQUIRE(b.prepare_fifo_metadata(nullptr, &adv, dst, len, fifo_buf) == 0);
  uccl::FifoItem slot_item;
  uccl::deserialize_fifo_item(fifo_buf, &slot_item);
  auto num_engines = ucclParamNUM_ENGINES();
  auto chunked = [&](bool write) {
    size_t done = 0;
    for (int issued = 0; done < len; issued++) {
      size_t chunk = std::min(len - done, kChunk);
      uccl::FifoItem curr = slot_item;
      curr.addr += done;
      curr.size = static_cast<uint32_t>(chunk);
      curr.engine_offset = static_cast<uint32_t>(issued % num_engines);
      uccl::ucclRequest ureq;
      memset(&ureq, 0, sizeof(uccl::ucclRequest));
      int rc;
      do {
        rc = write ? a.uccl_write_async(ab.flow(), smh, src + done, chunk, curr, &ureq)
                   : a.uccl_read_async(ab.flow(), smh, src + done, chunk, curr, &ureq);
      } while (rc == -1);
      CHECK_EQ(rc, 0);
      CHECK_EQ(wait_req(a, &ureq), 0);
      done += chunk;
    }
  };
  fill_pattern(src, len, 9);
  memset(dst, 0, len + 64);
  chunked(true);
  CHECK(check_pattern(dst, len, 9, "chunked writes with engine_offset"));
  CHECK(check_fill(dst + len, 64, 0, "past the written window"));
  fill_pattern(dst, len, 10);
  memset(src, 0, len);
  chunked(false);
  CHECK(check_pattern(src, len, 10, "chunked reads with engine_offset"));
  a.uccl_deregmr(smh);
  b.uccl_deregmr(dmh);
  free(src);
  free(dst);
}

void test_hard_errors() {
  // The engine's default: the failed transfer aborts the process with the reason.
  std::string err;
  int st = in_child([] { (void)oversized_message(false); }, &err);
  CHECKF(aborted(st), "an oversized message did not abort (status %d): %s", st, err.c_str());
  CHECKF(err.find("uccl::RDMAEndpoint: receive transfer on connection") != std::string::npos &&
             err.find("would land outside memory region") != std::string::npos,
         "abort message: %s", err.c_str());

  // A hard error at post aborts too: a write with a FifoItem this library did not mint.
  st = in_child(
      [] {
        uccl::RDMAEndpoint a(ENGINE_CPUS), b(ENGINE_CPUS);
        Link ab, ba;
        int gpu = -1;
        if (!connect_as_engine(a, 0, b, 0, &ab, &ba, &gpu)) _exit(9);
        uint8_t *buf = xalloc(4096);
        uccl::Mhandle *mh = nullptr;
        if (a.uccl_regmr(0, buf, 4096, 0, &mh) != 0) _exit(9);
        uccl::FifoItem foreign;
        memset(&foreign, 0, sizeof foreign);
        foreign.addr = 4096;
        foreign.size = 64;
        uccl::ucclRequest ureq;
        (void)a.uccl_write_async(ab.flow(), mh, buf, 64, foreign, &ureq);
        _exit(0);  // not reached under kAbort
      },
      &err);
  CHECKF(aborted(st), "a refused post did not abort (status %d): %s", st, err.c_str());
  CHECKF(err.find("uccl::RDMAEndpoint: write post") != std::string::npos &&
             err.find("not minted by uccl-tcpx") != std::string::npos,
         "abort message: %s", err.c_str());

  // A post the adapter itself refuses names its own reason.
  st = in_child(
      [] {
        uccl::RDMAEndpoint a(ENGINE_CPUS);
        uccl::ucclRequest ureq;
        void *data[2] = {nullptr, nullptr};
        int size[2] = {1, 1};
        uccl::Mhandle *mhs[2] = {nullptr, nullptr};
        (void)a.uccl_recv_async(nullptr, mhs, data, size, 2, &ureq);
        _exit(0);
      },
      &err);
  CHECKF(aborted(st), "a two-buffer receive did not abort (status %d): %s", st, err.c_str());
  CHECKF(err.find("uccl::RDMAEndpoint: receive post") != std::string::npos &&
             err.find("only one buffer per receive (n == 1) is supported") != std::string::npos,
         "abort message: %s", err.c_str());

  // UCCL_TCPX_ADAPTER_ERRORS=report restores reporting; a bad value is refused by name.
  st = in_child(
      [] {
        setenv("UCCL_TCPX_ADAPTER_ERRORS", "report", 1);
        uccl::RDMAEndpoint ep(ENGINE_CPUS);
        _exit(ep.error_policy() == uccl::ErrorPolicy::kReport ? 0 : 1);
      },
      &err);
  CHECKF(WIFEXITED(st) && WEXITSTATUS(st) == 0, "UCCL_TCPX_ADAPTER_ERRORS=report: %d", st);
  st = in_child(
      [] {
        setenv("UCCL_TCPX_ADAPTER_ERRORS", "loud", 1);
        try {
          uccl::RDMAEndpoint ep(ENGINE_CPUS);
        } catch (std::runtime_error const &e) {
          fprintf(stderr, "%s\n", e.what());
          _exit(7);
        }
        _exit(0);
      },
      &err);
  CHECKF(WIFEXITED(st) && WEXITSTATUS(st) == 7, "UCCL_TCPX_ADAPTER_ERRORS=loud: %d", st);
  CHECKF(err.find("UCCL_TCPX_ADAPTER_ERRORS=\"loud\" is not one of") != std::string::npos,
         "said: %s", err.c_str());

  // Reported instead (in this process, after the children): the receive fails with NOT_ALLOWED
  // and nothing lands.
  CHECK_EQ(oversized_message(true), UCCL_STATUS_ERR_NOT_ALLOWED);
}

}  // namespace

int main() {
  test_begin("test_uccl_transport", 110);
  // Children fork first, while this process has no engine threads yet.
  test_settings();
  test_hard_errors();
  test_numa_from_sysfs();

  uccl::RDMAEndpoint a(ENGINE_CPUS);
  uccl::RDMAEndpoint b(ENGINE_CPUS);
  CHECK(a.error_policy() == uccl::ErrorPolicy::kAbort);
  test_factory_and_fifo(a, b);
  test_engine_flow(a, b);
  return finish("test_uccl_transport");
}
