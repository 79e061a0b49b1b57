/*
 * uccl-tcpx: uccl::TcpxEndpoint, a header-only C++17 adapter with the method set that UCCL's p2p
 * engine (September-October 2025) calls on uccl::RDMAEndpoint, implemented with the C functions of
 * uccl_engine.h only. Code written for RDMAEndpoint compiles against it through the type alias
 * uccl::RDMAEndpoint (define UCCL_TCPX_NO_RDMA_ENDPOINT_ALIAS before including to leave the name
 * free).
 *
 * How the RDMA shapes map onto the engine:
 *  - One endpoint owns one uccl_engine_t (created by the constructor, destroyed by the destructor
 *    together with every connection the endpoint opened or accepted). There is a single "device":
 *    get_best_dev_idx() is 0 and `dev` arguments are accepted and ignored.
 *  - A connection is bidirectional: either side may send, receive, read and write on it (UCCL's
 *    flows are one-way: connect gives a send flow, accept a receive flow; using them that way works
 *    too). ConnID::context is the uccl_conn_t* (cast to UcclFlow*); ConnID::sock_fd is -1 because
 *    the control stream is internal to the library (notifications go through
 *    uccl_engine_send_notif).
 *  - Mhandle::mr points to a TcpxMr (region id, address, length), not to an ibv_mr.
 *  - FifoItem is the 64-byte capability of uccl_engine.h, with UCCL's fields. `addr` and `size`
 *    may be changed (to address a sub-range of what the target advertised), and so may
 *    `engine_offset` (bytes 32..36), which UCCL's engine sets per chunk and this library ignores;
 *    bytes 36..64 carry the region id and token the target checks. uccl::serialize_fifo_item and
 *    uccl::deserialize_fifo_item are the wire helpers, as in UCCL's transport.
 *  - Devices: get_best_dev_idx() returns the index of the device this endpoint's engine serves in
 *    uccl::RDMAFactory (its GPU, else the NIC of its address), whose numa_node comes from sysfs.
 *  - Posts return 0 once the transfer is under way. -1 means "not posted, retry later", as with
 *    RDMA: it is returned only while set_max_outstanding()'s limit is reached (no limit by
 *    default) or when the library reports UCCL_STATUS_ERR_NOT_POSTED; the request is then not in
 *    flight and can be reused for the retry. Any other negative value is a hard error (a
 *    uccl_status_t): the request is then already complete, so uccl_poll_ureq_once() returns true
 *    for it at once and request_status() tells the error.
 *  - Hard errors and ErrorPolicy: with ErrorPolicy::kReport (the default of TcpxEndpoint) a hard
 *    error is only recorded, for request_status(). With ErrorPolicy::kAbort (the default of the
 *    uccl::RDMAEndpoint that uccl_tcpx/rdma_compat/transport.h defines for UCCL's engine, which
 *    never reads a request's status) the error is printed to stderr and the process aborts, as
 *    UCCL's RDMA transport does on a failed work completion, instead of the caller taking the
 *    request for a success. UCCL_TCPX_ADAPTER_ERRORS=report|abort overrides either default.
 *  - The other entry points (accept with or without `remote_dev`, get_p2p_listen_fd, regmr
 *    failures, prepare_fifo_metadata) document their choices where they are defined.
 *  - uccl_poll_ureq_once() returns true once the transfer finished, successfully or not (so a
 *    polling loop never spins on a failed transfer), and keeps returning true for that request;
 *    request_status() is 0 on success, else the failure status. Receives record the received
 *    length in recv.data_len[0].
 *  - Multi-buffer receives (n > 1) are not supported: kMaxRecv is 1.
 */
#ifndef UCCL_TCPX_RDMA_ENDPOINT_HPP
#define UCCL_TCPX_RDMA_ENDPOINT_HPP

#ifndef __cplusplus
#error "uccl_tcpx/rdma_endpoint.hpp is C++ only"
#endif

#include "../uccl_engine.h"
#include "engine_cxx.hpp" /* ::serialize_fifo_item, ::deserialize_fifo_item */

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <sys/socket.h>

namespace uccl_tcpx {
/* Where an engine's device sits, read from sysfs. `root` is "/sys" except in tests. */
namespace sysfs {

/* The integer in a sysfs numa_node file: -1 when the file is missing, unreadable or not an
 * integer, as the kernel itself writes for a device without NUMA locality. */
inline int read_numa_node(std::string const &path) {
  std::ifstream in(path);
  if (!in.is_open()) return -1;
  std::string text;
  std::getline(in, text);
  errno = 0;
  char *end = nullptr;
  long value = std::strtol(text.c_str(), &end, 10);
  if (end == text.c_str() || errno != 0 || value < -1 || value > 4095) return -1;
  while (*end == ' ' || *end == '\n') end++;
  if (*end != '\0') return -1;
  return static_cast<int>(value);
}

/* A PCI device by bus id in sysfs form ("0000:4a:00.0"). */
inline int pci_numa_node(std::string const &bus_id, std::string const &root = "/sys") {
  if (bus_id.empty() || bus_id.find('/') != std::string::npos) return -1;
  return read_numa_node(root + "/bus/pci/devices/" + bus_id + "/numa_node");
}

/* A network interface by name; -1 for virtual ones (no device behind them). */
inline int netdev_numa_node(std::string const &ifname, std::string const &root = "/sys") {
  if (ifname.empty() || ifname.find('/') != std::string::npos) return -1;
  return read_numa_node(root + "/class/net/" + ifname + "/device/numa_node");
}

/* The interface holding IP address `ip` (IPv4 or IPv6 text), or "" when none does. */
inline std::string netdev_of_ip(std::string const &ip) {
  struct ifaddrs *all = nullptr;
  if (getifaddrs(&all) != 0) return "";
  std::string found;
  for (struct ifaddrs *ifa = all; ifa != nullptr && found.empty(); ifa = ifa->ifa_next) {
    if (ifa->ifa_addr == nullptr || ifa->ifa_name == nullptr) continue;
    char text[INET6_ADDRSTRLEN] = {0};
    void const *addr = nullptr;
    if (ifa->ifa_addr->sa_family == AF_INET)
      addr = &reinterpret_cast<struct sockaddr_in const *>(ifa->ifa_addr)->sin_addr;
    else if (ifa->ifa_addr->sa_family == AF_INET6)
      addr = &reinterpret_cast<struct sockaddr_in6 const *>(ifa->ifa_addr)->sin6_addr;
    if (addr == nullptr) continue;
    if (inet_ntop(ifa->ifa_addr->sa_family, addr, text, sizeof text) != nullptr && ip == text)
      found = ifa->ifa_name;
  }
  freeifaddrs(all);
  return found;
}

/* What an engine serves, from its metadata "ip:port?gpu": its GPU when `gpu` is a PCI bus id,
 * else the NIC that holds `ip`, else the host as a whole. `numa` is what sysfs reports (-1: no
 * locality known). */
struct Device {
  std::string name; /* "gpu 0000:4a:00.0", "nic eth0" or "host" */
  int numa;
};

inline Device describe(std::string const &metadata, std::string const &root = "/sys") {
  std::string::size_type q = metadata.find('?');
  std::string gpu = q == std::string::npos ? std::string() : metadata.substr(q + 1);
  if (gpu.find(':') != std::string::npos) return Device{"gpu " + gpu, pci_numa_node(gpu, root)};
  std::string ip = metadata.substr(0, q);
  std::string::size_type colon = ip.rfind(':');
  if (colon != std::string::npos) ip.resize(colon);
  if (ip.size() >= 2 && ip.front() == '[' && ip.back() == ']') ip = ip.substr(1, ip.size() - 2);
  std::string ifname = netdev_of_ip(ip);
  if (!ifname.empty()) return Device{"nic " + ifname, netdev_numa_node(ifname, root)};
  return Device{"host", -1};
}

}  // namespace sysfs
}  // namespace uccl_tcpx

namespace uccl {

using FifoItem = ::FifoItem;
using FlowID = uint64_t;
using PeerID = uint64_t;

/* UCCL's transport declares its FifoItem wire helpers in namespace uccl; these are the same
 * functions as the global ones of common.h. */
using ::deserialize_fifo_item;
using ::serialize_fifo_item;

/* What RDMAFactory::get_factory_dev returns: a device an endpoint serves. Of UCCL's fields only
 * numa_node exists. */
struct FactoryDevice {
  int dev;               /* its index, as get_best_dev_idx returns it */
  int numa_node;         /* sysfs's node, or 0 where sysfs reports none (every system has node 0) */
  int sysfs_numa_node;   /* what sysfs reports: -1 when it reports no locality */
  std::string name;      /* "gpu <bus id>", "nic <interface>" or "host" */
};

/* The process's devices: one entry per distinct device that some endpoint serves (two endpoints
 * on one GPU share an index). Entries are never removed, so pointers stay valid. */
class RDMAFactory {
 public:
  /* The device with index `dev`. An index no endpoint returned is a caller bug that UCCL's engine
   * would dereference: it throws std::out_of_range (aborts when built without exceptions). */
  static FactoryDevice *get_factory_dev(int dev) {
    std::lock_guard<std::mutex> lock(mu());
    if (dev < 0 || static_cast<std::size_t>(dev) >= devices().size()) {
      std::string msg = "uccl::RDMAFactory::get_factory_dev: no device " + std::to_string(dev) +
                        " (" + std::to_string(devices().size()) + " known)";
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
      throw std::out_of_range(msg);
#else
      std::fprintf(stderr, "%s\n", msg.c_str());
      std::abort();
#endif
    }
    return &devices()[static_cast<std::size_t>(dev)];
  }

  /* The index of device `d`, added on first sight. */
  static int add(uccl_tcpx::sysfs::Device const &d) {
    std::lock_guard<std::mutex> lock(mu());
    for (FactoryDevice const &known : devices())
      if (known.name == d.name) return known.dev;
    int index = static_cast<int>(devices().size());
    devices().push_back(FactoryDevice{index, d.numa < 0 ? 0 : d.numa, d.numa, d.name});
    return index;
  }

 private:
  static std::mutex &mu() {
    static std::mutex m;
    return m;
  }
  static std::deque<FactoryDevice> &devices() {
    static std::deque<FactoryDevice> d;
    return d;
  }
};

/* What a TcpxEndpoint does with a hard error (see the top of this file). */
enum class ErrorPolicy { kReport, kAbort };

/* Opaque. A UcclFlow* is a connection handle (uccl_conn_t*); nothing dereferences it here. */
struct UcclFlow;
/* Opaque; present because ucclRequest names it. Never set by this adapter. */
struct PollCtx;

struct ConnID {
  void *context;   /* the uccl_conn_t* of the connection; nullptr when connect/accept failed */
  int sock_fd;     /* always -1: no descriptor is exposed */
  FlowID flow_id;  /* unique per endpoint, from 1 */
  PeerID peer_id;  /* same value as flow_id */
  int dev;         /* 0; -1 when connect/accept failed */
};

/* What Mhandle::mr points to: a registration of this library. */
struct TcpxMr {
  void *addr;
  size_t length;
  uccl_mr_t mr_id;
  uccl_engine_t *engine;
};

struct Mhandle {
  TcpxMr *mr; /* non-null for a successful registration */
};

/* The request kinds this adapter records in ucclRequest::type. */
enum ReqType : int { ReqTx = 0, ReqRx = 1, ReqFlush = 2, ReqRead = 3, ReqWrite = 4 };

static constexpr int kMaxRecv = 1;

struct ucclRecvInfo {
  int data_len[kMaxRecv];  /* bytes received, set on completion */
  uint64_t data[kMaxRecv]; /* destination address */
  FifoItem *elems;         /* unused: nullptr */
};

struct ucclSendInfo {
  int data_len; /* bytes sent / read / written, set on completion (size at post time) */
  int inc_backlog;
  uint64_t laddr; /* local buffer */
  uint64_t raddr; /* remote address (read/write), else 0 */
  uint32_t lkey, rkey, rid, sent_offset, acked_bytes; /* unused: 0 */
};

/* Caller-owned, plain data (it may be memset, copied, or left uninitialised before a post: every
 * post initialises the fields it uses). The fields after rtt_tsc belong to this adapter. */
struct ucclRequest {
  ReqType type;
  union {
    int n;
    int mid;
  };
  union {
    PollCtx *poll_ctx;
    uint64_t rc_or_flush_done;
  };
  void *context;  /* the connection (uccl_conn_t*) the request was posted on */
  void *req_pool; /* the TcpxEndpoint that posted it */
  uint32_t engine_idx;
  union {
    ucclRecvInfo recv;
    ucclSendInfo send;
  };
  uint64_t rtt_tsc;

  uint64_t tcpx_xfer_id; /* the library's transfer id */
  int tcpx_status;       /* 0 or a negative uccl_status_t once complete */
  uint32_t tcpx_state;   /* one of TcpxEndpoint's request states */
};

class TcpxEndpoint {
 public:
  /* `num_engines_per_dev` is passed to uccl_engine_create as num_cpus (it must not be negative).
   * Throws std::runtime_error (aborts when built without exceptions) if the engine cannot be
   * created, or if UCCL_TCPX_ADAPTER_ERRORS is set to anything but "report" or "abort": UCCL's
   * constructor has no way to report failure either. */
  explicit TcpxEndpoint(int num_engines_per_dev, ErrorPolicy policy = ErrorPolicy::kReport)
      : policy_(policy_from_env(policy)) {
    engine_ = uccl_engine_create(num_engines_per_dev, false);
    if (engine_ == nullptr) fatal("uccl_engine_create failed");
    char *md = nullptr;
    if (uccl_engine_get_metadata(engine_, &md) != UCCL_STATUS_OK || md == nullptr) {
      uccl_engine_destroy(engine_);
      fatal("uccl_engine_get_metadata failed");
    }
    metadata_ = md;
    uccl_engine_free_string(md);
    if (!parse_port(metadata_, &port_)) {
      uccl_engine_destroy(engine_);
      fatal("unparsable engine metadata");
    }
    dev_ = RDMAFactory::add(uccl_tcpx::sysfs::describe(metadata_));
  }

  /* Closes the connections this endpoint opened or accepted, then the engine (which releases its
   * registrations; Mhandles stay owned by the caller, uccl_deregmr still frees them). */
  ~TcpxEndpoint() {
    std::vector<uccl_conn_t *> conns;
    {
      std::lock_guard<std::mutex> lock(mu_);
      conns.swap(conns_);
    }
    for (uccl_conn_t *c : conns) uccl_engine_conn_destroy(c);
    uccl_engine_destroy(engine_);
  }

  TcpxEndpoint(TcpxEndpoint const &) = delete;
  TcpxEndpoint &operator=(TcpxEndpoint const &) = delete;

  /* ---- UCCL's RDMAEndpoint methods ---------------------------------------------------------- */

  /* The engine serves one device for every GPU: the index of that device in RDMAFactory (0 for
   * the first device of the process). */
  int get_best_dev_idx(int gpu_idx) {
    (void)gpu_idx;
    return dev_;
  }

  /* The engine listens from construction on, so this only checks `dev`: true for dev >= 0. */
  bool initialize_engine_by_dev(int dev, bool enable_p2p_listen) {
    (void)enable_p2p_listen;
    return dev >= 0;
  }

  /* The engine's control listener port (the port of its metadata). */
  uint16_t get_p2p_listen_port(int dev) {
    (void)dev;
    return port_;
  }

  /* The listener is internal to the library, so there is no descriptor to give out: this returns
   * an opaque non-negative token (the listen port), which uccl_accept accepts and ignores. Do not
   * pass it to system calls. */
  int get_p2p_listen_fd(int dev) {
    (void)dev;
    return static_cast<int>(port_);
  }

  /* Connects to the endpoint listening at remote_ip:remote_port serving GPU `remote_gpuidx`,
   * announcing `local_gpuidx` as this side's GPU (the peer's uccl_accept reports it; -1 announces
   * the engine's own). Blocks for the handshake (bounded by UCCL_TCPX_CONNECT_TIMEOUT_MS). On
   * failure, context is nullptr and uccl_engine_last_error() tells why. */
  ConnID uccl_connect(int dev, int local_gpuidx, int remote_dev, int remote_gpuidx,
                      std::string remote_ip, uint16_t remote_port) {
    (void)dev;
    (void)remote_dev;
    std::string gpu = std::to_string(remote_gpuidx);
    uccl_conn_t *conn = uccl_engine_connect_from_gpu(engine_, remote_ip.c_str(), gpu.c_str(),
                                                     remote_port, local_gpuidx);
    return track(conn);
  }

  /* Blocks until a peer connects (or stop_accept()). Fills the peer's IP, its device (0) and GPU
   * index. `listen_fd` is ignored. On failure, context is nullptr. */
  ConnID uccl_accept(int dev, int listen_fd, int local_gpuidx, std::string &remote_ip,
                     int *remote_dev, int *remote_gpuidx) {
    (void)dev;
    (void)listen_fd;
    (void)local_gpuidx;
    char ip[64] = {0};
    int gpu = 0;
    uccl_conn_t *conn = uccl_engine_accept(engine_, ip, sizeof ip, &gpu);
    if (conn != nullptr) {
      remote_ip = ip;
      if (remote_dev != nullptr) *remote_dev = 0;
      if (remote_gpuidx != nullptr) *remote_gpuidx = gpu;
    }
    return track(conn);
  }

  /* The same without the remote device, as some engine versions call it. */
  ConnID uccl_accept(int dev, int listen_fd, int local_gpuidx, std::string &remote_ip,
                     int *remote_gpuidx) {
    return uccl_accept(dev, listen_fd, local_gpuidx, remote_ip, nullptr, remote_gpuidx);
  }

  /* Registers [data, data + len). 0 and a handle with a non-null `mr` on success. On failure -1,
   * and `*mhandle` is a shared handle whose `mr` is nullptr (the check UCCL's engine makes);
   * uccl_deregmr accepts it. `dev` and `type` are ignored. */
  int uccl_regmr(int dev, void *data, size_t len, int type, struct Mhandle **mhandle) {
    (void)dev;
    (void)type;
    if (mhandle == nullptr) return -1;
    *mhandle = failed_mhandle();
    uccl_mr_t id = 0;
    if (uccl_engine_reg(engine_, reinterpret_cast<uintptr_t>(data), len, &id) != UCCL_STATUS_OK)
      return -1;
    TcpxMr *mr = new (std::nothrow) TcpxMr{data, len, id, engine_};
    Mhandle *mh = mr != nullptr ? new (std::nothrow) Mhandle{mr} : nullptr;
    if (mh == nullptr) {
      delete mr;
      uccl_engine_mr_destroy(engine_, id);
      return -1;
    }
    *mhandle = mh;
    return 0;
  }

  /* Deregisters and frees the handle; nullptr and the failure handle are no-ops. */
  void uccl_deregmr(struct Mhandle *mhandle) {
    if (mhandle == nullptr || mhandle == failed_mhandle()) return;
    if (mhandle->mr != nullptr) {
      uccl_engine_mr_destroy(mhandle->mr->engine, mhandle->mr->mr_id);
      delete mhandle->mr;
    }
    delete mhandle;
  }

  /* Sends one message of `size` bytes, matched in order by one receive on the peer. */
  int uccl_send_async(UcclFlow *flow, struct Mhandle *mhandle, void const *data,
                      size_t const size, struct ucclRequest *ureq) {
    return post(ureq, ReqTx, flow, mhandle, data, 0, [&](uccl_conn_t *c, uccl_mr_t mr, uint64_t *id) {
      ureq->send.data_len = static_cast<int>(size);
      return uccl_engine_send_async(c, mr, data, size, id);
    });
  }

  /* Posts a receive of at most size[0] bytes into data[0]. Only n == 1 is supported (hard error
   * UCCL_STATUS_ERR_NOT_SUPPORTED otherwise). */
  int uccl_recv_async(UcclFlow *flow, struct Mhandle **mhandles, void **data, int *size, int n,
                      struct ucclRequest *ureq) {
    if (ureq == nullptr) return UCCL_STATUS_ERR_INVALID_PARAM;
    if (n != 1)
      return fail(ureq, ReqRx, flow, UCCL_STATUS_ERR_NOT_SUPPORTED,
                  "only one buffer per receive (n == 1) is supported");
    if (mhandles == nullptr || data == nullptr || size == nullptr || size[0] < 0)
      return fail(ureq, ReqRx, flow, UCCL_STATUS_ERR_INVALID_PARAM,
                  "NULL handle, buffer or size array, or a negative size");
    void *buf = data[0];
    size_t max_size = static_cast<size_t>(size[0]);
    return post(ureq, ReqRx, flow, mhandles[0], buf, 0, [&](uccl_conn_t *c, uccl_mr_t mr, uint64_t *id) {
      ureq->n = 1;
      ureq->recv.data_len[0] = 0;
      ureq->recv.data[0] = reinterpret_cast<uint64_t>(buf);
      ureq->recv.elems = nullptr;
      return uccl_engine_recv_async(c, mr, buf, max_size, id);
    });
  }

  /* One-sided read of the remote range `slot_item` describes into local [dst, dst + size). */
  int uccl_read_async(UcclFlow *flow, Mhandle *local_mh, void *dst, size_t size,
                      FifoItem const &slot_item, ucclRequest *ureq) {
    return post(ureq, ReqRead, flow, local_mh, dst, slot_item.addr,
                [&](uccl_conn_t *c, uccl_mr_t mr, uint64_t *id) {
                  ureq->send.data_len = static_cast<int>(size);
                  return uccl_engine_read(c, mr, dst, size, slot_item, id);
                });
  }

  /* One-sided write of local [src, src + size) to the remote range `slot_item` describes. */
  int uccl_write_async(UcclFlow *flow, Mhandle *local_mh, void *src, size_t size,
                       FifoItem const &slot_item, ucclRequest *ureq) {
    return post(ureq, ReqWrite, flow, local_mh, src, slot_item.addr,
                [&](uccl_conn_t *c, uccl_mr_t mr, uint64_t *id) {
                  ureq->send.data_len = static_cast<int>(size);
                  return uccl_engine_write(c, mr, src, size, slot_item, id);
                });
  }

  /* Non-blocking: true once the request's transfer finished (see request_status()), false while
   * it runs. A null or never-posted request reports true (nothing is in flight). */
  bool uccl_poll_ureq_once(struct ucclRequest *ureq) {
    if (ureq == nullptr) return true;
    if (ureq->tcpx_state == kStateDone) return true;
    if (ureq->tcpx_state != kStatePosted) {
      ureq->tcpx_state = kStateDone;
      ureq->tcpx_status = UCCL_STATUS_ERR_NOT_FOUND;
      return true;
    }
    size_t bytes = 0;
    int rc = uccl_engine_poll(static_cast<uccl_conn_t *>(ureq->context), ureq->tcpx_xfer_id, &bytes);
    if (rc == UCCL_STATUS_IN_PROGRESS) return false;
    ureq->tcpx_state = kStateDone;
    ureq->tcpx_status = rc;
    if (rc != UCCL_STATUS_OK && ureq->req_pool != nullptr)
      static_cast<TcpxEndpoint *>(ureq->req_pool)->hard_error(ureq, "transfer", rc);
    if (rc == UCCL_STATUS_OK) {
      if (ureq->type == ReqRx)
        ureq->recv.data_len[0] = static_cast<int>(bytes);
      else
        ureq->send.data_len = static_cast<int>(bytes);
    }
    if (ureq->req_pool != nullptr) static_cast<TcpxEndpoint *>(ureq->req_pool)->release_slot();
    return true;
  }

  /* Writes the 64-byte capability for [data, data + size) of the region mhandles[0] registered,
   * to be handed to the peer. 0, or -1 on failure (as UCCL; last_error tells why). The capability
   * is valid on every connection of this endpoint, so `flow` may be nullptr. */
  int prepare_fifo_metadata(UcclFlow *flow, struct Mhandle **mhandles, void const *data,
                            size_t size, char *out_buf) {
    (void)flow;
    if (mhandles == nullptr || mhandles[0] == nullptr || mhandles[0]->mr == nullptr) return -1;
    TcpxMr const *mr = mhandles[0]->mr;
    return uccl_engine_prepare_fifo(mr->engine, mr->mr_id, data, size, out_buf) == UCCL_STATUS_OK
               ? 0
               : -1;
  }

  /* ---- additions ---------------------------------------------------------------------------- */

  /* The underlying engine, for the C functions (notifications, metadata, ...). */
  uccl_engine_t *engine() const { return engine_; }

  /* The engine's metadata, "ip:port?gpu". */
  std::string const &metadata() const { return metadata_; }

  /* Makes a blocked uccl_accept (and every later one) return a failed ConnID promptly. */
  void stop_accept() { uccl_engine_stop_accept(engine_); }

  /* Limits the requests of this endpoint in flight at once (posted, not yet seen complete by
   * uccl_poll_ureq_once); a post beyond it returns -1. 0 (the default) means no limit. */
  void set_max_outstanding(int limit) { max_outstanding_.store(limit < 0 ? 0 : limit); }

  /* Requests of this endpoint posted and not yet seen complete. */
  int outstanding() const { return outstanding_.load(); }

  /* What a hard error does from now on (UCCL_TCPX_ADAPTER_ERRORS set the starting value). */
  void set_error_policy(ErrorPolicy policy) { policy_.store(policy); }
  ErrorPolicy error_policy() const { return policy_.load(); }

  /* 1 while in flight, else 0 or the negative status the request finished with. */
  static int request_status(ucclRequest const *ureq) {
    if (ureq == nullptr) return UCCL_STATUS_ERR_INVALID_PARAM;
    if (ureq->tcpx_state == kStatePosted) return UCCL_STATUS_IN_PROGRESS;
    if (ureq->tcpx_state == kStateDone) return ureq->tcpx_status;
    return UCCL_STATUS_ERR_NOT_FOUND;
  }

  /* The connection behind a flow pointer (ConnID::context). */
  static uccl_conn_t *conn_of(UcclFlow *flow) { return reinterpret_cast<uccl_conn_t *>(flow); }

 private:
  /* Arbitrary constants, so that a zeroed or uninitialised request is recognised as not posted. */
  static constexpr uint32_t kStatePosted = 0x7c9a0001u;
  static constexpr uint32_t kStateDone = 0x7c9a0002u;

  /* UCCL_TCPX_ADAPTER_ERRORS, when set, else `fallback`. */
  static ErrorPolicy policy_from_env(ErrorPolicy fallback) {
    char const *v = std::getenv("UCCL_TCPX_ADAPTER_ERRORS");
    if (v == nullptr || *v == '\0') return fallback;
    if (std::strcmp(v, "report") == 0) return ErrorPolicy::kReport;
    if (std::strcmp(v, "abort") == 0) return ErrorPolicy::kAbort;
    fatal_msg(std::string("UCCL_TCPX_ADAPTER_ERRORS=\"") + v +
              "\" is not one of \"report\", \"abort\"");
  }

  static char const *type_name(ReqType type) {
    switch (type) {
      case ReqTx: return "send";
      case ReqRx: return "receive";
      case ReqRead: return "read";
      case ReqWrite: return "write";
      default: return "request";
    }
  }

  /* Under ErrorPolicy::kAbort: says which request failed and how (`why`, else the library's last
   * error), then aborts. */
  void hard_error(ucclRequest const *ureq, char const *stage, int status,
                  char const *why = nullptr) {
    if (policy_.load() != ErrorPolicy::kAbort) return;
    char err[512] = {0};
    if (why != nullptr)
      std::snprintf(err, sizeof err, "%s", why);
    else
      uccl_engine_last_error(err, sizeof err);
    std::fprintf(stderr,
                 "uccl::RDMAEndpoint: %s %s on connection %p failed with status %d (%s): %s\n"
                 "uccl::RDMAEndpoint: aborting, as UCCL's RDMA transport does on a failed work "
                 "completion (UCCL_TCPX_ADAPTER_ERRORS=report leaves it to request_status())\n",
                 type_name(ureq->type), stage, ureq->context, status,
                 uccl_engine_status_str(status), err);
    std::fflush(stderr);
    std::abort();
  }

  [[noreturn]] static void fatal_msg(std::string const &msg) {
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    throw std::runtime_error("uccl::TcpxEndpoint: " + msg);
#else
    std::fprintf(stderr, "uccl::TcpxEndpoint: %s\n", msg.c_str());
    std::abort();
#endif
  }

  [[noreturn]] static void fatal(char const *what) {
    char err[512] = {0};
    uccl_engine_last_error(err, sizeof err);
    std::string msg = std::string("uccl::TcpxEndpoint: ") + what + ": " + err;
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    throw std::runtime_error(msg);
#else
    std::fprintf(stderr, "%s\n", msg.c_str());
    std::abort();
#endif
  }

  /* "ip:port?gpu"; the port follows the last ':' before '?'. */
  static bool parse_port(std::string const &md, uint16_t *port) {
    std::string::size_type q = md.find('?');
    if (q == std::string::npos) return false;
    std::string::size_type colon = md.rfind(':', q);
    if (colon == std::string::npos || colon + 1 >= q) return false;
    unsigned long value = 0;
    for (std::string::size_type i = colon + 1; i < q; i++) {
      if (md[i] < '0' || md[i] > '9') return false;
      value = value * 10 + static_cast<unsigned long>(md[i] - '0');
      if (value > 65535) return false;
    }
    if (value == 0) return false;
    *port = static_cast<uint16_t>(value);
    return true;
  }

  static Mhandle *failed_mhandle() {
    static Mhandle failed{nullptr};
    return &failed;
  }

  ConnID track(uccl_conn_t *conn) {
    if (conn == nullptr) return ConnID{nullptr, -1, 0, 0, -1};
    {
      std::lock_guard<std::mutex> lock(mu_);
      conns_.push_back(conn);
    }
    uint64_t id = next_flow_id_.fetch_add(1) + 1;
    return ConnID{static_cast<void *>(conn), -1, id, id, 0};
  }

  bool reserve_slot() {
    int limit = max_outstanding_.load();
    int now = outstanding_.fetch_add(1) + 1;
    if (limit > 0 && now > limit) {
      outstanding_.fetch_sub(1);
      return false;
    }
    return true;
  }

  void release_slot() { outstanding_.fetch_sub(1); }

  void init(ucclRequest *ureq, ReqType type, UcclFlow *flow, void const *local,
            uint64_t remote) {
    std::memset(static_cast<void *>(ureq), 0, sizeof *ureq);
    ureq->type = type;
    ureq->context = static_cast<void *>(conn_of(flow));
    ureq->req_pool = this;
    if (type == ReqRx) {
      ureq->recv.data[0] = reinterpret_cast<uint64_t>(local);
    } else {
      ureq->send.laddr = reinterpret_cast<uint64_t>(local);
      ureq->send.raddr = remote;
    }
  }

  /* Marks a request the adapter refused (`why`) as complete with `status`; returns `status`. */
  int fail(ucclRequest *ureq, ReqType type, UcclFlow *flow, int status, char const *why) {
    init(ureq, type, flow, nullptr, 0);
    ureq->req_pool = nullptr;
    ureq->tcpx_state = kStateDone;
    ureq->tcpx_status = status;
    hard_error(ureq, "post", status, why);
    return status;
  }

  template <class Start>
  int post(ucclRequest *ureq, ReqType type, UcclFlow *flow, Mhandle const *mh, void const *local,
           uint64_t remote, Start &&start) {
    if (ureq == nullptr) return UCCL_STATUS_ERR_INVALID_PARAM;
    if (mh == nullptr || mh->mr == nullptr)
      return fail(ureq, type, flow, UCCL_STATUS_ERR_INVALID_PARAM,
                  "the memory handle is NULL or that of a failed registration");
    if (!reserve_slot()) return -1;
    init(ureq, type, flow, local, remote);
    uint64_t id = 0;
    int rc = start(conn_of(flow), mh->mr->mr_id, &id);
    if (rc == UCCL_STATUS_OK) {
      ureq->tcpx_xfer_id = id;
      ureq->tcpx_state = kStatePosted;
      return 0;
    }
    release_slot();
    if (rc == UCCL_STATUS_ERR_NOT_POSTED) {
      ureq->tcpx_state = 0;
      return -1;
    }
    ureq->req_pool = nullptr;
    ureq->tcpx_state = kStateDone;
    ureq->tcpx_status = rc;
    hard_error(ureq, "post", rc);
    return rc;
  }

  std::atomic<ErrorPolicy> policy_;
  uccl_engine_t *engine_ = nullptr;
  std::string metadata_;
  uint16_t port_ = 0;
  int dev_ = 0;
  std::mutex mu_;
  std::vector<uccl_conn_t *> conns_;
  std::atomic<uint64_t> next_flow_id_{0};
  std::atomic<int> max_outstanding_{0};
  std::atomic<int> outstanding_{0};
};

#ifndef UCCL_TCPX_NO_RDMA_ENDPOINT_ALIAS
using RDMAEndpoint = TcpxEndpoint;
#endif

}  // namespace uccl

#endif /* UCCL_TCPX_RDMA_ENDPOINT_HPP */
