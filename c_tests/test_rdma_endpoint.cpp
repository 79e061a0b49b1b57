// Drives uccl::RDMAEndpoint (the TcpxEndpoint adapter) the way UCCL's p2p engine does: 1 MiB
// chunks, at most 8 in flight, a post returning -1 is retried after polling, completion through
// uccl_poll_ureq_once on a ring of caller-owned requests. Two endpoints over loopback; send/recv,
// write and read, data checked byte for byte; then backpressure, refused requests and the small
// calls. Every wait is bounded.
#include "harness.h"

#include <uccl_tcpx/rdma_endpoint.hpp>

#include <algorithm>
#include <functional>
#include <string>
#include <thread>

namespace {

constexpr size_t kChunkSize = 1024 * 1024;
constexpr int kMaxInflightChunks = 8;
constexpr size_t MiB = 1024 * 1024;

struct LoopResult {
  int retries = 0;       // posts that returned -1
  int failures = 0;      // hard post errors and failed completions
  int bad_lengths = 0;   // completions reporting an unexpected byte count
  bool timed_out = false;
};

// post(offset, length, request) -> the post's return value.
using PostFn = std::function<int(size_t, size_t, uccl::ucclRequest *)>;

// The engine's chunk loop (send/recv/read/write share it), with a deadline.
LoopResult chunked(uccl::RDMAEndpoint &ep, size_t total, PostFn const &post, unsigned timeout_ms,
                   char const *what) {
  LoopResult r;
  uccl::ucclRequest ureq[kMaxInflightChunks];  // left uninitialised, as the engine does
  bool done[kMaxInflightChunks] = {false};
  size_t expect_len[kMaxInflightChunks] = {0};
  size_t ureq_max = (total + kChunkSize - 1) / kChunkSize;
  size_t issued = 0, finished = 0, off = 0;
  double deadline = now_ms() + timeout_ms;
  unsigned idle = 0;

  while (finished < ureq_max) {
    while (issued - finished < static_cast<size_t>(kMaxInflightChunks) && off < total) {
      size_t chunk = std::min(total - off, kChunkSize);
      size_t slot = issued % kMaxInflightChunks;
      int rc = post(off, chunk, &ureq[slot]);
      if (rc == -1) {  // not posted: retry after polling
        r.retries++;
        break;
      }
      if (rc != 0) {
        // A hard error: the request is already complete, the loop goes on as the engine's does.
        fprintf(stderr, "  %s: post of chunk at %zu returned %d\n", what, off, rc);
        r.failures++;
      }
      expect_len[slot] = chunk;
      done[slot] = false;
      off += chunk;
      issued++;
    }
    bool progressed = false;
    for (size_t i = finished; i < issued; i++) {
      size_t slot = i % kMaxInflightChunks;
      if (done[slot]) continue;
      if (ep.uccl_poll_ureq_once(&ureq[slot])) {
        done[slot] = true;
        progressed = true;
        int st = uccl::TcpxEndpoint::request_status(&ureq[slot]);
        if (st != 0) {
          fprintf(stderr, "  %s: chunk %zu finished with %d (%s)\n", what, i, st,
                  uccl_engine_status_str(st));
          r.failures++;
        } else {
          size_t got = ureq[slot].type == uccl::ReqRx
                           ? static_cast<size_t>(ureq[slot].recv.data_len[0])
                           : static_cast<size_t>(ureq[slot].send.data_len);
          if (got != expect_len[slot]) {
            fprintf(stderr, "  %s: chunk %zu reports %zu bytes, want %zu\n", what, i, got,
                    expect_len[slot]);
            r.bad_lengths++;
          }
          // Done stays done.
          if (!ep.uccl_poll_ureq_once(&ureq[slot])) r.failures++;
        }
      }
    }
    while (finished < issued && done[finished % kMaxInflightChunks]) finished++;
    if (now_ms() > deadline) {
      fprintf(stderr, "  %s: %zu of %zu chunks finished after %u ms\n", what, finished, ureq_max,
              timeout_ms);
      r.timed_out = true;
      break;
    }
    if (progressed)
      idle = 0;
    else if (++idle > 200)
      sleep_ms(1);
  }
  return r;
}

void check_loop(LoopResult const &r, char const *what) {
  CHECKF(!r.timed_out, "%s timed out", what);
  CHECKF(r.failures == 0, "%s: %d failure(s)", what, r.failures);
  CHECKF(r.bad_lengths == 0, "%s: %d wrong length(s)", what, r.bad_lengths);
}

struct Side {
  uccl::RDMAEndpoint *ep;
  uccl::ConnID conn;
  uccl::Mhandle *mh;
  uint8_t *buf;
  size_t len;
  uccl::UcclFlow *flow() const { return static_cast<uccl::UcclFlow *>(conn.context); }
};

// Sends `total` bytes from `from` to `to` in chunks, the receiver in its own thread.
void send_recv(Side &from, Side &to, size_t total, uint32_t seed, char const *what,
               LoopResult *send_result) {
  fill_pattern(from.buf, total, seed);
  memset(to.buf, 0xEE, total + 4096);
  LoopResult recv_result;
  std::thread receiver([&] {
    recv_result = chunked(*to.ep, total,
                          [&](size_t off, size_t len, uccl::ucclRequest *ureq) {
                            // The engine passes pointers to locals; the adapter must copy them.
                            uccl::Mhandle *mh = to.mh;
                            void *dst = to.buf + off;
                            int size = static_cast<int>(len);
                            return to.ep->uccl_recv_async(to.flow(), &mh, &dst, &size, 1, ureq);
                          },
                          DEFAULT_WAIT_MS, "recv");
  });
  *send_result = chunked(*from.ep, total,
                         [&](size_t off, size_t len, uccl::ucclRequest *ureq) {
                           return from.ep->uccl_send_async(from.flow(), from.mh, from.buf + off,
                                                           len, ureq);
                         },
                         DEFAULT_WAIT_MS, "send");
  receiver.join();
  std::string s = std::string(what) + " (send side)";
  std::string r = std::string(what) + " (recv side)";
  check_loop(*send_result, s.c_str());
  check_loop(recv_result, r.c_str());
  CHECKF(check_pattern(to.buf, total, seed, what), "%s: payload differs", what);
  CHECKF(check_fill(to.buf + total, 4096, 0xEE, what), "%s: wrote past the message", what);
}

bool connect_sides(uccl::RDMAEndpoint &a, uccl::RDMAEndpoint &b, uccl::ConnID *ca,
                   uccl::ConnID *cb) {
  int dev = a.get_best_dev_idx(0);
  CHECK_EQ(dev, 0);
  CHECK(a.initialize_engine_by_dev(dev, true));
  CHECK(b.initialize_engine_by_dev(b.get_best_dev_idx(0), true));
  uint16_t port = b.get_p2p_listen_port(dev);
  CHECK(port != 0);
  CHECK(b.get_p2p_listen_fd(dev) >= 0);
  std::string peer_ip;
  int remote_dev = -5, remote_gpu = -5;
  std::thread connector([&] {
    *ca = a.uccl_connect(dev, 0, dev, 0, "127.0.0.1", port);
    if (ca->context == nullptr) b.stop_accept();  // release the accept below
  });
  *cb = b.uccl_accept(dev, b.get_p2p_listen_fd(dev), 0, peer_ip, &remote_dev, &remote_gpu);
  connector.join();
  if (ca->context == nullptr || cb->context == nullptr) return false;
  CHECK_EQ(ca->sock_fd, -1);
  CHECK_EQ(ca->dev, 0);
  CHECK(ca->flow_id != 0);
  CHECKF(peer_ip == "127.0.0.1", "accept reported peer %s", peer_ip.c_str());
  CHECK_EQ(remote_dev, 0);
  CHECK_EQ(remote_gpu, 0);
  return true;
}

}  // namespace

int main() {
  test_begin("test_rdma_endpoint", 110);

  // As the engine constructs it: engines per device = its num_cpus.
  uccl::RDMAEndpoint a(ENGINE_CPUS);
  uccl::RDMAEndpoint b(ENGINE_CPUS);
  CHECKF(a.metadata().find('?') != std::string::npos, "metadata %s", a.metadata().c_str());

  uccl::ConnID ca{}, cb{};
  REQUIRE(connect_sides(a, b, &ca, &cb));

  const size_t a_len = 20 * MiB, b_len = 20 * MiB;
  Side A{&a, ca, nullptr, xalloc(a_len + 4096), a_len};
  Side B{&b, cb, nullptr, xalloc(b_len + 4096), b_len};
  // Registration covers the slack too, so an overrun would land in registered memory and show.
  REQUIRE(a.uccl_regmr(0, A.buf, a_len + 4096, 0, &A.mh) == 0);
  REQUIRE(b.uccl_regmr(0, B.buf, b_len + 4096, 0, &B.mh) == 0);
  REQUIRE(A.mh != nullptr && A.mh->mr != nullptr && B.mh != nullptr && B.mh->mr != nullptr);
  CHECK(A.mh->mr->addr == A.buf);
  CHECK_EQ(A.mh->mr->length, a_len + 4096);

  // ---- send/recv, both directions (connections are bidirectional) ----
  LoopResult sr;
  send_recv(A, B, 13 * MiB + 4321, 11, "send/recv A->B", &sr);
  send_recv(B, A, 3 * MiB + 1, 12, "send/recv B->A", &sr);
  CHECK_EQ(a.outstanding(), 0);
  CHECK_EQ(b.outstanding(), 0);

  // ---- one-sided write and read against a window B advertised ----
  const size_t adv_off = MiB + 64, adv_len = 16 * MiB + 777;
  char fifo_buf[FIFO_SIZE];
  uccl::Mhandle *bmh = B.mh;
  REQUIRE(b.prepare_fifo_metadata(nullptr, &bmh, B.buf + adv_off, adv_len, fifo_buf) == 0);
  uccl::FifoItem slot;
  deserialize_fifo_item(fifo_buf, &slot);  // the C++ form from common.h, as the engine uses
  CHECK(slot.addr == reinterpret_cast<uintptr_t>(B.buf + adv_off));
  CHECK_EQ(slot.size, adv_len);

  // The engine clones the slot item per chunk and moves addr/size.
  auto item_at = [&](size_t off, size_t len) {
    uccl::FifoItem it = slot;
    it.addr += off;
    it.size = static_cast<uint32_t>(len);
    return it;
  };

  memset(B.buf, 0x5A, b_len + 4096);
  fill_pattern(A.buf, adv_len, 21);
  LoopResult wr = chunked(a, adv_len,
                          [&](size_t off, size_t len, uccl::ucclRequest *ureq) {
                            return a.uccl_write_async(A.flow(), A.mh, A.buf + off, len,
                                                      item_at(off, len), ureq);
                          },
                          DEFAULT_WAIT_MS, "write");
  check_loop(wr, "write");
  CHECK(check_pattern(B.buf + adv_off, adv_len, 21, "written window"));
  CHECK(check_fill(B.buf, adv_off, 0x5A, "bytes before the window"));
  CHECK(check_fill(B.buf + adv_off + adv_len, 4096, 0x5A, "bytes after the window"));

  fill_pattern(B.buf + adv_off, adv_len, 22);
  memset(A.buf, 0xEE, adv_len + 4096);
  LoopResult rd = chunked(a, adv_len,
                          [&](size_t off, size_t len, uccl::ucclRequest *ureq) {
                            return a.uccl_read_async(A.flow(), A.mh, A.buf + off, len,
                                                     item_at(off, len), ureq);
                          },
                          DEFAULT_WAIT_MS, "read");
  check_loop(rd, "read");
  CHECK(check_pattern(A.buf, adv_len, 22, "read window"));
  CHECK(check_fill(A.buf + adv_len, 4096, 0xEE, "bytes past the read destination"));

  // ---- single requests, as the engine's read() and send_async()/recv_async()/poll_async() ----
  {
    const size_t len = 700001;
    fill_pattern(B.buf + adv_off, len, 41);
    memset(A.buf, 0, len);
    uccl::ucclRequest ureq;
    memset(&ureq, 0, sizeof(uccl::ucclRequest));
    int rc;
    do {
      rc = a.uccl_read_async(A.flow(), A.mh, A.buf, len, slot, &ureq);
      if (rc == -1) std::this_thread::yield();
    } while (rc == -1);
    CHECK_EQ(rc, 0);
    double deadline = now_ms() + DEFAULT_WAIT_MS;
    while (!a.uccl_poll_ureq_once(&ureq) && now_ms() < deadline) {
    }
    CHECK_EQ(uccl::TcpxEndpoint::request_status(&ureq), 0);
    CHECK(check_pattern(A.buf, len, 41, "single read"));

    auto *sreq = new uccl::ucclRequest();
    auto *rreq = new uccl::ucclRequest();
    fill_pattern(A.buf, len, 42);
    memset(B.buf, 0, len);
    uccl::Mhandle *mh = B.mh;
    void *dst = B.buf;
    int size_int = static_cast<int>(len);
    CHECK_EQ(b.uccl_recv_async(B.flow(), &mh, &dst, &size_int, 1, rreq), 0);
    CHECK_EQ(a.uccl_send_async(A.flow(), A.mh, A.buf, len, sreq), 0);
    deadline = now_ms() + DEFAULT_WAIT_MS;
    bool sdone = false, rdone = false;
    while (!(sdone && rdone) && now_ms() < deadline) {
      sdone = sdone || a.uccl_poll_ureq_once(sreq);
      rdone = rdone || b.uccl_poll_ureq_once(rreq);
    }
    CHECK(sdone && rdone);
    CHECK_EQ(uccl::TcpxEndpoint::request_status(rreq), 0);
    CHECK_EQ(rreq->recv.data_len[0], static_cast<int>(len));
    CHECK(check_pattern(B.buf, len, 42, "single send/recv"));
    delete sreq;
    delete rreq;
  }

  // ---- backpressure: a limit below the engine's 8 in flight makes posts return -1 ----
  a.set_max_outstanding(3);
  b.set_max_outstanding(2);
  LoopResult limited;
  send_recv(A, B, 12 * MiB + 99, 31, "send/recv under a limit", &limited);
  CHECKF(limited.retries > 0, "no post returned -1 under a limit of 3 (retries %d)",
         limited.retries);
  printf("posts retried after -1 under the limit: %d\n", limited.retries);
  LoopResult limited_wr = chunked(a, 8 * MiB,
                                  [&](size_t off, size_t len, uccl::ucclRequest *ureq) {
                                    return a.uccl_write_async(A.flow(), A.mh, A.buf + off, len,
                                                              item_at(off, len), ureq);
                                  },
                                  DEFAULT_WAIT_MS, "write under a limit");
  check_loop(limited_wr, "write under a limit");
  CHECK(limited_wr.retries > 0);
  CHECK(check_bytes(B.buf + adv_off, A.buf, 8 * MiB, "window written under a limit"));
  CHECK_EQ(a.outstanding(), 0);
  CHECK_EQ(b.outstanding(), 0);
  a.set_max_outstanding(0);
  b.set_max_outstanding(0);

  // ---- refused and invalid requests complete with an error, never hang ----
  {
    uccl::ucclRequest ureq;
    memset(B.buf + adv_off + adv_len, 0x33, 4096);
    uccl::FifoItem outside = item_at(adv_len - 100, 4096);  // overruns the window by 3996 bytes
    int rc = a.uccl_write_async(A.flow(), A.mh, A.buf, 4096, outside, &ureq);
    double deadline = now_ms() + DEFAULT_WAIT_MS;
    while (rc == 0 && !a.uccl_poll_ureq_once(&ureq) && now_ms() < deadline) sleep_ms(1);
    int st = rc == 0 ? uccl::TcpxEndpoint::request_status(&ureq) : rc;
    CHECKF(st == UCCL_STATUS_ERR_NOT_ALLOWED, "write outside the window: %d, want %d", st,
           UCCL_STATUS_ERR_NOT_ALLOWED);
    CHECK(check_fill(B.buf + adv_off + adv_len, 4096, 0x33, "bytes after the window"));
    CHECK(a.uccl_poll_ureq_once(&ureq));
    CHECK_EQ(a.outstanding(), 0);

    // Multi-buffer receives are not supported: a hard error, the request is complete at once.
    uccl::Mhandle *mhs[2] = {B.mh, B.mh};
    void *bufs[2] = {B.buf, B.buf + 4096};
    int sizes[2] = {4096, 4096};
    rc = b.uccl_recv_async(B.flow(), mhs, bufs, sizes, 2, &ureq);
    CHECK_EQ(rc, UCCL_STATUS_ERR_NOT_SUPPORTED);
    CHECK(b.uccl_poll_ureq_once(&ureq));
    CHECK_EQ(uccl::TcpxEndpoint::request_status(&ureq), UCCL_STATUS_ERR_NOT_SUPPORTED);

    // A post without a registration: hard error (never -1, which would make callers spin).
    rc = a.uccl_send_async(A.flow(), nullptr, A.buf, 16, &ureq);
    CHECK(rc < -1);
    CHECK(a.uccl_poll_ureq_once(&ureq));

    // A never-posted (zeroed) request is not in flight.
    uccl::ucclRequest zero;
    memset(&zero, 0, sizeof zero);
    CHECK(a.uccl_poll_ureq_once(&zero));
    CHECK_EQ(uccl::TcpxEndpoint::request_status(&zero), UCCL_STATUS_ERR_NOT_FOUND);
    CHECK_EQ(a.outstanding(), 0);
  }

  // ---- registration failure: -1 and a handle whose mr is null (the engine's check) ----
  {
    uccl::Mhandle *bad = nullptr;
    CHECK_EQ(a.uccl_regmr(0, nullptr, 4096, 0, &bad), -1);
    CHECK(bad != nullptr && bad->mr == nullptr);
    char buf[FIFO_SIZE];
    CHECK_EQ(a.prepare_fifo_metadata(nullptr, &bad, A.buf, 4096, buf), -1);
    CHECK_EQ(a.prepare_fifo_metadata(nullptr, nullptr, A.buf, 4096, buf), -1);
    a.uccl_deregmr(bad);
    a.uccl_deregmr(nullptr);
    // Outside the registration: refused by the library.
    uccl::Mhandle *amh = A.mh;
    CHECK_EQ(a.prepare_fifo_metadata(nullptr, &amh, A.buf + a_len + 4096, 4096, buf), -1);
  }

  // ---- stop_accept releases a blocked accept ----
  {
    uccl::RDMAEndpoint c(1);
    std::string ip;
    int rdev = 0, rgpu = 0;
    std::thread stopper([&] {
      sleep_ms(100);
      c.stop_accept();
    });
    uccl::ConnID none = c.uccl_accept(0, c.get_p2p_listen_fd(0), 0, ip, &rdev, &rgpu);
    stopper.join();
    CHECK(none.context == nullptr);
    CHECK_EQ(none.dev, -1);
    // Once stopped, later accepts (here the five-argument form) fail at once.
    none = c.uccl_accept(0, c.get_p2p_listen_fd(0), 0, ip, &rgpu);
    CHECK(none.context == nullptr);
  }

  a.uccl_deregmr(A.mh);
  b.uccl_deregmr(B.mh);
  free(A.buf);
  free(B.buf);
  watchdog_disarm();
  return finish("test_rdma_endpoint");
}
