/* Metadata format, connection bookkeeping, completion reporting and the small query calls. */
#include "harness.h"

static bool is_decimal(const char *s) {
  if (!*s) return false;
  for (; *s; s++)
    if (*s < '0' || *s > '9') return false;
  return true;
}

static void test_metadata_format(uccl_engine_t *e, metadata_t *out) {
  char *md = NULL, *md2 = NULL;
  CHECK_EQ(uccl_engine_get_metadata(e, &md), UCCL_STATUS_OK);
  REQUIRE(md != NULL);
  printf("metadata: %s\n", md);
  CHECKF(parse_metadata(md, out), "\"%s\" is not ip:port?gpu", md);
  CHECKF(out->ip[0] != '\0', "empty ip in \"%s\"", md);
  CHECKF(out->port >= 1 && out->port <= 65535, "port %d", out->port);
  CHECKF(out->gpu[0] != '\0', "empty gpu in \"%s\"", md);
  /* The metadata describes a fixed listener, so asking twice must give the same answer. */
  CHECK_EQ(uccl_engine_get_metadata(e, &md2), UCCL_STATUS_OK);
  if (md2) CHECKF(strcmp(md, md2) == 0, "\"%s\" then \"%s\"", md, md2);
  uccl_engine_free_string(md);
  uccl_engine_free_string(md2);
}

static void test_status_strings(void) {
  static const int codes[] = {
      UCCL_STATUS_OK,                 UCCL_STATUS_IN_PROGRESS,     UCCL_STATUS_ERR_NOT_POSTED,
      UCCL_STATUS_ERR_INVALID_PARAM,  UCCL_STATUS_ERR_BACKEND,     UCCL_STATUS_ERR_NOT_FOUND,
      UCCL_STATUS_ERR_MISMATCH,       UCCL_STATUS_ERR_NOT_ALLOWED, UCCL_STATUS_ERR_REPOST_ACTIVE,
      UCCL_STATUS_ERR_UNKNOWN,        UCCL_STATUS_ERR_NOT_SUPPORTED,
      UCCL_STATUS_ERR_REMOTE_DISCONNECT, UCCL_STATUS_ERR_CANCELED, UCCL_STATUS_ERR_TIMEOUT,
      UCCL_STATUS_ERR_INTERNAL,
  };
  enum { NC = sizeof codes / sizeof codes[0] };
  const char *s[NC];
  for (int i = 0; i < NC; i++) {
    s[i] = uccl_engine_status_str(codes[i]);
    CHECKF(s[i] != NULL && s[i][0] != '\0', "status_str(%d) is NULL or empty", codes[i]);
  }
  for (int i = 0; i < NC; i++)
    for (int j = i + 1; j < NC; j++)
      if (s[i] && s[j])
        CHECKF(strcmp(s[i], s[j]) != 0, "status_str(%d) == status_str(%d) == \"%s\"", codes[i],
               codes[j], s[i]);
  CHECK(uccl_engine_status_str(12345) != NULL);
  CHECK(uccl_engine_status_str(-12345) != NULL);
  CHECK(uccl_engine_status_str(INT_MIN) != NULL);
}

/* xfer_status reports a completion exactly once and consumes it, as poll does. */
static void test_xfer_status(uccl_conn_t *ca, uccl_conn_t *cb, uccl_mr_t amr, uint8_t *abuf,
                             uccl_mr_t bmr, uint8_t *bbuf) {
  uint64_t sid = 0, rid = 0;
  bool done = false;
  double deadline;
  fill_pattern(abuf, 5000, 7);
  memset(bbuf, 0, 5000);
  CHECK_EQ(uccl_engine_recv_async(cb, bmr, bbuf, 5000, &rid), UCCL_STATUS_OK);
  CHECK_EQ(uccl_engine_send_async(ca, amr, abuf, 5000, &sid), UCCL_STATUS_OK);
  deadline = now_ms() + DEFAULT_WAIT_MS;
  while (!(done = uccl_engine_xfer_status(cb, rid)) && now_ms() < deadline) sleep_ms(1);
  CHECKF(done, "xfer_status never reported the receive as done");
  CHECK(check_pattern(bbuf, 5000, 7, "payload seen through xfer_status"));
  CHECK(!uccl_engine_xfer_status(cb, rid));
  CHECK_EQ(uccl_engine_poll(cb, rid, NULL), UCCL_STATUS_ERR_NOT_FOUND);

  deadline = now_ms() + DEFAULT_WAIT_MS;
  while (!(done = uccl_engine_xfer_status(ca, sid)) && now_ms() < deadline) sleep_ms(1);
  CHECKF(done, "xfer_status never reported the send as done");
  CHECK(!uccl_engine_xfer_status(ca, sid));
}

int main(void) {
  uccl_engine_t *a, *b;
  metadata_t ma, mb;
  link_t link;
  uint8_t *abuf, *bbuf;
  uccl_mr_t amr, bmr;
  char ipc[IPC_INFO_SIZE];
  bool has_ipc = true;
  char err[256];

  test_begin("test_metadata", 100);
  a = make_engine();
  b = make_engine();
  REQUIRE(a && b);
  test_metadata_format(a, &ma);
  test_metadata_format(b, &mb);
  CHECKF(ma.port != mb.port, "two engines share port %d", ma.port);

  /* connect_engines uses exactly the parsed port and gpu strings. */
  CHECK(connect_engines(a, b, &link));
  REQUIRE(link.initiator && link.acceptor);
  CHECKF(link.peer_ip[0] != '\0', "accept reported an empty peer ip");
  CHECKF(strstr(link.peer_ip, "127.0.0.1") != NULL, "accept reported peer ip \"%s\" for a loopback connection",
         link.peer_ip);
  if (is_decimal(ma.gpu))
    CHECKF(link.peer_gpu == atoi(ma.gpu), "accept reported remote gpu %d, connector is gpu %s",
           link.peer_gpu, ma.gpu);
  else
    CHECKF(link.peer_gpu >= 0, "accept reported remote gpu %d", link.peer_gpu);

  /* The advertised address itself must be reachable too, not only loopback. */
  {
    link_t direct;
    CHECKF(connect_engines_at(a, b, NULL, &direct), "connecting to advertised %s:%d failed", mb.ip,
           mb.port);
    CHECK(direct.peer_ip[0] != '\0');
    uccl_engine_conn_destroy(direct.initiator);
    uccl_engine_conn_destroy(direct.acceptor);
  }

  CHECK_EQ(uccl_engine_start_listener(link.acceptor), UCCL_STATUS_OK);
  CHECK(uccl_engine_start_listener(link.acceptor) < 0);
  CHECK(last_error_text(err, sizeof err) > 0);

  /* Two engines of one process share a host: the same-host path reports the link as local. */
  CHECK(uccl_engine_conn_is_local(link.initiator));
  CHECK(uccl_engine_conn_is_local(link.acceptor));

  abuf = xalloc(1 << 20);
  bbuf = xalloc(1 << 20);
  amr = reg_or_die(a, abuf, 1 << 20);
  bmr = reg_or_die(b, bbuf, 1 << 20);
  test_xfer_status(link.initiator, link.acceptor, amr, abuf, bmr, bbuf);

  memset(ipc, 0x5a, sizeof ipc);
  CHECK_EQ(uccl_engine_get_ipc_info(a, (uintptr_t)abuf, ipc, &has_ipc), UCCL_STATUS_OK);
  CHECK(!has_ipc);
  CHECK(check_fill((const uint8_t *)ipc, sizeof ipc, 0, "ipc_buf without an IPC path"));
  CHECK_EQ(uccl_engine_update_ipc_info(ipc, (uintptr_t)abuf + 100, (uintptr_t)abuf, 1 << 20),
           UCCL_STATUS_OK);
  CHECK_EQ(uccl_engine_update_ipc_info(ipc, (uintptr_t)abuf, (uintptr_t)abuf, 1 << 20),
           UCCL_STATUS_OK);

  test_status_strings();

  uccl_engine_mr_destroy(a, amr);
  uccl_engine_mr_destroy(b, bmr);
  uccl_engine_conn_destroy(link.initiator);
  uccl_engine_conn_destroy(link.acceptor);
  uccl_engine_destroy(a);
  uccl_engine_destroy(b);
  free(abuf);
  free(bbuf);
  watchdog_disarm();
  return finish("test_metadata");
}
