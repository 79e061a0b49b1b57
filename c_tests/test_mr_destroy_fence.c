/* uccl_engine_mr_destroy is a fence: once it returns, the engine neither writes into nor reads
 * from the region, so the caller may free the buffer at once. A peer streams a write into (and
 * then reads from) a buffer that is deregistered and freed while the bytes move; the transfer must
 * fail with NOT_ALLOWED (or have completed before). Under AddressSanitizer (scripts/sanitize.sh)
 * any later access by the engine's threads is a heap-use-after-free report; without it, a late
 * write lands in the memory reallocated right after the free, which is checked. The rounds run
 * over the network path (UCCL_TCPX_DISABLE_IPC=1), then over the direct copy two engines of one
 * process use otherwise. */
#include "harness.h"

#define MiB ((size_t)1024 * 1024)
#define SIZE (16 * MiB)
#define ROUNDS 8
#define SENTINEL 0xEE

static pair_t P;

/* Waits until the byte at `off` became non-zero: data is landing there. */
static bool wait_landing(const uint8_t *buf, size_t off) {
  double deadline = now_ms() + DEFAULT_WAIT_MS;
  while (((const volatile uint8_t *)buf)[off] == 0) {
    if (now_ms() > deadline) {
      fprintf(stderr, "  no byte landed at offset %zu\n", off);
      return false;
    }
  }
  return true;
}

/* Bytes 1..=200: never zero (so landing shows) and never the sentinel. */
static void fill_nonzero(uint8_t *buf, size_t n) {
  for (size_t i = 0; i < n; i++) buf[i] = (uint8_t)(pattern_byte(i, 7) % 200 + 1);
}

/* The memory the allocator hands out next, where a late write of the engine would land. */
static uint8_t *reuse_freed(void) {
  uint8_t *reuse = xalloc(SIZE);
  memset(reuse, SENTINEL, SIZE);
  return reuse;
}

static void check_outcome(int rc, size_t bytes, const char *what, int round) {
  CHECKF(rc == UCCL_STATUS_OK || rc == UCCL_STATUS_ERR_NOT_ALLOWED, "%s round %d: status %d", what, round, rc);
  if (rc == UCCL_STATUS_OK) CHECKF(bytes == SIZE, "%s round %d: %zu bytes", what, round, bytes);
}

static void write_rounds(const uint8_t *src, uccl_mr_t smr) {
  for (int k = 0; k < ROUNDS; k++) {
    uint8_t *dst = xalloc(SIZE), *reuse;
    uccl_mr_t dmr;
    FifoItem item;
    uint64_t id = 0;
    size_t bytes = 0;
    int rc;
    memset(dst, 0, SIZE);
    dmr = reg_or_die(P.b, dst, SIZE);
    item = fifo_for(P.b, dmr, dst, SIZE);
    REQUIRE(uccl_engine_write(P.conn_a, smr, src, SIZE, item, &id) == UCCL_STATUS_OK);
    if (k > 0) CHECK(wait_landing(dst, (size_t)(k - 1) * (SIZE / ROUNDS)));
    uccl_engine_mr_destroy(P.b, dmr);
    free(dst);
    reuse = reuse_freed();
    rc = wait_xfer(P.conn_a, id, &bytes, DEFAULT_WAIT_MS);
    check_outcome(rc, bytes, "write", k);
    CHECKF(check_fill(reuse, SIZE, SENTINEL, "memory allocated after the free"), "write round %d", k);
    free(reuse);
  }
}

static void read_rounds(uint8_t *dst, uccl_mr_t dmr, const uint8_t *expect) {
  for (int k = 0; k < ROUNDS; k++) {
    uint8_t *src = xalloc(SIZE), *reuse;
    uccl_mr_t smr;
    FifoItem item;
    uint64_t id = 0;
    size_t bytes = 0;
    int rc;
    memcpy(src, expect, SIZE);
    memset(dst, 0, SIZE);
    smr = reg_or_die(P.b, src, SIZE);
    item = fifo_for(P.b, smr, src, SIZE);
    REQUIRE(uccl_engine_read(P.conn_a, dmr, dst, SIZE, item, &id) == UCCL_STATUS_OK);
    if (k > 0) CHECK(wait_landing(dst, (size_t)(k - 1) * (SIZE / ROUNDS)));
    uccl_engine_mr_destroy(P.b, smr);
    free(src);
    reuse = reuse_freed();
    rc = wait_xfer(P.conn_a, id, &bytes, DEFAULT_WAIT_MS);
    check_outcome(rc, bytes, "read", k);
    /* Bytes read after the free would be the sentinel now living there. */
    CHECKF(memchr(dst, SENTINEL, SIZE) == NULL, "read round %d: freed memory was served", k);
    if (rc == UCCL_STATUS_OK) CHECK(check_bytes(dst, expect, SIZE, "completed read"));
    free(reuse);
  }
}

/* One pair of engines, the rounds both ways, and a write afterwards to show the connection works. */
static void run(const char *path) {
  uint8_t *src, *dst, *expect;
  uccl_mr_t smr, dmr;
  uint64_t id = 0;

  printf("%s path\n", path);
  REQUIRE(pair_open(&P));
  src = xalloc(SIZE);
  dst = xalloc(SIZE);
  expect = xalloc(SIZE);
  fill_nonzero(src, SIZE);
  fill_nonzero(expect, SIZE);
  smr = reg_or_die(P.a, src, SIZE);
  dmr = reg_or_die(P.a, dst, SIZE);

  write_rounds(src, smr);
  read_rounds(dst, dmr, expect);

  {
    uint8_t *target = xalloc(MiB);
    uccl_mr_t tmr = reg_or_die(P.b, target, MiB);
    FifoItem item = fifo_for(P.b, tmr, target, MiB);
    int rc;
    memset(target, 0, MiB);
    /* Posted first: the id only exists once the call has returned. */
    rc = uccl_engine_write(P.conn_a, smr, src, MiB, item, &id);
    CHECK_EQ(post_then_wait(rc, P.conn_a, id, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
    CHECK(check_bytes(target, src, MiB, "write after the fenced rounds"));
    uccl_engine_mr_destroy(P.b, tmr);
    free(target);
  }
  uccl_engine_mr_destroy(P.a, smr);
  uccl_engine_mr_destroy(P.a, dmr);
  pair_close(&P);
  free(src);
  free(dst);
  free(expect);
}

int main(void) {
  test_begin("test_mr_destroy_fence", 110);
  /* Posted requests are waited for, not cut by the bound, however slow the run (valgrind). */
  setenv("UCCL_TCPX_FENCE_TIMEOUT_MS", "60000", 0);
  REQUIRE(setenv("UCCL_TCPX_DISABLE_IPC", "1", 1) == 0);
  run("network");
  REQUIRE(unsetenv("UCCL_TCPX_DISABLE_IPC") == 0);
  run("same-process copy");
  return finish("test_mr_destroy_fence");
}
