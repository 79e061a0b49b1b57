/*
 * uccl-tcpx: stands in for UCCL's RDMA transport header (collective/rdma/transport.h) for UCCL's
 * p2p engine of September-October 2025, which includes it as "transport.h". Put this folder
 * (<prefix>/include/uccl_tcpx/rdma_compat) first on the include path and the engine's engine.h,
 * engine.cc and pybind_engine.cc compile unchanged against libuccl_tcpx (see
 * docs/UCCL_ENGINE.md for the exact command).
 *
 * What it gives the engine besides uccl_tcpx/rdma_endpoint.hpp's types:
 *  - uccl::RDMAEndpoint: the TcpxEndpoint adapter with ErrorPolicy::kAbort, since the engine
 *    never reads a request's status (UCCL_TCPX_ADAPTER_ERRORS=report restores reporting);
 *  - UCCL's settings as UCCL names them, read from the environment variables UCCL reads
 *    (UCCL_<NAME>), each checked: a value that is not a decimal integer in its range throws
 *    std::invalid_argument naming the variable (aborts when built without exceptions) rather
 *    than running with a default the user did not ask for:
 *      ucclParamNumGpuRtStreams()  UCCL_NUM_GPU_RT_STREAMS  default 4, 1..64
 *      ucclParamRCMode()           UCCL_RCMODE              default 1, 0..1 (every connection of
 *                                  this library is reliable and takes one-sided reads and
 *                                  writes; with 0 the engine aborts on them, as in UCCL's UC mode)
 *      ucclParamNUM_ENGINES()      UCCL_NUM_ENGINES         default 4, 1..256 (the engine only
 *                                  derives FifoItem::engine_offset from it, which is ignored here)
 *    and UCCL_PARAM(name, "ENV", default) to declare more the same way (range: any int64);
 *  - uccl::RDMAFactory::get_factory_dev(dev)->numa_node, the NUMA node sysfs gives for the GPU the
 *    endpoint's engine serves, else for the NIC of its address;
 *  - uccl::serialize_fifo_item / uccl::deserialize_fifo_item and FifoItem::engine_offset.
 *
 * Including uccl_tcpx/rdma_endpoint.hpp before this file is an error (its uccl::RDMAEndpoint alias
 * would clash); define UCCL_TCPX_NO_RDMA_ENDPOINT_ALIAS first to use both.
 */
#ifndef UCCL_TCPX_RDMA_COMPAT_TRANSPORT_H
#define UCCL_TCPX_RDMA_COMPAT_TRANSPORT_H

#ifndef __cplusplus
#error "uccl_tcpx/rdma_compat/transport.h is C++ only"
#endif

#if defined(UCCL_TCPX_RDMA_ENDPOINT_HPP) && !defined(UCCL_TCPX_NO_RDMA_ENDPOINT_ALIAS)
#error "uccl_tcpx/rdma_endpoint.hpp was included first and defined uccl::RDMAEndpoint as an alias; include transport.h first or define UCCL_TCPX_NO_RDMA_ENDPOINT_ALIAS"
#endif
#ifndef UCCL_TCPX_NO_RDMA_ENDPOINT_ALIAS
#define UCCL_TCPX_NO_RDMA_ENDPOINT_ALIAS 1
#endif

#include "../rdma_endpoint.hpp"

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace uccl_tcpx {
namespace detail {

/* The value of environment variable `var`: `deflt` when unset or empty, else a decimal integer in
 * [lo, hi]; anything else is refused with a message naming the variable. */
inline int64_t uccl_param(char const *var, int64_t deflt, int64_t lo, int64_t hi) {
  char const *text = std::getenv(var);
  if (text == nullptr || *text == '\0') return deflt;
  // strtoll alone would take leading blanks and a lone sign.
  char const *digits = (*text == '-' || *text == '+') ? text + 1 : text;
  errno = 0;
  char *end = nullptr;
  long long value = std::strtoll(text, &end, 10);
  bool ok = *digits >= '0' && *digits <= '9' && *end == '\0' && errno == 0 && value >= lo &&
            value <= hi;
  if (!ok) {
    std::string msg = std::string(var) + "=\"" + text + "\" is not a decimal integer in [" +
                      std::to_string(lo) + ", " + std::to_string(hi) + "]";
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    throw std::invalid_argument(msg);
#else
    std::fprintf(stderr, "uccl-tcpx: %s\n", msg.c_str());
    std::abort();
#endif
  }
  return static_cast<int64_t>(value);
}

}  // namespace detail
}  // namespace uccl_tcpx

/* UCCL's macro: `ucclParam<name>()` reads UCCL_<env> once (a refused value is refused again on
 * every call, so it cannot be missed). */
#ifndef UCCL_PARAM
#define UCCL_PARAM(name, env, deftVal)                                              \
  static inline int64_t ucclParam##name() {                                         \
    static int64_t const value =                                                    \
        uccl_tcpx::detail::uccl_param("UCCL_" env, deftVal, INT64_MIN, INT64_MAX); \
    return value;                                                                   \
  }
#endif

/* The settings UCCL's engine reads, with the ranges it can work with. */
static inline int64_t ucclParamNumGpuRtStreams() {
  static int64_t const value = uccl_tcpx::detail::uccl_param("UCCL_NUM_GPU_RT_STREAMS", 4, 1, 64);
  return value;
}

static inline int64_t ucclParamRCMode() {
  static int64_t const value = uccl_tcpx::detail::uccl_param("UCCL_RCMODE", 1, 0, 1);
  return value;
}

static inline int64_t ucclParamNUM_ENGINES() {
  static int64_t const value = uccl_tcpx::detail::uccl_param("UCCL_NUM_ENGINES", 4, 1, 256);
  return value;
}

namespace uccl {

/* The endpoint UCCL's engine creates: hard errors abort (see the top of this file). The settings
 * are read here too, so a refused value fails the engine's construction, not a later transfer. */
class RDMAEndpoint : public TcpxEndpoint {
 public:
  explicit RDMAEndpoint(int num_engines_per_dev)
      : TcpxEndpoint(checked(num_engines_per_dev), ErrorPolicy::kAbort) {}

 private:
  static int checked(int num_engines_per_dev) {
    (void)ucclParamNumGpuRtStreams();
    (void)ucclParamRCMode();
    (void)ucclParamNUM_ENGINES();
    return num_engines_per_dev;
  }
};

}  // namespace uccl

#endif /* UCCL_TCPX_RDMA_COMPAT_TRANSPORT_H */
