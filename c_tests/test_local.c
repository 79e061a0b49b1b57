/* Same-host peers: conn_is_local for engines of one process and of two processes of this host,
 * direct same-process DRAM writes and reads through the vector calls with NULL and with zeroed
 * ipc_bufs, refusal of what the target did not advertise on that path (-6, target untouched),
 * UCCL_TCPX_DISABLE_IPC=1 forcing the network path, and host memory between two processes (copied
 * with process_vm_readv where the kernel allows it, else over loopback TCP): a read and a write
 * larger than the inline limit, and a write past the region's end refused with nothing landing. */
#include "harness.h"

#include <sys/wait.h>

#define LEN ((size_t)256 * 1024)
#define SENTINEL 0x5A
/* Larger than the 64 KiB that ride the control stream inline. */
#define WRITTEN ((size_t)200 * 1024)

/* The peer process: an engine of its own, a region with a pattern, advertised over a pipe; then it
 * waits for the parent's go and checks what the parent wrote. Exit status 0 means all held. */
static int child_main(int announce_fd, int go_fd) {
  uccl_engine_t *e = make_engine();
  uint8_t *buf = xalloc(LEN);
  uccl_mr_t mr;
  FifoItem item;
  metadata_t md;
  char ip[64], go = 0;
  int gpu = 0, ok;
  size_t i;
  uccl_conn_t *conn;
  if (!e || !engine_metadata(e, &md)) return 2;
  fill_pattern(buf, LEN, 0xC41D);
  mr = reg_or_die(e, buf, LEN);
  item = fifo_for(e, mr, buf, LEN);
  if (write(announce_fd, &md.port, sizeof md.port) != (ssize_t)sizeof md.port) return 3;
  if (write(announce_fd, &item, sizeof item) != (ssize_t)sizeof item) return 3;
  conn = uccl_engine_accept(e, ip, sizeof ip, &gpu);
  if (!conn || !uccl_engine_conn_is_local(conn)) return 4;
  if (read(go_fd, &go, 1) != 1) return 5;
  /* The parent wrote WRITTEN bytes of 0x77 at offset 100; its write past the end was refused. */
  ok = check_fill(buf + 100, WRITTEN, 0x77, "child region after the parent's write") &&
       check_pattern(buf, 100, 0xC41D, "child region before the written range");
  for (i = 100 + WRITTEN; ok && i < LEN; i++) {
    if (buf[i] != pattern_byte(i, 0xC41D)) {
      fprintf(stderr, "  child region after the written range: byte %zu changed\n", i);
      ok = 0;
    }
  }
  uccl_engine_conn_destroy(conn);
  uccl_engine_destroy(e);
  return ok ? 0 : 6;
}

static void test_cross_process(pid_t child, int announce_fd, int go_fd) {
  int port = 0, status = 0, rc;
  FifoItem item;
  uccl_engine_t *e;
  uccl_conn_t *conn;
  uint8_t *buf = xalloc(LEN);
  uccl_mr_t mr;
  uint64_t id = 0;
  char gobyte = 1;
  REQUIRE(read(announce_fd, &port, sizeof port) == (ssize_t)sizeof port);
  REQUIRE(read(announce_fd, &item, sizeof item) == (ssize_t)sizeof item);
  e = make_engine();
  REQUIRE(e);
  conn = uccl_engine_connect(e, "127.0.0.1", "0", port, false);
  REQUIRE(conn);
  CHECK(uccl_engine_conn_is_local(conn));
  mr = reg_or_die(e, buf, LEN);
  memset(buf, 0, LEN);
  rc = uccl_engine_read(conn, mr, buf, LEN, item, &id);
  CHECK_EQ(post_then_wait(rc, conn, id, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
  CHECK(check_pattern(buf, LEN, 0xC41D, "read from the other process"));
  memset(buf, 0x77, WRITTEN);
  {
    FifoItem past = item;
    past.addr += LEN - 32;
    rc = uccl_engine_write(conn, mr, buf, WRITTEN, past, &id);
    CHECK_EQ(post_then_wait(rc, conn, id, DEFAULT_WAIT_MS), UCCL_STATUS_ERR_NOT_ALLOWED);
  }
  item.addr += 100;
  rc = uccl_engine_write(conn, mr, buf, WRITTEN, item, &id);
  CHECK_EQ(post_then_wait(rc, conn, id, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
  REQUIRE(write(go_fd, &gobyte, 1) == 1);
  REQUIRE(waitpid(child, &status, 0) == child);
  CHECKF(WIFEXITED(status) && WEXITSTATUS(status) == 0, "peer process status %d", status);
  uccl_engine_mr_destroy(e, mr);
  uccl_engine_conn_destroy(conn);
  uccl_engine_destroy(e);
  free(buf);
}

/* One vector write and one vector read of two items each over `p`, with `ipc_bufs`. */
static void same_process_vectors(pair_t *p, char *const *ipc_bufs, const char *what) {
  uint8_t *src = xalloc(LEN), *dst = xalloc(LEN), *back = xalloc(LEN);
  uccl_mr_t smr, dmr, bmr;
  FifoItem items[2];
  uccl_mr_t mrs[2];
  void *bufs[2];
  size_t sizes[2] = {1000, LEN - 5000};
  uint64_t id = 0;
  int rc;
  fill_pattern(src, LEN, 0x5EED);
  memset(dst, SENTINEL, LEN);
  memset(back, 0, LEN);
  smr = reg_or_die(p->a, src, LEN);
  dmr = reg_or_die(p->b, dst, LEN);
  bmr = reg_or_die(p->a, back, LEN);
  items[0] = fifo_for(p->b, dmr, dst, LEN);
  items[1] = items[0];
  CHECK_EQ(uccl_engine_update_fifo(&items[1], (uintptr_t)dst + 5000, (uint32_t)sizes[1]), UCCL_STATUS_OK);
  mrs[0] = mrs[1] = smr;
  bufs[0] = src;
  bufs[1] = src + 5000;
  /* Posted first: the id only exists once the call has returned. */
  rc = uccl_engine_write_vector(p->conn_a, mrs, bufs, sizes, items, 2, &id, ipc_bufs);
  CHECKF(post_then_wait(rc, p->conn_a, id, DEFAULT_WAIT_MS) == UCCL_STATUS_OK, "%s: vector write", what);
  CHECK(check_bytes(dst, src, 1000, what));
  CHECK(check_fill(dst + 1000, 4000, SENTINEL, what));
  CHECK(check_bytes(dst + 5000, src + 5000, LEN - 5000, what));
  mrs[0] = mrs[1] = bmr;
  bufs[0] = back;
  bufs[1] = back + 5000;
  rc = uccl_engine_read_vector(p->conn_a, mrs, bufs, sizes, items, 2, &id, ipc_bufs);
  CHECKF(post_then_wait(rc, p->conn_a, id, DEFAULT_WAIT_MS) == UCCL_STATUS_OK, "%s: vector read", what);
  CHECK(check_bytes(back, src, 1000, what));
  CHECK(check_bytes(back + 5000, src + 5000, LEN - 5000, what));

  /* Past the end of the registered (and advertised) range: refused with -6, nothing written. */
  {
    FifoItem outside = items[0];
    outside.addr = (uintptr_t)dst + LEN - 32;
    memset(dst, SENTINEL, LEN);
    rc = uccl_engine_write(p->conn_a, smr, src, 64, outside, &id);
    CHECK_EQ(post_then_wait(rc, p->conn_a, id, DEFAULT_WAIT_MS), UCCL_STATUS_ERR_NOT_ALLOWED);
    CHECK(check_fill(dst, LEN, SENTINEL, "target after a refused local write"));
  }
  uccl_engine_mr_destroy(p->a, smr);
  uccl_engine_mr_destroy(p->b, dmr);
  uccl_engine_mr_destroy(p->a, bmr);
  free(src);
  free(dst);
  free(back);
}

int main(void) {
  int announce[2], go[2];
  pid_t child;
  pair_t p;
  char zero_a[IPC_INFO_SIZE], zero_b[IPC_INFO_SIZE];
  char *zeroed[2];
  test_begin("test_local", 100);
  /* The peer process is forked before this process starts any engine thread. */
  REQUIRE(pipe(announce) == 0 && pipe(go) == 0);
  child = fork();
  REQUIRE(child >= 0);
  if (child == 0) _exit(child_main(announce[1], go[0]));

  REQUIRE(pair_open(&p));
  CHECK(uccl_engine_conn_is_local(p.conn_a));
  CHECK(uccl_engine_conn_is_local(p.conn_b));
  CHECK(!uccl_engine_conn_is_local(NULL));
  same_process_vectors(&p, NULL, "NULL ipc_bufs");
  memset(zero_a, 0, sizeof zero_a);
  memset(zero_b, 0, sizeof zero_b);
  zeroed[0] = zero_a;
  zeroed[1] = zero_b;
  same_process_vectors(&p, zeroed, "zeroed ipc_bufs");
  pair_close(&p);

  REQUIRE(setenv("UCCL_TCPX_DISABLE_IPC", "1", 1) == 0);
  REQUIRE(pair_open(&p));
  CHECK(!uccl_engine_conn_is_local(p.conn_a));
  CHECK(!uccl_engine_conn_is_local(p.conn_b));
  same_process_vectors(&p, NULL, "UCCL_TCPX_DISABLE_IPC=1");
  pair_close(&p);
  REQUIRE(unsetenv("UCCL_TCPX_DISABLE_IPC") == 0);

  test_cross_process(child, announce[0], go[1]);
  watchdog_disarm();
  return finish("test_local");
}
