/* Stands in for NIXL's logging header (which needs abseil) when abi_check.cpp compiles NIXL's
 * backend headers: the checks never log. */
#ifndef UCCL_TCPX_NIXL_LOG_STUB_H
#define UCCL_TCPX_NIXL_LOG_STUB_H
#include <ostream>
#include <sstream>
#define UCCL_TCPX_NO_LOG \
    if (true) {          \
    } else               \
        std::ostringstream()
#define NIXL_FATAL UCCL_TCPX_NO_LOG
#define NIXL_ERROR UCCL_TCPX_NO_LOG
#define NIXL_ERROR_FUNC UCCL_TCPX_NO_LOG
#define NIXL_WARN UCCL_TCPX_NO_LOG
#define NIXL_INFO UCCL_TCPX_NO_LOG
#define NIXL_DEBUG UCCL_TCPX_NO_LOG
#define NIXL_TRACE UCCL_TCPX_NO_LOG
#define NIXL_ASSERT(condition) ((void)sizeof(condition))
#define NIXL_ASSERT_ALWAYS(condition) ((void)sizeof(condition))
#endif
