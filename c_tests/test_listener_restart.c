/* A connection's listener restarts as UCCL's does: stop_listener, then start_listener succeeds
 * again, while the connection keeps moving data and notifications in both directions; and the
 * engine keeps its metadata and its accept loop throughout, so a peer that read the metadata before
 * the restart still connects with it. */
#include "harness.h"

#define LEN ((size_t)1 << 20)

static pair_t P;

/* Writes `seed`'s pattern from `from` into the peer's `to`, then sends a notification naming the
 * round; the peer's bytes and the notification must both arrive. */
static void write_and_notify(uccl_conn_t *from, uccl_mr_t mr, uint8_t *src, uint8_t *dst,
                             FifoItem item, uint32_t seed, const char *round) {
  uint64_t id = 0;
  uccl_notif_v_t got;
  double deadline;
  size_t n = 0;
  int rc;
  fill_pattern(src, LEN, seed);
  memset(dst, 0, LEN);
  /* Posted first: the id only exists once the call has returned. */
  rc = uccl_engine_write(from, mr, src, LEN, item, &id);
  CHECKF(post_then_wait(rc, from, id, DEFAULT_WAIT_MS) == UCCL_STATUS_OK, "%s: write failed",
         round);
  CHECKF(check_pattern(dst, LEN, seed, round), "%s: the peer's bytes differ", round);
  CHECKF(uccl_engine_send_notif_v(from, round, strlen(round), "m", 1) == UCCL_STATUS_OK,
         "%s: send_notif_v failed", round);
  deadline = now_ms() + DEFAULT_WAIT_MS;
  while (n == 0 && now_ms() < deadline) {
    n = uccl_engine_get_notifs_v(&got, 1);
    if (n == 0) sleep_ms(1);
  }
  CHECKF(n == 1, "%s: no notification within %d ms", round, DEFAULT_WAIT_MS);
  if (n == 1) {
    CHECKF(got.name_len == strlen(round) && memcmp(got.name, round, got.name_len) == 0,
           "%s: notification named \"%s\"", round, got.name);
    uccl_engine_free_notif_v(&got);
  }
}

int main(void) {
  char *md_before = NULL, *md_after = NULL;
  metadata_t held;
  uint8_t *abuf, *bbuf;
  uccl_mr_t amr, bmr;
  FifoItem a_item, b_item;
  uccl_engine_t *c;
  link_t late;

  test_begin("test_listener_restart", 100);
  REQUIRE(pair_open(&P));
  /* What a peer holds: B's metadata, read before any restart. */
  REQUIRE(uccl_engine_get_metadata(P.b, &md_before) == UCCL_STATUS_OK && md_before);
  REQUIRE(parse_metadata(md_before, &held));

  abuf = xalloc(LEN);
  bbuf = xalloc(LEN);
  amr = reg_or_die(P.a, abuf, LEN);
  bmr = reg_or_die(P.b, bbuf, LEN);
  a_item = fifo_for(P.a, amr, abuf, LEN);
  b_item = fifo_for(P.b, bmr, bbuf, LEN);

  /* Stopping a listener that was never started is no error. */
  CHECK_EQ(uccl_engine_stop_listener(P.conn_a), UCCL_STATUS_OK);

  CHECK_EQ(uccl_engine_start_listener(P.conn_b), UCCL_STATUS_OK);
  CHECK_EQ(uccl_engine_start_listener(P.conn_b), UCCL_STATUS_ERR_REPOST_ACTIVE);
  write_and_notify(P.conn_a, amr, abuf, bbuf, b_item, 1, "before-restart");

  /* The restart, twice over, with stop_listener repeated in between. */
  for (int round = 0; round < 2; round++) {
    CHECK_EQ(uccl_engine_stop_listener(P.conn_b), UCCL_STATUS_OK);
    write_and_notify(P.conn_a, amr, abuf, bbuf, b_item, 10 + (uint32_t)round, "while-stopped");
    CHECK_EQ(uccl_engine_stop_listener(P.conn_b), UCCL_STATUS_OK);
    CHECK_EQ(uccl_engine_start_listener(P.conn_b), UCCL_STATUS_OK);
    CHECK_EQ(uccl_engine_start_listener(P.conn_b), UCCL_STATUS_ERR_REPOST_ACTIVE);
    write_and_notify(P.conn_a, amr, abuf, bbuf, b_item, 20 + (uint32_t)round, "after-restart");
    write_and_notify(P.conn_b, bmr, bbuf, abuf, a_item, 30 + (uint32_t)round,
                     "restarted-side-writes");
  }

  /* B's metadata is the same string, and a new engine connects with what the peer held. */
  REQUIRE(uccl_engine_get_metadata(P.b, &md_after) == UCCL_STATUS_OK && md_after);
  CHECKF(strcmp(md_before, md_after) == 0,
         "metadata changed across the restart: \"%s\" then \"%s\"", md_before, md_after);
  c = make_engine();
  REQUIRE(c);
  {
    connect_job_t job;
    pthread_t tid;
    memset(&job, 0, sizeof job);
    memset(&late, 0, sizeof late);
    job.engine = c;
    job.acceptor = P.b;
    job.target = held;
    job.ip = "127.0.0.1";
    REQUIRE(pthread_create(&tid, NULL, connect_thread, &job) == 0);
    late.acceptor = uccl_engine_accept(P.b, late.peer_ip, sizeof late.peer_ip, &late.peer_gpu);
    pthread_join(tid, NULL);
    late.initiator = job.conn;
    CHECKF(late.initiator && late.acceptor, "connecting to the held metadata's port %d failed: %s",
           held.port, job.error);
  }
  if (late.initiator && late.acceptor) {
    uint8_t *cbuf = xalloc(LEN);
    uccl_mr_t cmr = reg_or_die(c, cbuf, LEN);
    CHECK_EQ(uccl_engine_start_listener(late.acceptor), UCCL_STATUS_OK);
    write_and_notify(late.initiator, cmr, cbuf, bbuf, b_item, 40, "late-peer");
    uccl_engine_mr_destroy(c, cmr);
    free(cbuf);
  }
  uccl_engine_conn_destroy(late.initiator);
  uccl_engine_conn_destroy(late.acceptor);
  uccl_engine_destroy(c);

  uccl_engine_free_string(md_before);
  uccl_engine_free_string(md_after);
  uccl_engine_mr_destroy(P.a, amr);
  uccl_engine_mr_destroy(P.b, bmr);
  pair_close(&P);
  free(abuf);
  free(bbuf);
  return finish("test_listener_restart");
}
