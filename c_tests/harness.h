/* Shared helpers for the C API tests (also compiled as C++, and used by the C++ tests). Include
 * this first: it selects the POSIX feature level before any system header is seen. */
#ifndef UCCL_TCPX_C_TESTS_HARNESS_H
#define UCCL_TCPX_C_TESTS_HARNESS_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "uccl_engine.h"

/* Returned by wait_xfer when the deadline passes; deliberately far from every library status. */
#define WAIT_TIMED_OUT (-1000)
#define DEFAULT_WAIT_MS 30000
#define ENGINE_CPUS 2

static int g_failures;

static inline void note_failure(void) { g_failures++; }

/* Failure reports carry this thread's current last_error: usually the explanation of the status
 * being checked, though it can be older when the failing call did not set one. */
static inline void report_last_error(void) {
  char err[512];
  err[0] = '\0';
  uccl_engine_last_error(err, sizeof err);
  if (err[0]) fprintf(stderr, "    last_error now: %s\n", err);
}

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);       \
      report_last_error();                                                           \
      note_failure();                                                                \
    }                                                                                \
  } while (0)

/* The variadic part carries the format string, so no GNU comma-swallowing is needed. */
#define CHECKF(cond, ...)                                                            \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);       \
      fprintf(stderr, __VA_ARGS__);                                                  \
      fputc('\n', stderr);                                                           \
      report_last_error();                                                           \
      note_failure();                                                                \
    }                                                                                \
  } while (0)

#define CHECK_EQ(got, want)                                                          \
  do {                                                                               \
    long long got_ = (long long)(got);                                               \
    long long want_ = (long long)(want);                                             \
    if (got_ != want_) {                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s == %s (got %lld, want %lld)\n",       \
              __FILE__, __LINE__, #got, #want, got_, want_);                         \
      report_last_error();                                                           \
      note_failure();                                                                \
    }                                                                                \
  } while (0)

/* For set-up steps: once they fail, every later check would only add noise. */
#define REQUIRE(cond)                                                                \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      char req_err_[512];                                                            \
      uccl_engine_last_error(req_err_, sizeof req_err_);                             \
      fprintf(stderr, "%s:%d: REQUIRE failed: %s (last_error: \"%s\")\n", __FILE__,  \
              __LINE__, #cond, req_err_);                                            \
      exit(1);                                                                       \
    }                                                                                \
  } while (0)

static inline int finish(const char *test) {
  if (g_failures) {
    fprintf(stderr, "%s: FAILED (%d check(s))\n", test, g_failures);
    return 1;
  }
  printf("%s: PASSED\n", test);
  return 0;
}

/* ---- time and watchdog ---------------------------------------------------------------- */

static inline double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static inline void sleep_ms(unsigned ms) {
  struct timespec ts;
  ts.tv_sec = (time_t)(ms / 1000);
  ts.tv_nsec = (long)(ms % 1000) * 1000000L;
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

static char g_watchdog_msg[256];
static size_t g_watchdog_len;

static void watchdog_fire(int sig) {
  (void)sig;
  /* Only async-signal-safe calls here: the process may be wedged inside the library. */
  ssize_t ignored = write(STDERR_FILENO, g_watchdog_msg, g_watchdog_len);
  (void)ignored;
  _exit(3);
}

/* Blocking calls in the API have no timeout of their own; a hang must become a clear failure
 * rather than a ctest kill with no context. */
static inline void watchdog_arm(unsigned seconds, const char *what) {
  struct sigaction sa;
  snprintf(g_watchdog_msg, sizeof g_watchdog_msg, "WATCHDOG: %s did not finish within %u s\n",
           what, seconds);
  g_watchdog_len = strlen(g_watchdog_msg);
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = watchdog_fire;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGALRM, &sa, NULL);
  alarm(seconds);
}

static inline void watchdog_disarm(void) { alarm(0); }

/* Line-buffered stdout keeps progress lines in order with stderr reports under ctest's pipe. */
static inline void test_begin(const char *test, unsigned seconds) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  watchdog_arm(seconds, test);
}

/* ---- last_error ------------------------------------------------------------------------ */

static inline size_t last_error_text(char *buf, size_t len) {
  buf[0] = '\0';
  return uccl_engine_last_error(buf, len);
}

/* ---- memory and patterns ----------------------------------------------------------------- */

static inline uint8_t *xalloc(size_t size) {
  void *p = NULL;
  if (posix_memalign(&p, 4096, size ? size : 1) != 0) {
    fprintf(stderr, "out of memory allocating %zu bytes\n", size);
    exit(1);
  }
  return (uint8_t *)p;
}

/* Position-dependent and non-periodic, so shifted, duplicated or swapped chunks are detected,
 * not just missing ones. */
static inline uint8_t pattern_byte(size_t i, uint32_t seed) {
  uint32_t x = (uint32_t)i * 2654435761u ^ (seed * 0x9E3779B9u + 0x7f4a7c15u);
  x ^= x >> 15;
  x *= 0x2c1b3c6du;
  x ^= x >> 12;
  return (uint8_t)(((uint32_t)(i * 131u) + seed + (x >> 8)) & 0xffu);
}

static inline void fill_pattern(uint8_t *buf, size_t n, uint32_t seed) {
  for (size_t i = 0; i < n; i++) buf[i] = pattern_byte(i, seed);
}

static inline bool check_pattern(const uint8_t *buf, size_t n, uint32_t seed, const char *what) {
  for (size_t i = 0; i < n; i++) {
    uint8_t want = pattern_byte(i, seed);
    if (buf[i] != want) {
      size_t bad = 0;
      for (size_t j = i; j < n; j++) bad += buf[j] != pattern_byte(j, seed);
      fprintf(stderr, "  %s: byte %zu of %zu is 0x%02x, want 0x%02x (%zu bytes differ)\n", what,
              i, n, buf[i], want, bad);
      return false;
    }
  }
  return true;
}

static inline bool check_bytes(const uint8_t *got, const uint8_t *want, size_t n,
                               const char *what) {
  if (memcmp(got, want, n) == 0) return true;
  for (size_t i = 0; i < n; i++) {
    if (got[i] != want[i]) {
      size_t bad = 0, last = i;
      for (size_t j = i; j < n; j++)
        if (got[j] != want[j]) {
          bad++;
          last = j;
        }
      fprintf(stderr, "  %s: byte %zu of %zu is 0x%02x, want 0x%02x (%zu bytes differ, last at %zu)\n",
              what, i, n, got[i], want[i], bad, last);
      break;
    }
  }
  return false;
}

static inline bool check_fill(const uint8_t *buf, size_t n, uint8_t value, const char *what) {
  for (size_t i = 0; i < n; i++) {
    if (buf[i] != value) {
      fprintf(stderr, "  %s: byte %zu of %zu is 0x%02x, want untouched 0x%02x\n", what, i, n,
              buf[i], value);
      return false;
    }
  }
  return true;
}

/* ---- transfers --------------------------------------------------------------------------- */

/* Polls until the transfer leaves IN_PROGRESS; returns the final poll status or WAIT_TIMED_OUT. */
static inline int wait_xfer(uccl_conn_t *conn, uint64_t id, size_t *bytes, unsigned timeout_ms) {
  double deadline = now_ms() + timeout_ms;
  unsigned spins = 0;
  for (;;) {
    int rc = uccl_engine_poll(conn, id, bytes);
    if (rc != UCCL_STATUS_IN_PROGRESS) return rc;
    if (now_ms() > deadline) {
      fprintf(stderr, "  transfer %" PRIu64 " still in progress after %u ms\n", id, timeout_ms);
      return WAIT_TIMED_OUT;
    }
    /* Spin briefly for latency, then back off so the engine's own threads get the CPU. */
    if (++spins > 200) sleep_ms(1);
  }
}

/* A transfer may be refused when posted or later when polled; either way it must fail with a
 * status the caller can inspect. Returns the post status if negative, else the poll result. */
static inline int post_then_wait(int post_rc, uccl_conn_t *conn, uint64_t id, unsigned timeout_ms) {
  if (post_rc < 0) return post_rc;
  if (post_rc != UCCL_STATUS_OK) {
    fprintf(stderr, "  post returned unexpected status %d\n", post_rc);
    return post_rc;
  }
  return wait_xfer(conn, id, NULL, timeout_ms);
}

/* ---- metadata and connection set-up ------------------------------------------------------ */

typedef struct {
  char ip[128];
  int port;
  char gpu[128];
} metadata_t;

/* "ip:port?gpu"; the port follows the last ':' before '?' so IPv6 addresses parse too. */
static inline bool parse_metadata(const char *md, metadata_t *out) {
  const char *q = strchr(md, '?');
  const char *colon = NULL;
  char *end = NULL;
  long port;
  size_t ip_len;
  if (!q) return false;
  for (const char *p = md; p < q; p++)
    if (*p == ':') colon = p;
  if (!colon || colon == md) return false;
  ip_len = (size_t)(colon - md);
  if (ip_len >= sizeof out->ip || strlen(q + 1) >= sizeof out->gpu || q[1] == '\0') return false;
  if (colon + 1 == q) return false;
  errno = 0;
  port = strtol(colon + 1, &end, 10);
  if (errno || end != q || port < 1 || port > 65535) return false;
  memcpy(out->ip, md, ip_len);
  out->ip[ip_len] = '\0';
  out->port = (int)port;
  strcpy(out->gpu, q + 1);
  return true;
}

static inline bool engine_metadata(uccl_engine_t *engine, metadata_t *out) {
  char *md = NULL;
  bool ok;
  if (uccl_engine_get_metadata(engine, &md) != UCCL_STATUS_OK || !md) return false;
  ok = parse_metadata(md, out);
  if (!ok) fprintf(stderr, "  unparsable metadata \"%s\"\n", md);
  uccl_engine_free_string(md);
  return ok;
}

static inline uccl_engine_t *make_engine(void) {
  uccl_engine_t *e = uccl_engine_create(ENGINE_CPUS, false);
  if (!e) {
    char err[512];
    last_error_text(err, sizeof err);
    fprintf(stderr, "uccl_engine_create failed: %s\n", err);
  }
  return e;
}

typedef struct {
  uccl_engine_t *engine;
  uccl_engine_t *acceptor;
  metadata_t target;
  const char *ip;
  bool same_process;
  uccl_conn_t *conn;
  char error[512];
} connect_job_t;

static void *connect_thread(void *arg) {
  connect_job_t *job = (connect_job_t *)arg;
  job->conn = uccl_engine_connect(job->engine, job->ip, job->target.gpu, job->target.port,
                                  job->same_process);
  if (!job->conn) {
    last_error_text(job->error, sizeof job->error);
    /* The other side is parked in accept(); release it so the failure is reported, not hung. */
    uccl_engine_stop_accept(job->acceptor);
  }
  return NULL;
}

typedef struct {
  uccl_conn_t *initiator; /* the connecting side's handle */
  uccl_conn_t *acceptor;  /* the accepting side's handle */
  char peer_ip[64];       /* what accept reported */
  int peer_gpu;           /* what accept reported */
} link_t;

/* Connects `from` to `to` at `ip` (NULL: the address from `to`'s metadata) while this thread
 * accepts on `to`. */
static inline bool connect_engines_at(uccl_engine_t *from, uccl_engine_t *to, const char *ip,
                                      link_t *out) {
  connect_job_t job;
  pthread_t tid;
  char err[512];
  memset(&job, 0, sizeof job);
  memset(out, 0, sizeof *out);
  out->peer_gpu = INT_MIN;
  job.engine = from;
  job.acceptor = to;
  if (!engine_metadata(to, &job.target)) {
    fprintf(stderr, "could not get/parse the acceptor's metadata\n");
    return false;
  }
  job.ip = ip ? ip : job.target.ip;
  if (pthread_create(&tid, NULL, connect_thread, &job) != 0) return false;
  out->acceptor = uccl_engine_accept(to, out->peer_ip, sizeof out->peer_ip, &out->peer_gpu);
  if (!out->acceptor) last_error_text(err, sizeof err);
  pthread_join(tid, NULL);
  out->initiator = job.conn;
  if (!job.conn) fprintf(stderr, "uccl_engine_connect failed: %s\n", job.error);
  if (!out->acceptor) fprintf(stderr, "uccl_engine_accept failed: %s\n", err);
  if (!job.conn || !out->acceptor) {
    uccl_engine_conn_destroy(job.conn);
    uccl_engine_conn_destroy(out->acceptor);
    out->initiator = out->acceptor = NULL;
    return false;
  }
  return true;
}

static inline bool connect_engines(uccl_engine_t *from, uccl_engine_t *to, link_t *out) {
  return connect_engines_at(from, to, "127.0.0.1", out);
}

typedef struct {
  uccl_engine_t *a;
  uccl_engine_t *b;
  uccl_conn_t *conn_a; /* A's handle of the A->B connection */
  uccl_conn_t *conn_b; /* B's handle of the same connection */
  link_t link;
} pair_t;

static inline bool pair_open(pair_t *p) {
  memset(p, 0, sizeof *p);
  p->a = make_engine();
  p->b = make_engine();
  if (!p->a || !p->b) return false;
  if (!connect_engines(p->a, p->b, &p->link)) return false;
  p->conn_a = p->link.initiator;
  p->conn_b = p->link.acceptor;
  return true;
}

static inline void pair_close(pair_t *p) {
  uccl_engine_conn_destroy(p->conn_a);
  uccl_engine_conn_destroy(p->conn_b);
  uccl_engine_destroy(p->a);
  uccl_engine_destroy(p->b);
  memset(p, 0, sizeof *p);
}

static inline uccl_mr_t reg_or_die(uccl_engine_t *engine, const void *data, size_t size) {
  uccl_mr_t mr = 0;
  REQUIRE(uccl_engine_reg(engine, (uintptr_t)data, size, &mr) == UCCL_STATUS_OK);
  return mr;
}

/* Builds B's capability for [data, data+size) and hands it over in-process, standing in for
 * the out-of-band exchange a real deployment performs. */
static inline FifoItem fifo_for(uccl_engine_t *engine, uccl_mr_t mr, const void *data, size_t size) {
  char raw[FIFO_SIZE];
  FifoItem item;
  memset(raw, 0, sizeof raw);
  REQUIRE(uccl_engine_prepare_fifo(engine, mr, data, size, raw) == UCCL_STATUS_OK);
  uccl_engine_deserialize_fifo_item(raw, &item);
  return item;
}

/* `item` pointed at [addr, addr+size). update_fifo may or may not validate the new window
 * locally; when it refuses, the item is forged by hand, because a hostile initiator can always do
 * that. */
static inline FifoItem fifo_retarget(FifoItem item, uint64_t addr, uint32_t size) {
  if (uccl_engine_update_fifo(&item, addr, size) != UCCL_STATUS_OK) {
    item.addr = addr;
    item.size = size;
  }
  return item;
}

#endif
