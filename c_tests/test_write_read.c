/* One-sided write and read against a region B advertised with prepare_fifo, including the
 * capability checks that must keep B's memory intact when A oversteps or forges. */
#include "harness.h"

#define MiB ((size_t)1024 * 1024)
#define POISON 0xA5

static pair_t P;
static uint8_t *abuf, *bbuf, *shadow; /* shadow: what bbuf must contain at every check */
static size_t abuf_len, bbuf_len;
static uccl_mr_t amr, bmr;
static uint8_t *adv;   /* start of the advertised range inside bbuf */
static size_t adv_len; /* its length */
static FifoItem base;  /* B's capability as handed over */

static bool b_intact(const char *what) { return check_bytes(bbuf, shadow, bbuf_len, what); }

/* Waits for a posted transfer; a successful one must report exactly the bytes it moved. */
static int finish_xfer(int post_rc, uint64_t id, size_t size, const char *what) {
  size_t bytes = 0;
  int rc;
  if (post_rc != UCCL_STATUS_OK) return post_rc;
  rc = wait_xfer(P.conn_a, id, &bytes, DEFAULT_WAIT_MS);
  if (rc == UCCL_STATUS_OK)
    CHECKF(bytes == size, "%s of %zu bytes reported %zu bytes", what, size, bytes);
  return rc;
}

static int write_at(FifoItem item, size_t size, uint32_t seed) {
  uint64_t id = 0;
  int rc;
  fill_pattern(abuf, size, seed);
  /* Posted first: the id only exists once the call has returned. */
  rc = uccl_engine_write(P.conn_a, amr, abuf, size, item, &id);
  return finish_xfer(rc, id, size, "write");
}

static int read_at(FifoItem item, size_t size) {
  uint64_t id = 0;
  int rc = uccl_engine_read(P.conn_a, amr, abuf, size, item, &id);
  return finish_xfer(rc, id, size, "read");
}

/* B's capability pointed elsewhere (forged where update_fifo refuses). */
static FifoItem retarget(uint64_t addr, uint32_t size) { return fifo_retarget(base, addr, size); }

static void test_fifo_item(void) {
  char raw[FIFO_SIZE], again[FIFO_SIZE];
  FifoItem copy;
  CHECK_EQ(sizeof(FifoItem), 64);
  CHECK_EQ(base.addr, (uintptr_t)adv);
  CHECK_EQ(base.size, adv_len);
  uccl_engine_serialize_fifo_item(&base, raw);
  uccl_engine_deserialize_fifo_item(raw, &copy);
  CHECK(memcmp(&copy, &base, sizeof copy) == 0);
  uccl_engine_serialize_fifo_item(&copy, again);
  CHECK(memcmp(raw, again, sizeof raw) == 0);
  copy = base;
  CHECK_EQ(uccl_engine_update_fifo(&copy, (uintptr_t)adv + 10, 20), UCCL_STATUS_OK);
  CHECK_EQ(copy.addr, (uintptr_t)adv + 10);
  CHECK_EQ(copy.size, 20);
  CHECK(memcmp(copy.padding, base.padding, sizeof copy.padding) == 0);
}

static void test_writes_and_reads(void) {
  /* from_end: the offset counts back from the end of the advertised range, so the transfer
   * touches its last byte. */
  static const struct { size_t size, off; bool from_end; } cases[] = {
      {1, 0, false},
      {64 * 1024 + 3, 12345, false},
      {8 * MiB, 0, false},
      {8 * MiB, 0, true},
      {4097, 0, true},
      {1, 0, true},
  };
  uint32_t seed = 10;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    size_t size = cases[i].size;
    size_t off = cases[i].from_end ? adv_len - size : cases[i].off;
    FifoItem item = base;
    char what[96];
    int rc;
    CHECK_EQ(uccl_engine_update_fifo(&item, (uintptr_t)adv + off, (uint32_t)size), UCCL_STATUS_OK);

    snprintf(what, sizeof what, "write of %zu bytes at offset %zu", size, off);
    rc = write_at(item, size, seed);
    CHECKF(rc == UCCL_STATUS_OK, "%s: status %d", what, rc);
    memcpy(shadow + (adv - bbuf) + off, abuf, size);
    CHECKF(b_intact(what), "%s: B's memory differs from the expected image", what);

    /* Fresh contents on B so the read cannot pass by returning what A just wrote. */
    snprintf(what, sizeof what, "read of %zu bytes at offset %zu", size, off);
    fill_pattern(adv + off, size, seed + 1000);
    memcpy(shadow + (adv - bbuf) + off, adv + off, size);
    memset(abuf, POISON, size + 4096);
    rc = read_at(item, size);
    CHECKF(rc == UCCL_STATUS_OK, "%s: status %d", what, rc);
    CHECKF(check_pattern(abuf, size, seed + 1000, what), "%s: payload differs", what);
    CHECKF(check_fill(abuf + size, 4096, POISON, what), "%s: wrote past the destination", what);
    CHECKF(b_intact(what), "%s: a read changed B's memory", what);
    seed++;
  }
}

static void expect_refused_write(FifoItem item, size_t size, const char *what) {
  int rc = write_at(item, size, 0xBAD);
  CHECKF(rc == UCCL_STATUS_ERR_NOT_ALLOWED, "%s: status %d, want ERR_NOT_ALLOWED (%d)", what, rc,
         UCCL_STATUS_ERR_NOT_ALLOWED);
  CHECKF(b_intact(what), "%s: B's memory changed", what);
}

static void expect_refused_read(FifoItem item, size_t size, const char *what) {
  int rc;
  memset(abuf, POISON, size + 4096);
  rc = read_at(item, size);
  CHECKF(rc == UCCL_STATUS_ERR_NOT_ALLOWED, "%s: status %d, want ERR_NOT_ALLOWED (%d)", what, rc,
         UCCL_STATUS_ERR_NOT_ALLOWED);
  CHECKF(check_fill(abuf, size + 4096, POISON, what), "%s: destination was written", what);
  CHECKF(b_intact(what), "%s: B's memory changed", what);
}

static void check_link_still_works(const char *after) {
  FifoItem item = retarget((uintptr_t)adv + 100, 4096);
  int rc = write_at(item, 4096, 0x600D);
  char what[128];
  snprintf(what, sizeof what, "write after %s", after);
  CHECKF(rc == UCCL_STATUS_OK, "%s: status %d", what, rc);
  memcpy(shadow + (adv - bbuf) + 100, abuf, 4096);
  CHECKF(b_intact(what), "%s: B's memory differs", what);
}

static void test_out_of_region(void) {
  uint64_t a = (uintptr_t)adv, end = (uintptr_t)adv + adv_len;
  /* All these addresses are inside B's registration, so only the capability can stop them. */
  expect_refused_write(retarget(a - 64, 128), 128, "write straddling the range start");
  expect_refused_write(retarget(a - 4096, 16), 16, "write entirely before the range");
  expect_refused_write(retarget(end - 10, 100), 100, "write overrunning the range end");
  expect_refused_write(retarget(end, 16), 16, "write just past the range");
  expect_refused_write(retarget(end - 4096, 4097), 4097, "write one byte past the range end");
  check_link_still_works("refused writes");
  expect_refused_read(retarget(a - 64, 128), 128, "read straddling the range start");
  expect_refused_read(retarget(end - 10, 100), 100, "read overrunning the range end");
  check_link_still_works("refused reads");
}

static void test_forged_items(void) {
  FifoItem item;
  int rc;

  item = retarget((uintptr_t)adv + 64, 256);
  /* padding[0..4] is UCCL's engine_offset, padding[4..12] the region id, padding[12..20] the token
   * (bytes 36..44 and 44..52 of the item). */
  item.padding[12] = (char)(item.padding[12] ^ 0x5a);
  expect_refused_write(item, 256, "write with a tampered token");
  expect_refused_read(item, 256, "read with a tampered token");

  item = retarget((uintptr_t)adv + 64, 256);
  item.padding[19] = (char)(item.padding[19] ^ 0x01);
  expect_refused_write(item, 256, "write with a token off by one bit");
  check_link_still_works("tampered tokens");

  item = retarget((uintptr_t)adv + 64, 256);
  item.padding[4] = (char)(item.padding[4] ^ 0x01);
  rc = write_at(item, 256, 0xBAD);
  CHECKF(rc < 0 && rc != WAIT_TIMED_OUT, "write with a tampered region id: status %d", rc);
  CHECK(b_intact("write with a tampered region id"));

  {
    /* xorshift: reproducible "random" bytes for the whole padding */
    uint32_t x = 0x12345678u;
    item = retarget((uintptr_t)adv + 64, 256);
    for (size_t i = 0; i < sizeof item.padding; i++) {
      x ^= x << 13;
      x ^= x >> 17;
      x ^= x << 5;
      item.padding[i] = (char)(x & 0xff);
    }
  }
  rc = write_at(item, 256, 0xBAD);
  CHECKF(rc < 0 && rc != WAIT_TIMED_OUT, "write with garbled padding: status %d", rc);
  CHECK(b_intact("write with garbled padding"));
  memset(abuf, POISON, 256 + 4096);
  rc = read_at(item, 256);
  CHECKF(rc < 0 && rc != WAIT_TIMED_OUT, "read with garbled padding: status %d", rc);
  CHECK(check_fill(abuf, 256 + 4096, POISON, "destination of the garbled read"));
  check_link_still_works("garbled items");
}

/* A capability must die with the registration it was minted for. */
static void test_after_deregistration(void) {
  FifoItem item = retarget((uintptr_t)adv + 64, 256);
  int rc;
  uccl_engine_mr_destroy(P.b, bmr);
  rc = write_at(item, 256, 0xBAD);
  CHECKF(rc < 0 && rc != WAIT_TIMED_OUT, "write into a deregistered region: status %d", rc);
  CHECK(b_intact("write into a deregistered region"));
}

/* The connection's counters saw what the tests above did: transfers each way, the refusals by
 * status, nothing left in flight; a caller compiled against a shorter structure gets its prefix. */
static void test_conn_stats(void) {
  uccl_tcpx_conn_stats_t s, prefix;
  unsigned long long by_status = 0;
  memset(&s, 0xEE, sizeof s);
  CHECK_EQ(uccl_tcpx_conn_stats(P.conn_a, &s, sizeof s), (int)sizeof s);
  CHECK(s.out_transfers > 0 && s.out_bytes >= s.out_transfers);
  CHECK(s.in_transfers > 0 && s.in_bytes >= s.in_transfers);
  CHECK_EQ(s.in_flight, 0);
  CHECK(s.failed > 0);
  for (int i = 0; i < UCCL_TCPX_STATUS_SLOTS; i++) by_status += s.errors[i];
  CHECK_EQ(by_status, s.failed);
  CHECK(s.last_error < 0 && s.errors[-s.last_error] > 0);
  memset(&prefix, 0xEE, sizeof prefix);
  CHECK_EQ(uccl_tcpx_conn_stats(P.conn_a, &prefix, 2 * sizeof(uint64_t)), 2 * (int)sizeof(uint64_t));
  CHECK_EQ(prefix.out_transfers, s.out_transfers);
  CHECK(prefix.in_transfers == 0xEEEEEEEEEEEEEEEEull);
  CHECK_EQ(uccl_tcpx_conn_stats(P.conn_a, NULL, sizeof s), UCCL_STATUS_ERR_INVALID_PARAM);
  CHECK_EQ(uccl_tcpx_conn_stats(P.conn_a, &s, 3), UCCL_STATUS_ERR_INVALID_PARAM);

  /* Per data link: one here, named by its address, with sockets both ways and no failed one. */
  uccl_tcpx_link_stats_t links[2];
  memset(links, 0xEE, sizeof links);
  CHECK_EQ(uccl_tcpx_conn_link_stats(P.conn_a, NULL, 0, sizeof links[0]), 1);
  CHECK_EQ(uccl_tcpx_conn_link_stats(P.conn_a, links, 2, sizeof links[0]), 1);
  CHECK(memchr(links[0].link, 0, sizeof links[0].link) != NULL && links[0].link[0] != 0);
  CHECK(links[0].out_sockets >= 1 && links[0].in_sockets >= 1);
  CHECK_EQ(links[0].out_errors + links[0].in_errors, 0);
  CHECK(links[1].out_sockets == 0xEEEEEEEEu);
  CHECK_EQ(uccl_tcpx_conn_link_stats(P.conn_a, NULL, 1, sizeof links[0]), UCCL_STATUS_ERR_INVALID_PARAM);
}

int main(void) {
  test_begin("test_write_read", 100);
  REQUIRE(pair_open(&P));
  abuf_len = 9 * MiB;
  bbuf_len = 20 * MiB;
  abuf = xalloc(abuf_len);
  bbuf = xalloc(bbuf_len);
  shadow = xalloc(bbuf_len);
  fill_pattern(bbuf, bbuf_len, 0xB0B);
  memcpy(shadow, bbuf, bbuf_len);
  amr = reg_or_die(P.a, abuf, abuf_len);
  bmr = reg_or_die(P.b, bbuf, bbuf_len);
  /* Leave registered memory on both sides of the advertised window. */
  adv = bbuf + MiB;
  adv_len = 16 * MiB;
  base = fifo_for(P.b, bmr, adv, adv_len);

  test_fifo_item();
  test_writes_and_reads();
  test_out_of_region();
  test_forged_items();
  test_after_deregistration();
  test_conn_stats();

  uccl_engine_mr_destroy(P.a, amr);
  pair_close(&P);
  free(abuf);
  free(bbuf);
  free(shadow);
  watchdog_disarm();
  return finish("test_write_read");
}
