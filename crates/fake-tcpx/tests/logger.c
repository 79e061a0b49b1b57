/* The ncclDebugLogger_t the tests hand to the plugin: formats the variadic message and passes the
   text to a Rust sink. One more for tests that need it: one that marks its messages (a second
   consumer's logger). */
#include <stdarg.h>
#include <stdio.h>

void fake_tcpx_test_log_sink(int level, unsigned long flags, const char *file, int line, const char *msg);

static void forward(const char *prefix, int level, unsigned long flags, const char *file, int line, const char *fmt,
                    va_list ap) {
    char buf[2048];
    int n = snprintf(buf, sizeof buf, "%s", prefix);
    vsnprintf(buf + n, sizeof buf - n, fmt, ap);
    fake_tcpx_test_log_sink(level, flags, file, line, buf);
}

void fake_tcpx_test_logger(int level, unsigned long flags, const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    forward("", level, flags, file, line, fmt, ap);
    va_end(ap);
}

/* Every message it passes on starts with "second: ". */
void fake_tcpx_test_logger_second(int level, unsigned long flags, const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    forward("second: ", level, flags, file, line, fmt, ap);
    va_end(ap);
}
