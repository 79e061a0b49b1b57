/* Two-sided messaging: sizes across chunk boundaries, both posting orders, the blocking receive,
 * FIFO matching of concurrent messages, oversized sends, and send_vector. */
#include "harness.h"

#define POISON 0xEE
#define SLACK 64
#define MAX_MSG ((size_t)8 * 1024 * 1024 + 7)

static pair_t P;
static uint8_t *sbuf, *rbuf;
static size_t sbuf_len, rbuf_len;
static uccl_mr_t smr, rmr;

/* The receiving connection's count of messages that arrived before their receive. */
static uint64_t landed_at_b(void) {
  uccl_tcpx_conn_stats_t s;
  memset(&s, 0, sizeof s);
  CHECK_EQ(uccl_tcpx_conn_stats(P.conn_b, &s, sizeof s), (int)sizeof s);
  return s.landed;
}

/* Sends past the inline bound (64 or 256 KiB by the host's CPUs) and up to 1 MiB go eagerly: one
 * that arrives before its receive lands, and is counted. */
static bool lands_when_early(size_t size) {
  return size > 256 * 1024 && size <= 1024 * 1024;
}

/* One message each way of posting; `recv_first` decides whether the receive is already waiting
 * when the send arrives, which exercises different matching paths in the engine. */
static void one_message(size_t size, bool recv_first, bool use_blocking_send_name, uint32_t seed) {
  uint64_t sid = 0, rid = 0;
  size_t sbytes = 0, rbytes = 0;
  int rc_s, rc_r;
  char what[96];
  /* A receive larger than the message checks that the reported size is the sent one. */
  size_t max_size = recv_first ? size : size + 100;

  uint64_t landed_before = landed_at_b();
  bool lands = !recv_first && lands_when_early(size);

  fill_pattern(sbuf, size, seed);
  memset(rbuf, POISON, size + 100 + SLACK);

  if (recv_first) {
    CHECK_EQ(uccl_engine_recv_async(P.conn_b, rmr, rbuf, max_size, &rid), UCCL_STATUS_OK);
  }
  if (use_blocking_send_name)
    rc_s = uccl_engine_send(P.conn_a, smr, sbuf, size, &sid);
  else
    rc_s = uccl_engine_send_async(P.conn_a, smr, sbuf, size, &sid);
  CHECK_EQ(rc_s, UCCL_STATUS_OK);
  if (!recv_first) {
    /* Let the send reach the peer before anything is posted there: an eager one until it is
     * counted as landed, any other for a while. */
    if (lands) {
      double until = now_ms() + DEFAULT_WAIT_MS;
      while (landed_at_b() == landed_before && now_ms() < until) sleep_ms(1);
    } else {
      sleep_ms(20);
    }
    CHECK_EQ(uccl_engine_recv_async(P.conn_b, rmr, rbuf, max_size, &rid), UCCL_STATUS_OK);
  }
  rc_r = wait_xfer(P.conn_b, rid, &rbytes, DEFAULT_WAIT_MS);
  rc_s = wait_xfer(P.conn_a, sid, &sbytes, DEFAULT_WAIT_MS);
  snprintf(what, sizeof what, "message of %zu bytes (%s first)", size, recv_first ? "recv" : "send");
  CHECKF(rc_r == UCCL_STATUS_OK, "%s: recv poll %d", what, rc_r);
  CHECKF(rc_s == UCCL_STATUS_OK, "%s: send poll %d", what, rc_s);
  CHECKF(rbytes == size, "%s: receiver reported %zu bytes", what, rbytes);
  CHECKF(sbytes == size, "%s: sender reported %zu bytes", what, sbytes);
  CHECKF(check_pattern(rbuf, size, seed, what), "%s: payload differs", what);
  CHECKF(check_fill(rbuf + size, 100 + SLACK, POISON, what), "%s: wrote past the message", what);
  CHECKF(landed_at_b() - landed_before == (lands ? 1u : 0u), "%s: landed %llu times", what,
         (unsigned long long)(landed_at_b() - landed_before));
  /* A finished id is reported exactly once. */
  CHECK_EQ(uccl_engine_poll(P.conn_b, rid, NULL), UCCL_STATUS_ERR_NOT_FOUND);
  CHECK_EQ(uccl_engine_poll(P.conn_a, sid, NULL), UCCL_STATUS_ERR_NOT_FOUND);
}

static void test_sizes(void) {
  static const size_t sizes[] = {1, 4095, 1024 * 1024, MAX_MSG};
  uint32_t seed = 1;
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    one_message(sizes[i], true, false, seed++);
    one_message(sizes[i], false, i % 2 == 1, seed++);
  }
}

static void test_blocking_recv(void) {
  const size_t size = 100003;
  uint64_t sid = 0;
  int n;
  fill_pattern(sbuf, size, 77);
  memset(rbuf, POISON, size + SLACK);
  CHECK_EQ(uccl_engine_send_async(P.conn_a, smr, sbuf, size, &sid), UCCL_STATUS_OK);
  watchdog_arm(30, "blocking uccl_engine_recv");
  n = uccl_engine_recv(P.conn_b, rmr, rbuf, rbuf_len);
  watchdog_arm(100, "test_send_recv");
  CHECKF(n == (int)size, "blocking recv returned %d, want %zu", n, size);
  CHECK(check_pattern(rbuf, size, 77, "blocking recv"));
  CHECK(check_fill(rbuf + size, SLACK, POISON, "blocking recv tail"));
  CHECK_EQ(wait_xfer(P.conn_a, sid, NULL, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
}

/* Several messages in flight at once must land in posting order, not completion order. */
static void test_fifo_order(void) {
  enum { N = 6 };
  static const size_t sizes[N] = {1000, 700001, 5, 300000, 2 * 1024 * 1024 + 1, 64};
  size_t soff[N], roff[N], so = 0, ro = 0;
  uint64_t sid[N], rid[N];
  for (int i = 0; i < N; i++) {
    soff[i] = so;
    roff[i] = ro;
    so += sizes[i] + 4096;
    ro += sizes[i] + 4096;
    fill_pattern(sbuf + soff[i], sizes[i], 1000u + (uint32_t)i);
  }
  REQUIRE(so <= sbuf_len && ro <= rbuf_len);
  memset(rbuf, POISON, ro);
  /* Half the receives are posted before the sends and half after, so both queues are used. */
  for (int i = 0; i < N / 2; i++)
    CHECK_EQ(uccl_engine_recv_async(P.conn_b, rmr, rbuf + roff[i], sizes[i], &rid[i]),
             UCCL_STATUS_OK);
  for (int i = 0; i < N; i++)
    CHECK_EQ(uccl_engine_send_async(P.conn_a, smr, sbuf + soff[i], sizes[i], &sid[i]),
             UCCL_STATUS_OK);
  sleep_ms(20);
  for (int i = N / 2; i < N; i++)
    CHECK_EQ(uccl_engine_recv_async(P.conn_b, rmr, rbuf + roff[i], sizes[i], &rid[i]),
             UCCL_STATUS_OK);
  for (int i = 0; i < N; i++) {
    size_t bytes = 0;
    char what[64];
    int rc = wait_xfer(P.conn_b, rid[i], &bytes, DEFAULT_WAIT_MS);
    snprintf(what, sizeof what, "in-flight message %d", i);
    CHECKF(rc == UCCL_STATUS_OK, "%s: recv poll %d", what, rc);
    CHECKF(bytes == sizes[i], "%s: %zu bytes, want %zu", what, bytes, sizes[i]);
    CHECKF(check_pattern(rbuf + roff[i], sizes[i], 1000u + (uint32_t)i, what), "%s", what);
    CHECKF(check_fill(rbuf + roff[i] + sizes[i], 4096, POISON, what), "%s overran", what);
  }
  for (int i = 0; i < N; i++) {
    int rc = wait_xfer(P.conn_a, sid[i], NULL, DEFAULT_WAIT_MS);
    CHECKF(rc == UCCL_STATUS_OK, "in-flight send %d: poll %d", i, rc);
  }
}

static void test_oversized_send(void) {
  uint64_t sid = 0, rid = 0;
  int rc_s, rc_r;
  fill_pattern(sbuf, 5000, 4242);
  memset(rbuf, POISON, 8192);
  CHECK_EQ(uccl_engine_recv_async(P.conn_b, rmr, rbuf, 1000, &rid), UCCL_STATUS_OK);
  CHECK_EQ(uccl_engine_send_async(P.conn_a, smr, sbuf, 5000, &sid), UCCL_STATUS_OK);
  rc_r = wait_xfer(P.conn_b, rid, NULL, DEFAULT_WAIT_MS);
  rc_s = wait_xfer(P.conn_a, sid, NULL, DEFAULT_WAIT_MS);
  CHECKF(rc_r < 0 && rc_r != WAIT_TIMED_OUT, "oversized send: receiver poll %d, want an error",
         rc_r);
  CHECKF(rc_s < 0 && rc_s != WAIT_TIMED_OUT, "oversized send: sender poll %d, want an error", rc_s);
  CHECK(check_fill(rbuf + 1000, 8192 - 1000, POISON, "bytes past the 1000-byte receive"));

  /* The refused pair must not leave the stream desynchronised. */
  for (uint32_t k = 0; k < 2; k++) {
    size_t bytes = 0;
    fill_pattern(sbuf, 4096, 99 + k);
    memset(rbuf, POISON, 4096 + SLACK);
    CHECK_EQ(uccl_engine_recv_async(P.conn_b, rmr, rbuf, 4096, &rid), UCCL_STATUS_OK);
    CHECK_EQ(uccl_engine_send_async(P.conn_a, smr, sbuf, 4096, &sid), UCCL_STATUS_OK);
    CHECK_EQ(wait_xfer(P.conn_b, rid, &bytes, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
    CHECK_EQ(wait_xfer(P.conn_a, sid, NULL, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
    CHECK_EQ(bytes, 4096);
    CHECK(check_pattern(rbuf, 4096, 99 + k, "message after the oversized send"));
    CHECK(check_fill(rbuf + 4096, SLACK, POISON, "tail after the oversized send"));
  }
}

static void test_send_vector(void) {
  enum { N = 3 };
  static const size_t sizes[N] = {10, 20000, 3000001};
  size_t soff[N] = {0, 4096, 65536};
  size_t roff[N] = {0, 8192, 131072};
  const void *src[N];
  uccl_mr_t mrs[N];
  uint64_t rid[N], sid = 0;
  size_t sbytes = 0;
  int rc;
  memset(rbuf, POISON, roff[2] + sizes[2] + SLACK);
  for (int i = 0; i < N; i++) {
    fill_pattern(sbuf + soff[i], sizes[i], 500u + (uint32_t)i);
    src[i] = sbuf + soff[i];
    mrs[i] = smr;
    CHECK_EQ(uccl_engine_recv_async(P.conn_b, rmr, rbuf + roff[i], sizes[i], &rid[i]),
             UCCL_STATUS_OK);
  }
  CHECK_EQ(uccl_engine_send_vector(P.conn_a, mrs, src, sizes, N, &sid), UCCL_STATUS_OK);
  for (int i = 0; i < N; i++) {
    size_t bytes = 0;
    char what[64];
    rc = wait_xfer(P.conn_b, rid[i], &bytes, DEFAULT_WAIT_MS);
    snprintf(what, sizeof what, "send_vector message %d", i);
    CHECKF(rc == UCCL_STATUS_OK, "%s: recv poll %d", what, rc);
    CHECKF(bytes == sizes[i], "%s: %zu bytes, want %zu", what, bytes, sizes[i]);
    CHECKF(check_pattern(rbuf + roff[i], sizes[i], 500u + (uint32_t)i, what), "%s", what);
    CHECKF(check_fill(rbuf + roff[i] + sizes[i], SLACK, POISON, what), "%s overran", what);
  }
  rc = wait_xfer(P.conn_a, sid, &sbytes, DEFAULT_WAIT_MS);
  CHECKF(rc == UCCL_STATUS_OK, "send_vector: sender poll %d", rc);
}

int main(void) {
  test_begin("test_send_recv", 100);
  REQUIRE(pair_open(&P));
  sbuf_len = 12 * 1024 * 1024;
  rbuf_len = 12 * 1024 * 1024;
  sbuf = xalloc(sbuf_len);
  rbuf = xalloc(rbuf_len);
  smr = reg_or_die(P.a, sbuf, sbuf_len);
  rmr = reg_or_die(P.b, rbuf, rbuf_len);

  test_sizes();
  test_blocking_recv();
  test_fifo_order();
  test_oversized_send();
  test_send_vector();

  uccl_engine_mr_destroy(P.a, smr);
  uccl_engine_mr_destroy(P.b, rmr);
  pair_close(&P);
  free(sbuf);
  free(rbuf);
  watchdog_disarm();
  return finish("test_send_recv");
}
