/* The ncclDebugLogger_t the tests hand to the plugin: formats the variadic message and passes the
   text to a Rust sink. */
#include <stdarg.h>
#include <stdio.h>

void fake_tcpx_test_log_sink(int level, unsigned long flags, const char *file, int line, const char *msg);

void fake_tcpx_test_logger(int level, unsigned long flags, const char *file, int line, const char *fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fake_tcpx_test_log_sink(level, flags, file, line, buf);
}
