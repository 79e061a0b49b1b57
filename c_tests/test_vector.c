/* Batched one-sided transfers: four iovs of different sizes, each from its own registration,
 * to different offsets of one advertised region, completing under a single transfer id. */
#include "harness.h"

#define N 4
#define POISON 0x3C
#define SLACK 4096

static pair_t P;

int main(void) {
  static const size_t sizes[N] = {7, 4096, 100003, 2 * 1024 * 1024 + 1};
  static const size_t roffs[N] = {3, 10000, 500001, 4 * 1024 * 1024};
  const size_t bbuf_len = 8 * 1024 * 1024;
  uint8_t *bbuf, *shadow, *local[N];
  void *dst_v[N];
  uccl_mr_t mrs[N], bmr;
  FifoItem base, items[N];
  uint64_t id = 0;
  size_t bytes = 0;
  int rc;

  test_begin("test_vector", 100);
  REQUIRE(pair_open(&P));
  bbuf = xalloc(bbuf_len);
  shadow = xalloc(bbuf_len);
  fill_pattern(bbuf, bbuf_len, 0xFEED);
  memcpy(shadow, bbuf, bbuf_len);
  bmr = reg_or_die(P.b, bbuf, bbuf_len);
  base = fifo_for(P.b, bmr, bbuf, bbuf_len);

  for (int i = 0; i < N; i++) {
    local[i] = xalloc(sizes[i] + SLACK);
    mrs[i] = reg_or_die(P.a, local[i], sizes[i] + SLACK);
    dst_v[i] = local[i];
    items[i] = base;
    CHECK_EQ(uccl_engine_update_fifo(&items[i], (uintptr_t)bbuf + roffs[i], (uint32_t)sizes[i]),
             UCCL_STATUS_OK);
    fill_pattern(local[i], sizes[i], 20u + (uint32_t)i);
  }

  rc = uccl_engine_write_vector(P.conn_a, mrs, dst_v, sizes, items, N, &id, NULL);
  CHECK_EQ(rc, UCCL_STATUS_OK);
  if (rc == UCCL_STATUS_OK) {
    rc = wait_xfer(P.conn_a, id, &bytes, DEFAULT_WAIT_MS);
    CHECKF(rc == UCCL_STATUS_OK, "write_vector: poll %d", rc);
  }
  for (int i = 0; i < N; i++) memcpy(shadow + roffs[i], local[i], sizes[i]);
  CHECK(check_bytes(bbuf, shadow, bbuf_len, "B after write_vector"));

  /* New contents on B, poisoned destinations on A: the read must move every byte itself. */
  for (int i = 0; i < N; i++) {
    fill_pattern(bbuf + roffs[i], sizes[i], 40u + (uint32_t)i);
    memcpy(shadow + roffs[i], bbuf + roffs[i], sizes[i]);
    memset(local[i], POISON, sizes[i] + SLACK);
  }
  id = 0;
  rc = uccl_engine_read_vector(P.conn_a, mrs, dst_v, sizes, items, N, &id, NULL);
  CHECK_EQ(rc, UCCL_STATUS_OK);
  if (rc == UCCL_STATUS_OK) {
    rc = wait_xfer(P.conn_a, id, &bytes, DEFAULT_WAIT_MS);
    CHECKF(rc == UCCL_STATUS_OK, "read_vector: poll %d", rc);
  }
  for (int i = 0; i < N; i++) {
    char what[64];
    snprintf(what, sizeof what, "read_vector iov %d (%zu bytes)", i, sizes[i]);
    CHECKF(check_pattern(local[i], sizes[i], 40u + (uint32_t)i, what), "%s", what);
    CHECKF(check_fill(local[i] + sizes[i], SLACK, POISON, what), "%s overran", what);
  }
  CHECK(check_bytes(bbuf, shadow, bbuf_len, "B after read_vector"));
  /* One id covers the whole batch, so it is reported exactly once. */
  CHECK_EQ(uccl_engine_poll(P.conn_a, id, NULL), UCCL_STATUS_ERR_NOT_FOUND);

  for (int i = 0; i < N; i++) {
    uccl_engine_mr_destroy(P.a, mrs[i]);
    free(local[i]);
  }
  uccl_engine_mr_destroy(P.b, bmr);
  pair_close(&P);
  free(bbuf);
  free(shadow);
  watchdog_disarm();
  return finish("test_vector");
}
