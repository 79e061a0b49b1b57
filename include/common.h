/*
 * uccl-tcpx: stands in for UCCL's common.h, which UCCL installs next to uccl_engine.h and which
 * that header includes for FifoItem and its wire helpers.
 *
 * C: FifoItem, FIFO_SIZE and the rest of uccl_engine.h (the wire helpers are
 * uccl_engine_serialize_fifo_item / uccl_engine_deserialize_fifo_item).
 * C++: additionally `serialize_fifo_item(FifoItem const&, char*)` and
 * `deserialize_fifo_item(char const*, FifoItem*)` as UCCL declares them, the other C++ forms of
 * uccl_engine.h (uccl_tcpx/engine_cxx.hpp, included even under UCCL_TCPX_C_ONLY), and the standard
 * headers that UCCL's common.h makes available to code using its engine API.
 *
 * UCCL's transport internals that live in its common.h (ConnID, NotifyMsg, verbs-based types) are
 * not provided; uccl_tcpx/rdma_endpoint.hpp has the transport-level types of its adapter.
 */
#ifndef UCCL_TCPX_COMMON_H
#define UCCL_TCPX_COMMON_H

#include "uccl_engine.h"

#ifdef __cplusplus
#include "uccl_tcpx/engine_cxx.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

static_assert(sizeof(FifoItem) == FIFO_SIZE, "FifoItem is the 64-byte wire record");
#endif

#endif /* UCCL_TCPX_COMMON_H */
