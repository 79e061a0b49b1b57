/* The ncclDebugLogger_t a net plugin calls. It is C-variadic, which stable Rust cannot define, so
 * this shim formats the message and hands plain arguments to a Rust sink. Hidden visibility keeps
 * both symbols out of the shared library's exports; the static archive still links them. */
#include <stdarg.h>
#include <stdio.h>

typedef void (*uccl_tcpx_log_sink)(int level, unsigned long flags, const char *file, int line, const char *msg);

static uccl_tcpx_log_sink sink;
/* Levels above this are dropped before formatting (WARN and ABORT always pass: errors quote them). */
static int max_level = 2;

__attribute__((visibility("hidden"))) void uccl_tcpx_plugin_log_setup(uccl_tcpx_log_sink s, int level) {
    __atomic_store_n(&max_level, level, __ATOMIC_RELAXED);
    __atomic_store_n(&sink, s, __ATOMIC_RELEASE);
}

__attribute__((visibility("hidden"))) void uccl_tcpx_plugin_logger(int level, unsigned long flags, const char *file,
                                                                   int line, const char *fmt, ...) {
    uccl_tcpx_log_sink s = __atomic_load_n(&sink, __ATOMIC_ACQUIRE);
    if (s == NULL || fmt == NULL || level <= 0) return;
    if (level != 2 && level != 4 && level > __atomic_load_n(&max_level, __ATOMIC_RELAXED)) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    s(level, flags, file, line, msg);
}
