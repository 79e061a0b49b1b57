/* The ncclDebugLogger_t the tests hand to the plugin: formats the variadic message and passes the
   text to a Rust sink. Two more for tests that need them: one that marks its messages (a second
   consumer's logger) and one that is slow (keeps its caller inside the plugin call that logs). */
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

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

/* Counts the calls that entered it, then takes half a second per message. */
int fake_tcpx_test_slow_logger_entered = 0;

void fake_tcpx_test_slow_logger(int level, unsigned long flags, const char *file, int line, const char *fmt, ...) {
    __atomic_add_fetch(&fake_tcpx_test_slow_logger_entered, 1, __ATOMIC_SEQ_CST);
    usleep(500 * 1000);
    va_list ap;
    va_start(ap, fmt);
    forward("", level, flags, file, line, fmt, ap);
    va_end(ap);
}
