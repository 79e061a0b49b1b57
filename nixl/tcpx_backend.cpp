// The NIXL backend "TCPX": a NIXL agent's transfers and notifications over a uccl-tcpx engine.
//
// One engine per backend instance (per agent), so that agents sharing a process keep their
// notifications apart (uccl_tcpx_engine_get_notifs_v). Connections are keyed by agent name and
// made on first use; prepXfer turns a transfer's descriptors into the engine's runs of pieces (one
// run per local registration and target window, every piece cut at the target's 2 GiB advertising
// windows) and postXfer hands those to uccl_tcpx_{write,read}_pieces as they are; engine statuses
// pass through as NIXL statuses (they share the numbering), so a dead peer reads
// NIXL_ERR_REMOTE_DISCONNECT. No exception leaves a function NIXL calls.

#define UCCL_TCPX_C_ONLY
#include "uccl_engine.h"

#include "nixl_abi.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifndef UCCL_TCPX_PLUGIN_VERSION
#define UCCL_TCPX_PLUGIN_VERSION "0.0.0"
#endif

namespace {

// Prefix of our connection info; a later format gets another.
constexpr const char *kConnInfoPrefix = "tcpx1;";
// Prefix of a registration's public data.
constexpr const char *kPublicPrefix = "tcpx1:";
// Every registration is advertised in windows of this size (loadRemoteMD refuses another); a power
// of two, so finding a byte's window is a shift.
constexpr uint64_t kWindow = UCCL_TCPX_ADVERTISE_WINDOW;
static_assert((kWindow & (kWindow - 1)) == 0, "the advertising window is a power of two");
// The wire's name field holds at most this many bytes.
constexpr size_t kMaxNameLen = 255;
// Backend options (create_backend("TCPX", {...})) and the engine setting each one sets.
const std::map<std::string, std::string> kOptions = {
    {"num_channels", "UCCL_TCPX_NUM_CHANNELS"},
    {"auth_key_file", "UCCL_TCPX_AUTH_KEY_FILE"},
    {"gpu", "UCCL_TCPX_GPU"},
    {"ip", "UCCL_TCPX_IP"},
    {"port", "UCCL_TCPX_PORT"},
    {"timeout_ms", "UCCL_TCPX_TIMEOUT_MS"},
    {"connect_timeout_ms", "UCCL_TCPX_CONNECT_TIMEOUT_MS"},
};
// The backend's own option: 1 (default) connects to an agent as its info is loaded, on a thread of
// the backend's; 0 at its first request or `connect()`.
constexpr const char *kConnectOnLoad = "connect_on_load";

void log_error(const std::string &what) {
    std::fprintf(stderr, "[NIXL TCPX] error: %s\n", what.c_str());
}

std::string engine_error() {
    char buf[512];
    size_t n = uccl_engine_last_error(buf, sizeof(buf));
    return n ? std::string(buf) : std::string("no detail");
}

// An engine status as a NIXL status: the numbers are shared; anything NIXL does not know becomes
// a backend error.
nixl_status_t to_nixl(int rc) {
    if (rc == 0) return NIXL_SUCCESS;
    if (rc == 1) return NIXL_IN_PROG;
    // The engine's timeout fails the connection to a peer that stopped answering: for NIXL that
    // peer is gone, and this status makes NIXL drop it.
    if (rc == UCCL_STATUS_ERR_TIMEOUT) return NIXL_ERR_REMOTE_DISCONNECT;
    if (rc < 0 && rc >= NIXL_ERR_CANCELED) return static_cast<nixl_status_t>(rc);
    return NIXL_ERR_BACKEND;
}

nixl_status_t fail(nixl_status_t status, const std::string &what) {
    log_error(what + " (" + uccl_engine_status_str(status) + ")");
    return status;
}

std::string to_hex(const void *data, size_t len) {
    static const char digits[] = "0123456789abcdef";
    const auto *p = static_cast<const unsigned char *>(data);
    std::string out;
    out.reserve(2 * len);
    for (size_t i = 0; i < len; ++i) {
        out.push_back(digits[p[i] >> 4]);
        out.push_back(digits[p[i] & 15]);
    }
    return out;
}

bool from_hex(const std::string &text, size_t at, void *out, size_t len) {
    if (text.size() < at || text.size() - at < 2 * len) return false;
    auto *p = static_cast<unsigned char *>(out);
    for (size_t i = 0; i < len; ++i) {
        int v = 0;
        for (int k = 0; k < 2; ++k) {
            char c = text[at + 2 * i + k];
            int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
            if (d < 0) return false;
            v = v * 16 + d;
        }
        p[i] = static_cast<unsigned char>(v);
    }
    return true;
}

// A registration: ours (with the engine's region id), or a peer's (or our own, as the agent's
// transfers to itself see it) as its public data describes it.
struct TcpxMD : nixlBackendMD {
    explicit TcpxMD(bool is_private) : nixlBackendMD(is_private) {}
    uint64_t base = 0;
    uint64_t len = 0;
    uint64_t window = 0;
    uccl_mr_t mr = 0;  // ours only
    FifoItem item{};  // the capability: its padding serves every window
};

struct PublicData {
    uint64_t base, len, window;
    char padding[32];
};

// One posted-or-prepared transfer: the engine's runs and pieces, built once by prepXfer and handed
// to the engine in place at every post.
struct TcpxReq : nixlBackendReqH {
    nixl_xfer_op_t op = NIXL_WRITE;
    std::string agent;
    uccl_conn_t *conn = nullptr;
    std::vector<uccl_tcpx_run_t> runs;
    std::vector<uccl_tcpx_piece_t> pieces;
    uint64_t bytes = 0;
    uint64_t id = 0;
    bool in_flight = false;
    bool has_notif = false;
    std::string notif;
    // Under UCCL_TCPX_NIXL_CALL_TIMES only: the calls NIXL made into this request and the time
    // they took (postXfer's includes the check it ends with).
    uint64_t posts = 0, post_ns = 0, checks = 0, check_ns = 0, done_at_post = 0;
    // Whether prepXfer filled lists a released request left (SpareLists) instead of new ones.
    bool reused_lists = false;
};

// The lists of released requests, emptied and kept for the next prepXfer. A request of 100,000
// descriptors fills 2.4 MB of pieces; allocated afresh at every make and freed at every release,
// that memory went back to the kernel and came back as page faults, about 2,000 a make of 102,400
// descriptors (what NIXL's UCX backend makes took none of). Bounded in count and in bytes, per
// engine: requests made at once past that allocate as before.
class SpareLists {
public:
    struct Lists {
        std::vector<uccl_tcpx_run_t> runs;
        std::vector<uccl_tcpx_piece_t> pieces;
    };

    // Moves the kept lists of the largest capacity, empty, into `out`; false when none are kept.
    bool take(Lists &out) {
        std::lock_guard<std::mutex> lock(mu_);
        if (kept_.empty()) return false;
        auto best = std::max_element(kept_.begin(), kept_.end(), [](const Lists &a, const Lists &b) {
            return a.pieces.capacity() < b.pieces.capacity();
        });
        out = std::move(*best);
        bytes_ -= size_of(out);
        *best = std::move(kept_.back());
        kept_.pop_back();
        return true;
    }

    // Keeps `lists` if there is room; otherwise they are freed with the caller's temporary, after
    // the lock. Never throws: it runs in releaseReqH, which NIXL calls expecting no exception.
    void give(Lists &&lists) noexcept {
        if (lists.pieces.capacity() == 0) return;
        lists.runs.clear();
        lists.pieces.clear();
        size_t size = size_of(lists);
        try {
            std::lock_guard<std::mutex> lock(mu_);
            if (kept_.size() >= kMaxKept || bytes_ + size > kMaxBytes) return;
            kept_.push_back(std::move(lists));
            bytes_ += size;
        } catch (...) {
        }
    }

private:
    static constexpr size_t kMaxKept = 8;
    static constexpr size_t kMaxBytes = 32u << 20;

    static size_t size_of(const Lists &l) {
        return l.runs.capacity() * sizeof(uccl_tcpx_run_t) + l.pieces.capacity() * sizeof(uccl_tcpx_piece_t);
    }

    std::mutex mu_;
    std::vector<Lists> kept_;
    size_t bytes_ = 0;
};

uint64_t now_ns() {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
            .count());
}

// Adds the time from its construction to its destruction to `*total` (nothing when `total` is
// NULL, which is how the calls go untimed).
class CallTimer {
public:
    explicit CallTimer(uint64_t *total) : total_(total), start_(total ? now_ns() : 0) {}
    ~CallTimer() {
        if (total_) *total_ += now_ns() - start_;
    }
    CallTimer(const CallTimer &) = delete;
    CallTimer &operator=(const CallTimer &) = delete;

private:
    uint64_t *total_;
    uint64_t start_;
};

// Connection info: "tcpx1;" + the engine's metadata "ip:port?gpu" or "[ip6]:port?gpu".
struct PeerAddr {
    std::string ip, gpu;
    int port = 0;
};

bool parse_conn_info(const std::string &info, PeerAddr &out) {
    if (info.rfind(kConnInfoPrefix, 0) != 0) return false;
    std::string meta = info.substr(std::strlen(kConnInfoPrefix));
    size_t q = meta.rfind('?');
    if (q == std::string::npos) return false;
    out.gpu = meta.substr(q + 1);
    std::string host_port = meta.substr(0, q);
    size_t colon = host_port.rfind(':');
    if (colon == std::string::npos || colon == 0) return false;
    std::string host = host_port.substr(0, colon), port = host_port.substr(colon + 1);
    if (host.front() == '[') {
        if (host.size() < 3 || host.back() != ']') return false;
        host = host.substr(1, host.size() - 2);
    }
    if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos) return false;
    int p = std::atoi(port.c_str());
    if (p <= 0 || p > 65535 || host.empty() || out.gpu.empty()) return false;
    if (host.find('\0') != std::string::npos || out.gpu.find('\0') != std::string::npos) return false;
    out.ip = host;
    out.port = p;
    return true;
}

class TcpxEngine : public nixlBackendEngine {
public:
    explicit TcpxEngine(const nixlBackendInitParams *init) : nixlBackendEngine(init) {
        if (localAgent.size() > kMaxNameLen) {
            log_error("agent name of " + std::to_string(localAgent.size()) +
                      " bytes: notifications carry at most 255");
            initErr = true;
            return;
        }
        std::vector<std::string> keys, values;
        for (const auto &[key, value] : params()) {
            if (key == kConnectOnLoad) {
                if (value == "0" || value == "1" || value.empty()) {
                    connect_on_load_ = value != "0";
                    continue;
                }
                log_error("backend option " + std::string(kConnectOnLoad) + " takes 0 or 1, not \"" + value + "\"");
                initErr = true;
                return;
            }
            auto known = kOptions.find(key);
            if (known != kOptions.end()) {
                keys.push_back(known->second);
            } else if (key.rfind("UCCL_TCPX_", 0) == 0) {
                keys.push_back(key);
            } else {
                continue;  // the agent adds options of its own
            }
            values.push_back(value);
        }
        std::vector<const char *> kp, vp;
        for (size_t i = 0; i < keys.size(); ++i) {
            kp.push_back(keys[i].c_str());
            vp.push_back(values[i].c_str());
        }
        engine_ = uccl_tcpx_engine_create_with(kp.data(), vp.data(), kp.size());
        if (!engine_) {
            log_error("cannot create the engine: " + engine_error());
            initErr = true;
            return;
        }
        char *meta = nullptr;
        if (uccl_engine_get_metadata(engine_, &meta) != 0 || !meta) {
            log_error("no engine metadata: " + engine_error());
            initErr = true;
            return;
        }
        conn_info_ = std::string(kConnInfoPrefix) + meta;
        uccl_engine_free_string(meta);
        // What share of a NIXL request's time is this backend's (scripts/nixl_plugin_bench.py
        // --breakdown): each request's calls and their time, one line per request at its release.
        if (const char *path = std::getenv("UCCL_TCPX_NIXL_CALL_TIMES"); path && *path) {
            call_times_ = std::fopen(path, "a");
            if (!call_times_) log_error(std::string("cannot open UCCL_TCPX_NIXL_CALL_TIMES file ") + path);
        }
        acceptor_ = std::thread([this] { accept_loop(); });
    }

    ~TcpxEngine() override {
        if (!engine_) return;
        {
            std::lock_guard<std::mutex> lock(mu_);
            stopping_ = true;
        }
        dial_cv_.notify_all();
        // Waits for a connect under way, at most the connect timeout for a peer that does not answer.
        if (dialer_.joinable()) dialer_.join();
        uccl_engine_stop_accept(engine_);
        if (acceptor_.joinable()) acceptor_.join();
        std::lock_guard<std::mutex> lock(mu_);
        for (auto &[agent, conn] : conns_) uccl_engine_conn_destroy(conn);
        for (auto *conn : accepted_) uccl_engine_conn_destroy(conn);
        for (auto *conn : retired_) uccl_engine_conn_destroy(conn);
        for (auto *md : registered_) {
            uccl_engine_mr_destroy(engine_, md->mr);
            delete md;
        }
        uccl_engine_destroy(engine_);
        if (call_times_) std::fclose(call_times_);
    }

    bool supportsRemote() const override { return true; }
    bool supportsLocal() const override { return true; }
    bool supportsNotif() const override { return true; }
    nixl_mem_list_t getSupportedMems() const override { return {DRAM_SEG, VRAM_SEG}; }

    nixl_status_t getConnInfo(std::string &str) const override {
        try {
            str = conn_info_;
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t loadRemoteConnInfo(const std::string &agent, const std::string &info) override {
        try {
            PeerAddr addr;
            if (!parse_conn_info(info, addr))
                return fail(NIXL_ERR_INVALID_PARAM, "connection info of agent " + agent + " is not TCPX's");
            std::lock_guard<std::mutex> lock(mu_);
            auto it = infos_.find(agent);
            if (it != infos_.end() && it->second != info) {
                // NIXL refuses new info for an agent it still knows, so this is an agent it
                // dropped and met again (restarted, say): its old connection leads nowhere now.
                auto conn = conns_.find(agent);
                if (conn != conns_.end()) {
                    retired_.push_back(conn->second);
                    conns_.erase(conn);
                }
            }
            infos_[agent] = info;
            if (connect_on_load_ && agent != localAgent && !conns_.count(agent)) queue_dial(agent);
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t connect(const std::string &agent) override {
        try {
            uccl_conn_t *conn = nullptr;
            return conn_for(agent, conn);
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t disconnect(const std::string &agent) override {
        try {
            uccl_conn_t *conn = nullptr;
            {
                std::lock_guard<std::mutex> lock(mu_);
                auto it = conns_.find(agent);
                if (it != conns_.end()) {
                    conn = it->second;
                    conns_.erase(it);
                }
                if (agent != localAgent) infos_.erase(agent);
            }
            // Requests still holding the handle find it gone: the engine checks every handle.
            if (conn) uccl_engine_conn_destroy(conn);
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t registerMem(const nixlBlobDesc &mem, const nixl_mem_t &kind, nixlBackendMD *&out) override {
        try {
            if (kind != DRAM_SEG && kind != VRAM_SEG)
                return fail(NIXL_ERR_NOT_SUPPORTED, "TCPX moves DRAM and VRAM only");
            if (mem.len == 0 || mem.addr == 0) return fail(NIXL_ERR_INVALID_PARAM, "empty registration");
            auto md = std::make_unique<TcpxMD>(true);
            md->base = mem.addr;
            md->len = mem.len;
            int rc = uccl_engine_reg(engine_, mem.addr, mem.len, &md->mr);
            if (rc != 0) return fail(to_nixl(rc), "registration failed: " + engine_error());
            rc = uccl_tcpx_advertise_region(engine_, md->mr, mem.addr, mem.len, &md->item, &md->window);
            if (rc != 0) {
                auto status = fail(to_nixl(rc), "advertising the registration failed: " + engine_error());
                uccl_engine_mr_destroy(engine_, md->mr);
                return status;
            }
            std::lock_guard<std::mutex> lock(mu_);
            registered_.insert(md.get());
            out = md.release();
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t deregisterMem(nixlBackendMD *meta) override {
        try {
            auto *md = static_cast<TcpxMD *>(meta);
            {
                std::lock_guard<std::mutex> lock(mu_);
                if (!md || registered_.erase(md) == 0)
                    return fail(NIXL_ERR_INVALID_PARAM, "not a registration of this backend");
            }
            // A fence: once it returns no engine thread touches the memory again.
            uccl_engine_mr_destroy(engine_, md->mr);
            delete md;
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t getPublicData(const nixlBackendMD *meta, std::string &str) const override {
        try {
            const auto *md = static_cast<const TcpxMD *>(meta);
            if (!md) return NIXL_ERR_INVALID_PARAM;
            PublicData pd{};
            pd.base = md->base;
            pd.len = md->len;
            pd.window = md->window;
            std::memcpy(pd.padding, md->item.padding, sizeof(pd.padding));
            str = std::string(kPublicPrefix) + to_hex(&pd, sizeof(pd));
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t loadRemoteMD(const nixlBlobDesc &input, const nixl_mem_t &kind, const std::string &agent,
                               nixlBackendMD *&output) override {
        try {
            if (kind != DRAM_SEG && kind != VRAM_SEG) return NIXL_ERR_NOT_SUPPORTED;
            PublicData pd{};
            const std::string &s = input.metaInfo;
            size_t prefix = std::strlen(kPublicPrefix);
            if (s.size() != prefix + 2 * sizeof(pd) || s.compare(0, prefix, kPublicPrefix) != 0 ||
                !from_hex(s, prefix, &pd, sizeof(pd)))
                return fail(NIXL_ERR_INVALID_PARAM, "registration data of agent " + agent + " is not TCPX's");
            // The peer's own checks decide access; these keep our item arithmetic sane.
            // The window must be the one this plugin advertises: a peer naming a tiny one would make
            // every descriptor of ours billions of items.
            if (pd.len == 0 || pd.window != UCCL_TCPX_ADVERTISE_WINDOW || pd.base + pd.len < pd.base)
                return fail(NIXL_ERR_INVALID_PARAM, "registration data of agent " + agent + " is malformed");
            auto md = std::make_unique<TcpxMD>(false);
            md->base = pd.base;
            md->len = pd.len;
            md->window = pd.window;
            md->item.addr = pd.base;
            md->item.size = static_cast<uint32_t>(std::min<uint64_t>(pd.len, pd.window));
            std::memcpy(md->item.padding, pd.padding, sizeof(pd.padding));
            if (kind == VRAM_SEG && agent != localAgent) {
                std::lock_guard<std::mutex> lock(mu_);
                if (connect_on_load_) queue_prepare(agent, md->item);
            }
            output = md.release();
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t loadLocalMD(nixlBackendMD *input, nixlBackendMD *&output) override {
        try {
            const auto *md = static_cast<const TcpxMD *>(input);
            if (!md) return NIXL_ERR_INVALID_PARAM;
            auto copy = std::make_unique<TcpxMD>(false);
            copy->base = md->base;
            copy->len = md->len;
            copy->window = md->window;
            copy->item = md->item;
            output = copy.release();
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t unloadMD(nixlBackendMD *input) override {
        delete static_cast<TcpxMD *>(input);
        return NIXL_SUCCESS;
    }

    nixl_status_t prepXfer(const nixl_xfer_op_t &op, const nixl_meta_dlist_t &local,
                           const nixl_meta_dlist_t &remote, const std::string &agent, nixlBackendReqH *&handle,
                           const nixl_opt_b_args_t *) const override {
        try {
            if (op != NIXL_READ && op != NIXL_WRITE) return fail(NIXL_ERR_INVALID_PARAM, "unknown operation");
            int n = local.descCount();
            if (n != remote.descCount())
                return fail(NIXL_ERR_INVALID_PARAM, "local and remote descriptor counts differ");
            if (n <= 0) return fail(NIXL_ERR_INVALID_PARAM, "no descriptors");
            uccl_conn_t *conn = nullptr;
            nixl_status_t status = conn_for(agent, conn);
            if (status != NIXL_SUCCESS) return status;
            auto req = std::make_unique<TcpxReq>();
            SpareLists::Lists lists;
            req->reused_lists = spare_.take(lists);
            req->runs = std::move(lists.runs);
            req->pieces = std::move(lists.pieces);
            req->op = op;
            req->agent = agent;
            req->conn = conn;
            req->pieces.reserve(n);
            // The run being filled: its local registration, the target's, and the target's window.
            const TcpxMD *run_l = nullptr, *run_r = nullptr;
            uint64_t run_window = 0;
            for (int i = 0; i < n; ++i) {
                const auto &l = local[i];
                const auto &r = remote[i];
                const auto *lmd = static_cast<const TcpxMD *>(l.metadataP);
                const auto *rmd = static_cast<const TcpxMD *>(r.metadataP);
                auto at = [i] { return "descriptor " + std::to_string(i); };
                if (!lmd || !rmd) return fail(NIXL_ERR_INVALID_PARAM, at() + " has no registration");
                if (l.len != r.len) return fail(NIXL_ERR_INVALID_PARAM, at() + ": local and remote lengths differ");
                if (l.len == 0) return fail(NIXL_ERR_INVALID_PARAM, at() + " is empty");
                if (l.addr < lmd->base || l.len > lmd->len || l.addr - lmd->base > lmd->len - l.len)
                    return fail(NIXL_ERR_INVALID_PARAM, at() + ": local range outside its registration");
                if (r.addr < rmd->base || r.len > rmd->len || r.addr - rmd->base > rmd->len - r.len)
                    return fail(NIXL_ERR_INVALID_PARAM, at() + ": remote range outside its registration");
                // Cut at every window boundary of the target: its checks are per window. Every
                // window is kWindow (loadRemoteMD refuses another), a power of two.
                uint64_t done = 0;
                while (done < l.len) {
                    uint64_t laddr = l.addr + done, raddr = r.addr + done;
                    uint64_t off = raddr - rmd->base;
                    uint64_t window = off / kWindow, into = off % kWindow;
                    uint64_t piece = std::min<uint64_t>(l.len - done, kWindow - into);
                    done += piece;
                    if (lmd != run_l || rmd != run_r || window != run_window || req->runs.empty()) {
                        // A new run: the target's capability narrowed to this window.
                        uccl_tcpx_run_t run{};
                        run.mr = lmd->mr;
                        run.remote = rmd->item;
                        run.remote.addr = rmd->base + window * kWindow;
                        run.remote.size = static_cast<uint32_t>(std::min<uint64_t>(rmd->len - window * kWindow, kWindow));
                        req->runs.push_back(run);
                        run_l = lmd;
                        run_r = rmd;
                        run_window = window;
                    } else {
                        // A piece that continues the last one on both sides, in the same run,
                        // extends it: NIXL hands most of a block table over unmerged, and every
                        // piece the engine sees costs it a segment.
                        auto &last = req->pieces.back();
                        if (last.local_addr + last.len == laddr && last.remote_addr + last.len == raddr) {
                            last.len += piece;
                            continue;
                        }
                    }
                    req->pieces.push_back({laddr, raddr, piece});
                    ++req->runs.back().num_pieces;
                }
                req->bytes += l.len;
            }
            handle = req.release();
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t postXfer(const nixl_xfer_op_t &, const nixl_meta_dlist_t &, const nixl_meta_dlist_t &,
                           const std::string &, nixlBackendReqH *&handle,
                           const nixl_opt_b_args_t *opt_args) const override {
        try {
            auto *req = static_cast<TcpxReq *>(handle);
            if (!req) return NIXL_ERR_INVALID_PARAM;
            CallTimer timer(call_times_ ? &req->post_ns : nullptr);
            req->posts += call_times_ != nullptr;
            if (req->in_flight) return NIXL_ERR_REPOST_ACTIVE;
            req->has_notif = opt_args && opt_args->hasNotif;
            req->notif = req->has_notif ? opt_args->notifMsg : std::string();
            // The lists prepXfer built go to the engine as they are: nothing per piece happens here.
            int rc = req->op == NIXL_WRITE
                         ? uccl_tcpx_write_pieces(req->conn, req->runs.data(), req->runs.size(), req->pieces.data(),
                                                  req->pieces.size(), &req->id)
                         : uccl_tcpx_read_pieces(req->conn, req->runs.data(), req->runs.size(), req->pieces.data(),
                                                 req->pieces.size(), &req->id);
            if (rc != 0) {
                auto status = failed(to_nixl(rc), "posting to agent " + req->agent + " failed: " + engine_error());
                forget_if_gone(status, req->agent, req->conn);
                return status;
            }
            req->in_flight = true;
            // Small transfers are often done already: reporting that now saves the caller a check.
            nixl_status_t status = check(req);
            req->done_at_post += call_times_ && status == NIXL_SUCCESS;
            return status;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t checkXfer(nixlBackendReqH *handle) const override {
        auto *req = static_cast<TcpxReq *>(handle);
        if (!req) return NIXL_ERR_INVALID_PARAM;
        CallTimer timer(call_times_ ? &req->check_ns : nullptr);
        req->checks += call_times_ != nullptr;
        return check(req);
    }

    nixl_status_t releaseReqH(nixlBackendReqH *handle) const override {
        auto *req = static_cast<TcpxReq *>(handle);
        if (!req) return NIXL_SUCCESS;
        // The engine copied the vectors at post and keeps nothing of ours: give up the id and let
        // the transfer end on its own. The memory stays safe until deregisterMem, which fences it.
        if (req->in_flight) uccl_tcpx_forget(req->conn, req->id);
        if (call_times_) {
            std::fprintf(call_times_,
                         "op=%s bytes=%llu pieces=%zu posts=%llu post_ns=%llu done_at_post=%llu checks=%llu "
                         "check_ns=%llu reused=%d\n",
                         req->op == NIXL_WRITE ? "WRITE" : "READ", static_cast<unsigned long long>(req->bytes),
                         req->pieces.size(), static_cast<unsigned long long>(req->posts),
                         static_cast<unsigned long long>(req->post_ns),
                         static_cast<unsigned long long>(req->done_at_post),
                         static_cast<unsigned long long>(req->checks), static_cast<unsigned long long>(req->check_ns),
                         req->reused_lists ? 1 : 0);
            std::fflush(call_times_);
        }
        spare_.give({std::move(req->runs), std::move(req->pieces)});
        delete req;
        return NIXL_SUCCESS;
    }

    nixl_status_t getNotifs(notif_list_t &list) override {
        try {
            if (!list.empty()) return NIXL_ERR_INVALID_PARAM;
            constexpr size_t kBatch = 64;
            uccl_notif_v_t out[kBatch];
            for (;;) {
                size_t n = uccl_tcpx_engine_get_notifs_v(engine_, out, kBatch);
                for (size_t i = 0; i < n; ++i) {
                    try {
                        list.emplace_back(std::string(out[i].name, out[i].name_len),
                                          std::string(out[i].msg, out[i].msg_len));
                    } catch (...) {
                        for (size_t k = i; k < n; ++k) uccl_engine_free_notif_v(&out[k]);
                        throw;
                    }
                    uccl_engine_free_notif_v(&out[i]);
                }
                if (n < kBatch) break;
            }
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    nixl_status_t genNotif(const std::string &agent, const std::string &msg) const override {
        try {
            uccl_conn_t *conn = nullptr;
            nixl_status_t status = conn_for(agent, conn);
            if (status != NIXL_SUCCESS) return status;
            int rc = uccl_engine_send_notif_v(conn, localAgent.data(), localAgent.size(), msg.data(), msg.size());
            if (rc != 0) {
                auto status = failed(to_nixl(rc), "notification to agent " + agent + " failed: " + engine_error());
                forget_if_gone(status, agent, conn);
                return status;
            }
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

private:
    // checkXfer's work, which postXfer ends with too.
    nixl_status_t check(TcpxReq *req) const {
        try {
            if (!req->in_flight) return NIXL_ERR_NOT_POSTED;
            int rc = uccl_engine_poll(req->conn, req->id, nullptr);
            if (rc == 1) return NIXL_IN_PROG;
            req->in_flight = false;
            if (rc != 0) {
                auto status = failed(to_nixl(rc), "transfer to agent " + req->agent + " failed: " + engine_error());
                forget_if_gone(status, req->agent, req->conn);
                return status;
            }
            addTelemetry(req->op == NIXL_WRITE ? nixl_telemetry_event_type_t::AGENT_TX_BYTES
                                               : nixl_telemetry_event_type_t::AGENT_RX_BYTES,
                         req->bytes);
            if (req->has_notif) {
                rc = uccl_engine_send_notif_v(req->conn, localAgent.data(), localAgent.size(), req->notif.data(),
                                              req->notif.size());
                if (rc != 0) {
                    auto status =
                        failed(to_nixl(rc), "notification to agent " + req->agent + " failed: " + engine_error());
                    forget_if_gone(status, req->agent, req->conn);
                    return status;
                }
            }
            return NIXL_SUCCESS;
        } catch (...) {
            return NIXL_ERR_BACKEND;
        }
    }

    // The connection to `agent`, made on first use from its loaded connection info (our own for
    // the agent itself).
    nixl_status_t conn_for(const std::string &agent, uccl_conn_t *&out) const {
        std::string info;
        std::shared_ptr<std::mutex> gate;
        {
            std::lock_guard<std::mutex> lock(mu_);
            auto it = conns_.find(agent);
            if (it != conns_.end()) {
                out = it->second;
                return NIXL_SUCCESS;
            }
            if (agent == localAgent) {
                info = conn_info_;
            } else {
                auto known = infos_.find(agent);
                if (known == infos_.end()) return fail(NIXL_ERR_NOT_FOUND, "no connection info for agent " + agent);
                info = known->second;
            }
            auto &g = connecting_[agent];
            if (!g) g = std::make_shared<std::mutex>();
            gate = g;
        }
        // One connect per agent at a time, outside the backend's lock: a peer that does not answer
        // holds up requests to itself for the connect timeout, not those to every other agent.
        std::lock_guard<std::mutex> one(*gate);
        {
            std::lock_guard<std::mutex> lock(mu_);
            auto it = conns_.find(agent);
            if (it != conns_.end()) {  // made while this thread waited at the gate
                out = it->second;
                return NIXL_SUCCESS;
            }
        }
        PeerAddr addr;
        if (!parse_conn_info(info, addr)) return fail(NIXL_ERR_INVALID_PARAM, "bad connection info for " + agent);
        uccl_conn_t *conn =
            uccl_engine_connect(engine_, addr.ip.c_str(), addr.gpu.c_str(), addr.port, agent == localAgent);
        if (!conn) {
            return failed(NIXL_ERR_REMOTE_DISCONNECT, "cannot connect to agent " + agent + ": " + engine_error());
        }
        std::lock_guard<std::mutex> lock(mu_);
        conns_[agent] = conn;
        out = conn;
        return NIXL_SUCCESS;
    }

    // A connection that failed for good is dropped, so that the agent's next request (after NIXL
    // loads the peer again, say) connects anew instead of failing on it; not every NIXL version
    // calls disconnect() when it drops a peer.
    void forget_if_gone(nixl_status_t status, const std::string &agent, uccl_conn_t *conn) const {
        if (status != NIXL_ERR_REMOTE_DISCONNECT) return;
        std::lock_guard<std::mutex> lock(mu_);
        auto it = conns_.find(agent);
        if (it == conns_.end() || it->second != conn) return;
        conns_.erase(it);
        // Kept until the engine goes: other requests on it still learn how it failed.
        retired_.push_back(conn);
    }

    // Connects to the agents whose info was loaded, one at a time in the order loaded, so that
    // their first requests find the connection made (it costs tens of milliseconds with GPU
    // memory: pinned staging rings), then prepares the GPU memory loaded for them (a same-host
    // agent's allocation asked for and mapped: hundreds of microseconds to milliseconds per
    // region, which its first request would otherwise pay). A request that comes first connects
    // or maps itself, and a failure here leaves the step to the agent's first request.
    void dial_loop() {
        while (dial_next()) {
        }
    }

    // Starts the dialer thread on first use; mu_ is held. Without it (it could not start) agents
    // connect at their first request, as with connect_on_load=0.
    bool start_dialer() {
        if (dialer_.joinable()) return true;
        try {
            dialer_ = std::thread([this] { dial_loop(); });
            return true;
        } catch (const std::exception &e) {
            log_error(std::string("no thread to connect as agents are loaded (") + e.what() +
                      "): agents connect at their first request");
            connect_on_load_ = false;
            return false;
        }
    }

    // Queues `agent` for the dialer thread; mu_ is held.
    void queue_dial(const std::string &agent) {
        if (!start_dialer()) return;
        to_dial_.push_back(agent);
        dial_cv_.notify_one();
    }

    // Queues a remote GPU registration of `agent` to be prepared once it is connected; mu_ is held.
    void queue_prepare(const std::string &agent, const FifoItem &item) {
        if (!start_dialer()) return;
        to_prepare_.emplace_back(agent, item);
        dial_cv_.notify_one();
    }

    // One agent's connect, or else one registration's preparation: false once the backend stops.
    // An exception (out of memory) is logged and leaves the step to the agent's first request, so
    // that the thread never takes the process down.
    bool dial_next() {
        try {
            std::string agent;
            std::optional<FifoItem> item;
            uccl_conn_t *conn = nullptr;
            {
                std::unique_lock<std::mutex> lock(mu_);
                dial_cv_.wait(lock, [this] { return stopping_ || !to_dial_.empty() || !to_prepare_.empty(); });
                if (stopping_) return false;
                // Connects first: a registration is loaded after its agent's info.
                if (!to_dial_.empty()) {
                    agent = std::move(to_dial_.front());
                    to_dial_.pop_front();
                    if (conns_.count(agent) || !infos_.count(agent)) return true;  // connected, or dropped meanwhile
                } else {
                    agent = std::move(to_prepare_.front().first);
                    item = to_prepare_.front().second;
                    to_prepare_.pop_front();
                    auto it = conns_.find(agent);
                    if (it == conns_.end()) return true;  // not connected: its first request does both
                    conn = it->second;
                }
            }
            if (item) {
                // The engine checks the handle (a connection dropped meanwhile fails here), and a
                // refusal is the owner's, which the agent's first request meets and reports.
                uccl_tcpx_prepare(conn, &*item, nullptr);
                return true;
            }
            if (conn_for(agent, conn) != NIXL_SUCCESS) return true;
            std::lock_guard<std::mutex> lock(mu_);
            // Dropped while connecting: nobody will use it, and a request to the agent loaded again
            // connects anew.
            auto it = conns_.find(agent);
            if (!infos_.count(agent) && it != conns_.end() && it->second == conn) {
                conns_.erase(it);
                retired_.push_back(conn);
            }
        } catch (const std::exception &e) {
            log_error(std::string("connecting as an agent's info was loaded: ") + e.what());
        } catch (...) {
            log_error("connecting as an agent's info was loaded failed");
        }
        return true;
    }

    void accept_loop() {
        for (;;) {
            char ip[64];
            int gpu = 0;
            uccl_conn_t *conn = nullptr;
            int rc = uccl_tcpx_accept_timeout(engine_, 1000, ip, sizeof(ip), &gpu, &conn);
            if (rc == 1) continue;  // nobody within the second: wait again
            if (rc == UCCL_STATUS_ERR_CANCELED) return;  // stop_accept: the backend goes
            if (rc != 0 || !conn) {
                // One failed handshake (a peer gone midway, a handshake thread that failed) must
                // not end accepting for good: later peers would never be let in.
                log_error("accepting a peer: " + engine_error());
                std::this_thread::sleep_for(std::chrono::milliseconds(10));
                continue;
            }
            std::lock_guard<std::mutex> lock(mu_);
            accepted_.push_back(conn);
        }
    }

    nixl_status_t failed(nixl_status_t status, const std::string &what) const {
        addTelemetry(error_event(status), 1);
        return fail(status, what);
    }

    void addTelemetry(nixl_telemetry_event_type_t type, uint64_t value) const {
        // The base class's queue is not const; NIXL collects it between calls.
        const_cast<TcpxEngine *>(this)->addTelemetryEvent(type, value);
    }

    static nixl_telemetry_event_type_t error_event(nixl_status_t status) {
        using E = nixl_telemetry_event_type_t;
        switch (status) {
        case NIXL_ERR_NOT_POSTED: return E::AGENT_ERR_NOT_POSTED;
        case NIXL_ERR_INVALID_PARAM: return E::AGENT_ERR_INVALID_PARAM;
        case NIXL_ERR_NOT_FOUND: return E::AGENT_ERR_NOT_FOUND;
        case NIXL_ERR_MISMATCH: return E::AGENT_ERR_MISMATCH;
        case NIXL_ERR_NOT_ALLOWED: return E::AGENT_ERR_NOT_ALLOWED;
        case NIXL_ERR_REPOST_ACTIVE: return E::AGENT_ERR_REPOST_ACTIVE;
        case NIXL_ERR_NOT_SUPPORTED: return E::AGENT_ERR_NOT_SUPPORTED;
        case NIXL_ERR_REMOTE_DISCONNECT: return E::AGENT_ERR_REMOTE_DISCONNECT;
        case NIXL_ERR_CANCELED: return E::AGENT_ERR_CANCELED;
        case NIXL_ERR_UNKNOWN: return E::AGENT_ERR_UNKNOWN;
        default: return E::AGENT_ERR_BACKEND;
        }
    }

    uccl_engine_t *engine_ = nullptr;
    std::string conn_info_;
    std::thread acceptor_;
    // UCCL_TCPX_NIXL_CALL_TIMES's file, open when set: requests' calls are timed then.
    std::FILE *call_times_ = nullptr;
    mutable std::mutex mu_;
    mutable SpareLists spare_;
    mutable std::map<std::string, uccl_conn_t *> conns_;
    // Per agent, held while a connection to it is being made.
    mutable std::map<std::string, std::shared_ptr<std::mutex>> connecting_;
    std::map<std::string, std::string> infos_;
    std::vector<uccl_conn_t *> accepted_;
    mutable std::vector<uccl_conn_t *> retired_;
    std::set<TcpxMD *> registered_;
    // connect_on_load: agents whose info was loaded, for the dialer thread to connect to, and
    // their GPU registrations loaded, for it to prepare.
    bool connect_on_load_ = true;
    std::deque<std::string> to_dial_;
    std::deque<std::pair<std::string, FifoItem>> to_prepare_;
    std::condition_variable dial_cv_;
    bool stopping_ = false;
    std::thread dialer_;
};

nixlBackendEngine *create_engine(const nixlBackendInitParams *init) {
    try {
        if (!init) return nullptr;
        return new TcpxEngine(init);
    } catch (const std::exception &e) {
        log_error(std::string("cannot create the backend: ") + e.what());
    } catch (...) {
        log_error("cannot create the backend");
    }
    return nullptr;
}

void destroy_engine(nixlBackendEngine *engine) {
    try {
        delete engine;
    } catch (...) {
        log_error("destroying the backend failed");
    }
}

const char *plugin_name() { return "TCPX"; }
const char *plugin_version() { return UCCL_TCPX_PLUGIN_VERSION; }

nixl_b_params_t backend_options() {
    nixl_b_params_t options;
    for (const auto &[name, setting] : kOptions) options.emplace(name, "");
    options.emplace(kConnectOnLoad, "1");
    return options;
}

nixl_mem_list_t backend_mems() { return {DRAM_SEG, VRAM_SEG}; }

nixlBackendPlugin plugin = {NIXL_PLUGIN_API_VERSION, create_engine, destroy_engine, plugin_name,
                            plugin_version,          backend_options, backend_mems};

}  // namespace

extern "C" __attribute__((visibility("default"))) nixlBackendPlugin *nixl_plugin_init() { return &plugin; }

extern "C" __attribute__((visibility("default"))) void nixl_plugin_fini() {}
