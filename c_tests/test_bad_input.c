/* Every entry point fed invalid input. Each row must fail the way its return type allows
 * (negative status, NULL, false, 0) and leave an explanation in uccl_engine_last_error.
 *
 * Rows run one per fresh thread: last_error is per thread, so a fresh thread starts empty and a
 * non-empty message afterwards can only have come from the call under test. */
#include "harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#define MiB ((size_t)1024 * 1024)
#define ALEN MiB
#define BLEN (4 * MiB)
#define POISON 0xC3
#define UNKNOWN_MR ((uccl_mr_t)0x7eadbeefcafe1234ull)
#define UNKNOWN_ID ((uint64_t)0x7eedface12345678ull)
#define ROW_TIMEOUT_S 15
#define POLL_MS 10000

static pair_t P;
static uccl_conn_t *stale;     /* A's handle of a second connection, already destroyed */
static uccl_conn_t *peer_gone; /* B's handle of that connection: its peer is gone */
static uccl_conn_t *orphan;      /* a handle whose engine was destroyed under it */
static uccl_conn_t *orphan_peer; /* B's handle of the orphan's connection */
static uint8_t *cbuf;            /* registered with the orphan's engine, never freed */
static uccl_mr_t cmr;
static uint64_t orphan_recv;     /* posted on the orphan before its engine went away */
static uint8_t *abuf, *bbuf, *shadow;
static uccl_mr_t amr, bmr;
static uint8_t *adv;
static size_t adv_len;
static FifoItem base, good, garbled;
static bool stuck; /* a row never returned; its thread still runs inside the library */

/* ---- row plumbing --------------------------------------------------------------------------- */

typedef bool (*row_fn)(int arg, long long *got, char *why, size_t why_len);

typedef struct {
  char name[96];
  row_fn fn;
  int arg;
} row_t;

#define MAX_ROWS 400
static row_t rows[MAX_ROWS];
static int nrows;

static void add_row(row_fn fn, int arg, const char *fmt, const char *a, const char *b) {
  REQUIRE(nrows < MAX_ROWS);
  snprintf(rows[nrows].name, sizeof rows[nrows].name, fmt, a, b);
  rows[nrows].fn = fn;
  rows[nrows].arg = arg;
  nrows++;
}
#define ROW(fn, arg, name) add_row(fn, arg, "%s%s", name, "")

typedef struct {
  const row_t *row;
  bool refused;
  long long got;
  char why[256];
  char err_before[256];
  char err_after[512];
} run_t;

static void *row_thread(void *arg) {
  run_t *r = (run_t *)arg;
  last_error_text(r->err_before, sizeof r->err_before);
  r->refused = r->row->fn(r->row->arg, &r->got, r->why, sizeof r->why);
  last_error_text(r->err_after, sizeof r->err_after);
  return NULL;
}

static void run_row(const row_t *row) {
  static run_t r; /* static: a stuck thread keeps using it after we give up on it */
  pthread_t tid;
  struct timespec deadline;
  int rc;
  if (stuck) {
    printf("SKIP %s (an earlier row is still blocked)\n", row->name);
    note_failure();
    return;
  }
  memset(&r, 0, sizeof r);
  r.row = row;
  REQUIRE(pthread_create(&tid, NULL, row_thread, &r) == 0);
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += ROW_TIMEOUT_S;
  rc = pthread_timedjoin_np(tid, NULL, &deadline);
  if (rc != 0) {
    printf("FAIL %s: did not return within %d s\n", row->name, ROW_TIMEOUT_S);
    note_failure();
    stuck = true;
    return;
  }
  if (r.err_before[0] != '\0') {
    printf("FAIL %s: a fresh thread already had last_error \"%s\"\n", row->name, r.err_before);
    note_failure();
  }
  if (!r.refused) {
    printf("FAIL %s: was not refused (returned %lld)%s%s\n", row->name, r.got,
           r.why[0] ? ": " : "", r.why);
    note_failure();
  } else if (r.err_after[0] == '\0') {
    printf("FAIL %s: refused (%lld) but last_error is empty\n", row->name, r.got);
    note_failure();
  } else {
    printf("ok   %-62s %4lld  %s\n", row->name, r.got, r.err_after);
  }
}

/* ---- helpers ------------------------------------------------------------------------------- */

static FifoItem retarget(uint64_t addr, uint32_t size) { return fifo_retarget(base, addr, size); }

static bool neg(int rc, long long *got) {
  *got = rc;
  return rc < 0;
}

static bool b_unchanged(char *why, size_t why_len) {
  if (check_bytes(bbuf, shadow, BLEN, "B's memory")) return true;
  snprintf(why, why_len, "B's memory was modified");
  return false;
}

static uint8_t *addr_before(const void *p, size_t n) { return (uint8_t *)((uintptr_t)p - n); }

/* ---- create and environment ----------------------------------------------------------------- */

/* A port this process holds bound and never listens on: a connect to it is refused, and no other
 * process (an engine of a test running beside this one) can take it meanwhile, as it could a port
 * that was merely closed. */
static int refusing_port;

static void hold_refusing_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa;
  socklen_t len = sizeof sa;
  REQUIRE(fd >= 0);
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
  REQUIRE(getsockname(fd, (struct sockaddr *)&sa, &len) == 0);
  refusing_port = ntohs(sa.sin_port);
  /* fd stays open until the process exits. */
}

static bool row_create(int arg, long long *got, char *why, size_t why_len) {
  uccl_engine_t *e = uccl_engine_create(arg == 0 ? ENGINE_CPUS : -1, false);
  (void)why;
  (void)why_len;
  *got = (long long)(uintptr_t)e;
  if (e) uccl_engine_destroy(e);
  return e == NULL;
}

static const struct {
  const char *var;
  const char *value; /* NULL: the busy port */
} bad_env[] = {
    {"UCCL_TCPX_NUM_CHANNELS", "0"},
    {"UCCL_TCPX_NUM_CHANNELS", "65"},
    {"UCCL_TCPX_NUM_CHANNELS", "two"},
    {"UCCL_TCPX_CHUNK_SIZE", "5M"},
    {"UCCL_TCPX_CHUNK_SIZE", "-1"},
    {"UCCL_TCPX_PORT", "70000"},
    {"UCCL_TCPX_PORT", NULL},
    {"UCCL_TCPX_IP", "not-an-ip"},
};

/* Environment rows run before any engine exists, so setenv cannot race a library thread. */
static void run_create_rows(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa;
  socklen_t len = sizeof sa;
  char port[16];
  REQUIRE(fd >= 0);
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_ANY);
  REQUIRE(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 && listen(fd, 4) == 0);
  REQUIRE(getsockname(fd, (struct sockaddr *)&sa, &len) == 0);
  int busy_port = ntohs(sa.sin_port);
  snprintf(port, sizeof port, "%d", busy_port);
  for (size_t i = 0; i < sizeof bad_env / sizeof bad_env[0]; i++) {
    row_t row;
    const char *value = bad_env[i].value ? bad_env[i].value : port;
    memset(&row, 0, sizeof row);
    snprintf(row.name, sizeof row.name, "create: %s=%s%s", bad_env[i].var, value,
             bad_env[i].value ? "" : " (in use)");
    row.fn = row_create;
    setenv(bad_env[i].var, value, 1);
    run_row(&row);
    unsetenv(bad_env[i].var);
  }
  close(fd);
  {
    row_t row;
    memset(&row, 0, sizeof row);
    snprintf(row.name, sizeof row.name, "create: num_cpus -1");
    row.fn = row_create;
    row.arg = 1;
    run_row(&row);
  }
}

/* ---- engine-level rows ---------------------------------------------------------------------- */

static bool row_get_metadata(int arg, long long *got, char *why, size_t why_len) {
  char *md = NULL;
  int rc = arg == 0 ? uccl_engine_get_metadata(NULL, &md) : uccl_engine_get_metadata(P.a, NULL);
  (void)why;
  (void)why_len;
  if (md) uccl_engine_free_string(md);
  return neg(rc, got) && md == NULL;
}

static bool row_connect(int arg, long long *got, char *why, size_t why_len) {
  metadata_t mb;
  uccl_conn_t *c = NULL;
  (void)why;
  (void)why_len;
  REQUIRE(engine_metadata(P.b, &mb));
  switch (arg) {
    case 0: c = uccl_engine_connect(NULL, "127.0.0.1", mb.gpu, mb.port, false); break;
    case 1: c = uccl_engine_connect(P.a, NULL, mb.gpu, mb.port, false); break;
    case 2: c = uccl_engine_connect(P.a, "127.0.0.1", NULL, mb.port, false); break;
    case 3: c = uccl_engine_connect(P.a, "127.0.0.1", mb.gpu, 0, false); break;
    case 4: c = uccl_engine_connect(P.a, "127.0.0.1", mb.gpu, -1, false); break;
    case 5: c = uccl_engine_connect(P.a, "127.0.0.1", mb.gpu, 65536, false); break;
    case 6: c = uccl_engine_connect(P.a, "300.1.2.3", mb.gpu, mb.port, false); break;
    case 7: c = uccl_engine_connect(P.a, "", mb.gpu, mb.port, false); break;
    case 8: c = uccl_engine_connect(P.a, "127.0.0.1", mb.gpu, refusing_port, false); break;
    default: break;
  }
  *got = (long long)(uintptr_t)c;
  if (c) uccl_engine_conn_destroy(c);
  return c == NULL;
}

static bool row_accept(int arg, long long *got, char *why, size_t why_len) {
  char ip[64];
  int gpu = -1;
  uccl_conn_t *c = NULL;
  (void)why;
  (void)why_len;
  switch (arg) {
    case 0: c = uccl_engine_accept(NULL, ip, sizeof ip, &gpu); break;
    case 1: c = uccl_engine_accept(P.b, ip, 45, &gpu); break;
    case 2: c = uccl_engine_accept(P.b, ip, 0, &gpu); break;
    case 3: c = uccl_engine_accept(P.b, NULL, 64, &gpu); break;
    default: break;
  }
  *got = (long long)(uintptr_t)c;
  if (c) uccl_engine_conn_destroy(c);
  return c == NULL;
}

static bool row_void(int arg, long long *got, char *why, size_t why_len) {
  char raw[FIFO_SIZE];
  FifoItem item;
  (void)why;
  (void)why_len;
  *got = 0;
  switch (arg) {
    case 0: uccl_engine_stop_accept(NULL); break;
    case 1: uccl_engine_mr_destroy(NULL, amr); break;
    case 2: uccl_engine_mr_destroy(P.a, UNKNOWN_MR); break;
    case 3: uccl_engine_serialize_fifo_item(NULL, raw); break;
    case 4: uccl_engine_serialize_fifo_item(&good, NULL); break;
    case 5: uccl_engine_deserialize_fifo_item(NULL, &item); break;
    case 6: memset(raw, 0, sizeof raw); uccl_engine_deserialize_fifo_item(raw, NULL); break;
    default: break;
  }
  return true;
}

static bool row_start_listener(int arg, long long *got, char *why, size_t why_len) {
  (void)why;
  (void)why_len;
  return neg(uccl_engine_start_listener(arg == 0 ? NULL : stale), got);
}

static bool row_stop_listener(int arg, long long *got, char *why, size_t why_len) {
  (void)why;
  (void)why_len;
  return neg(uccl_engine_stop_listener(arg == 0 ? NULL : stale), got);
}

static bool row_reg(int arg, long long *got, char *why, size_t why_len) {
  uccl_mr_t mr = 0;
  int rc = 0;
  (void)why;
  (void)why_len;
  switch (arg) {
    case 0: rc = uccl_engine_reg(NULL, (uintptr_t)abuf, ALEN, &mr); break;
    case 1: rc = uccl_engine_reg(P.a, 0, ALEN, &mr); break;
    case 2: rc = uccl_engine_reg(P.a, (uintptr_t)abuf, 0, &mr); break;
    case 3: rc = uccl_engine_reg(P.a, (uintptr_t)abuf, SIZE_MAX, &mr); break;
    case 4: rc = uccl_engine_reg(P.a, UINTPTR_MAX - 100, 4096, &mr); break;
    case 5: rc = uccl_engine_reg(P.a, (uintptr_t)abuf, ALEN, NULL); break;
    default: break;
  }
  if (rc == UCCL_STATUS_OK && arg != 5) uccl_engine_mr_destroy(P.a, mr);
  return neg(rc, got);
}

static bool row_prepare_fifo(int arg, long long *got, char *why, size_t why_len) {
  char raw[FIFO_SIZE];
  int rc = 0;
  (void)why;
  (void)why_len;
  switch (arg) {
    case 0: rc = uccl_engine_prepare_fifo(NULL, bmr, adv, 4096, raw); break;
    case 1: rc = uccl_engine_prepare_fifo(P.b, UNKNOWN_MR, adv, 4096, raw); break;
    case 2: rc = uccl_engine_prepare_fifo(P.b, bmr, NULL, 4096, raw); break;
    case 3: rc = uccl_engine_prepare_fifo(P.b, bmr, adv, 0, raw); break;
    case 4: rc = uccl_engine_prepare_fifo(P.b, bmr, adv, 4096, NULL); break;
    case 5: rc = uccl_engine_prepare_fifo(P.b, bmr, addr_before(bbuf, 4096), 4096, raw); break;
    case 6: rc = uccl_engine_prepare_fifo(P.b, bmr, bbuf + BLEN - 100, 200, raw); break;
    case 7: rc = uccl_engine_prepare_fifo(P.b, bmr, adv, SIZE_MAX, raw); break;
    case 8: rc = uccl_engine_prepare_fifo(P.b, bmr, adv, SIZE_MAX - 5, raw); break;
    /* A capability's size travels as u32, so a longer window cannot be expressed. */
    case 9: rc = uccl_engine_prepare_fifo(P.b, bmr, adv, (size_t)UINT32_MAX + 1, raw); break;
    /* The registration of the other engine is unknown here. */
    case 10: rc = uccl_engine_prepare_fifo(P.a, bmr == amr ? UNKNOWN_MR : bmr, bbuf, 4096, raw); break;
    default: break;
  }
  return neg(rc, got);
}

static bool row_update_fifo(int arg, long long *got, char *why, size_t why_len) {
  FifoItem item = good;
  int rc = 0;
  (void)why;
  (void)why_len;
  switch (arg) {
    case 0: rc = uccl_engine_update_fifo(NULL, (uintptr_t)adv, 16); break;
    case 1: rc = uccl_engine_update_fifo(&item, (uintptr_t)adv, 0); break;
    case 2: rc = uccl_engine_update_fifo(&item, UINT64_MAX - 10, 100); break;
    default: break;
  }
  return neg(rc, got);
}

/* ---- transfer rows -------------------------------------------------------------------------- */

enum op {
  OP_WRITE,
  OP_READ,
  OP_SEND_ASYNC,
  OP_SEND,
  OP_RECV_ASYNC,
  OP_RECV,
  OP_WRITE_V,
  OP_READ_V,
  OP_SEND_V,
  NUM_OPS
};
static const char *const op_names[NUM_OPS] = {
    "write", "read", "send_async", "send", "recv_async", "recv", "write_vector", "read_vector",
    "send_vector"};

enum mod {
  M_NULL_CONN,
  M_STALE_CONN,
  M_UNKNOWN_MR,
  M_NULL_DATA,
  M_SIZE0,
  M_SIZE_MAX,
  M_PAST_END,     /* data inside the registration, size runs past its end */
  M_BEFORE_START, /* data below the registration */
  M_WRAP,         /* data + size wraps around the address space */
  M_NULL_ID,
  M_GARBLED,      /* FifoItem with random padding */
  M_OUT_OF_RANGE, /* valid capability, window moved outside the advertised range */
  M_PEER_GONE,
  /* vector-only */
  M_NUM0,
  M_NUM_NEG,
  M_NULL_MRS,
  M_NULL_BUFS,
  M_NULL_SIZES,
  M_NULL_ITEMS,
  NUM_MODS
};
static const char *const mod_names[NUM_MODS] = {
    "NULL conn",
    "destroyed conn",
    "unknown mr id",
    "NULL data",
    "size 0",
    "size SIZE_MAX",
    "data in region, size past its end",
    "data before its region",
    "data+size wraps",
    "NULL transfer_id",
    "garbled FifoItem",
    "window outside the advertised range",
    "peer destroyed its end",
    "num_iovs 0",
    "num_iovs -1",
    "NULL mr_ids",
    "NULL buffer array",
    "NULL size array",
    "NULL fifo_items",
};

/* These can only be detected by the peer or the network, so refusal may come at poll time. */
static bool remote_mod(int m) { return m == M_GARBLED || m == M_OUT_OF_RANGE || m == M_PEER_GONE; }

#define NIOV 2

static bool row_xfer(int arg, long long *got, char *why, size_t why_len) {
  int op = arg / 100, m = arg % 100;
  bool vec = op == OP_WRITE_V || op == OP_READ_V || op == OP_SEND_V;
  /* The peer-gone connection is B's handle, so it must use B's registration. */
  uccl_conn_t *conn = m == M_NULL_CONN ? NULL : m == M_STALE_CONN ? stale
                      : m == M_PEER_GONE                      ? peer_gone
                                                              : P.conn_a;
  uint8_t *buf = m == M_PEER_GONE ? bbuf : abuf;
  size_t buf_len = m == M_PEER_GONE ? BLEN : ALEN;
  uccl_mr_t mr = m == M_PEER_GONE ? bmr : amr;
  uint8_t *data = buf;
  size_t size = 4096;
  FifoItem item = good;
  uint64_t id = 0, *idp = m == M_NULL_ID ? NULL : &id;
  /* Vector form: the bad entry is the second one, so validation must cover every entry. */
  uccl_mr_t mrs[NIOV] = {mr, mr};
  void *bufs[NIOV] = {buf, buf + 8192};
  size_t sizes[NIOV] = {4096, 4096};
  FifoItem items[NIOV];
  int num = NIOV;
  int rc = 0;

  items[0] = good;
  items[1] = retarget((uintptr_t)adv + 8192, 4096);
  switch (m) {
    case M_UNKNOWN_MR: mr = UNKNOWN_MR; mrs[1] = UNKNOWN_MR; break;
    case M_NULL_DATA: data = NULL; bufs[1] = NULL; break;
    case M_SIZE0: size = 0; sizes[1] = 0; break;
    case M_SIZE_MAX: size = SIZE_MAX; sizes[1] = SIZE_MAX; break;
    case M_PAST_END:
      data = buf + buf_len - 100;
      size = 200;
      bufs[1] = buf + buf_len - 100;
      sizes[1] = 200;
      break;
    case M_BEFORE_START:
      data = addr_before(buf, 8192);
      bufs[1] = data;
      break;
    case M_WRAP:
      data = buf + 10;
      size = SIZE_MAX - 5;
      sizes[1] = SIZE_MAX - 5;
      bufs[1] = buf + 10;
      break;
    case M_GARBLED: item = garbled; items[1] = garbled; break;
    case M_OUT_OF_RANGE:
      item = retarget((uintptr_t)adv + adv_len - 100, 4096);
      items[1] = item;
      break;
    case M_NUM0: num = 0; break;
    case M_NUM_NEG: num = -1; break;
    default: break;
  }
  if (op == OP_READ || op == OP_READ_V) memset(abuf, POISON, ALEN);
  memcpy(shadow, bbuf, BLEN);

  switch (op) {
    case OP_WRITE: rc = uccl_engine_write(conn, mr, data, size, item, idp); break;
    case OP_READ: rc = uccl_engine_read(conn, mr, data, size, item, idp); break;
    case OP_SEND_ASYNC: rc = uccl_engine_send_async(conn, mr, data, size, idp); break;
    case OP_SEND: rc = uccl_engine_send(conn, mr, data, size, idp); break;
    case OP_RECV_ASYNC: rc = uccl_engine_recv_async(conn, mr, data, size, idp); break;
    case OP_RECV: rc = uccl_engine_recv(conn, mr, data, size); break;
    case OP_WRITE_V:
    case OP_READ_V: {
      const uccl_mr_t *mp = m == M_NULL_MRS ? NULL : mrs;
      void *const *bp = m == M_NULL_BUFS ? NULL : bufs;
      const size_t *sp = m == M_NULL_SIZES ? NULL : sizes;
      const FifoItem *ip = m == M_NULL_ITEMS ? NULL : items;
      rc = op == OP_WRITE_V ? uccl_engine_write_vector(conn, mp, bp, sp, ip, num, idp, NULL)
                            : uccl_engine_read_vector(conn, mp, bp, sp, ip, num, idp, NULL);
      break;
    }
    case OP_SEND_V: {
      const void *srcs[NIOV];
      srcs[0] = bufs[0];
      srcs[1] = bufs[1];
      rc = uccl_engine_send_vector(conn, m == M_NULL_MRS ? NULL : mrs,
                                   m == M_NULL_BUFS ? NULL : srcs, m == M_NULL_SIZES ? NULL : sizes,
                                   num, idp);
      break;
    }
    default: break;
  }

  if (remote_mod(m) && op != OP_RECV) {
    rc = post_then_wait(rc, conn, id, POLL_MS);
    *got = rc;
    if (rc >= 0 || rc == WAIT_TIMED_OUT) {
      snprintf(why, why_len, "%s", rc == WAIT_TIMED_OUT ? "still in progress" : "transfer succeeded");
      return false;
    }
    if (m == M_OUT_OF_RANGE && rc != UCCL_STATUS_ERR_NOT_ALLOWED) {
      snprintf(why, why_len, "want ERR_NOT_ALLOWED (%d)", UCCL_STATUS_ERR_NOT_ALLOWED);
      return false;
    }
  } else {
    *got = rc;
    if (rc >= 0) {
      /* Refusal must happen when posting: these inputs are checkable locally. */
      snprintf(why, why_len, "post accepted");
      return false;
    }
  }
  if (op == OP_WRITE || op == OP_WRITE_V) {
    if (vec) memcpy(shadow + (adv - bbuf), bbuf + (adv - bbuf), 4096); /* iov 0 may land */
    if (!b_unchanged(why, why_len)) return false;
  }
  if ((op == OP_READ || op == OP_READ_V) && remote_mod(m)) {
    size_t from = vec ? 4096 : 0; /* iov 0 is valid and may land */
    if (!check_fill(abuf + from, ALEN - from, POISON, "A's read destination")) {
      snprintf(why, why_len, "read destination was written");
      return false;
    }
  }
  return true;
}

static void add_xfer_rows(int op, const int *mods, size_t n) {
  for (size_t i = 0; i < n; i++)
    add_row(row_xfer, op * 100 + mods[i], "%s: %s", op_names[op], mod_names[mods[i]]);
}

static bool row_poll(int arg, long long *got, char *why, size_t why_len) {
  size_t bytes = 0;
  (void)why;
  (void)why_len;
  switch (arg) {
    case 0: return neg(uccl_engine_poll(NULL, 1, &bytes), got);
    case 1: return neg(uccl_engine_poll(stale, 1, &bytes), got);
    case 2: return neg(uccl_engine_poll(P.conn_a, UNKNOWN_ID, &bytes), got);
    case 3: return neg(uccl_engine_poll(P.conn_b, UNKNOWN_ID, NULL), got);
    default: return false;
  }
}

static bool row_xfer_status(int arg, long long *got, char *why, size_t why_len) {
  bool r = true;
  (void)why;
  (void)why_len;
  switch (arg) {
    case 0: r = uccl_engine_xfer_status(NULL, 1); break;
    case 1: r = uccl_engine_xfer_status(stale, 1); break;
    case 2: r = uccl_engine_xfer_status(P.conn_a, UNKNOWN_ID); break;
    default: break;
  }
  *got = r;
  return !r;
}

static bool row_send_notif(int arg, long long *got, char *why, size_t why_len) {
  notify_msg_t m;
  (void)why;
  (void)why_len;
  memset(&m, 0, sizeof m);
  strcpy(m.name, "bad-input");
  switch (arg) {
    case 0: return neg(uccl_engine_send_notif(NULL, &m), got);
    case 1: return neg(uccl_engine_send_notif(stale, &m), got);
    case 2: return neg(uccl_engine_send_notif(P.conn_a, NULL), got);
    case 3: memset(m.name, 'x', sizeof m.name); return neg(uccl_engine_send_notif(P.conn_a, &m), got);
    default: return false;
  }
}

static bool row_send_notif_v(int arg, long long *got, char *why, size_t why_len) {
  static const char msg[16] = "payload";
  (void)why;
  (void)why_len;
  switch (arg) {
    case 0: return neg(uccl_engine_send_notif_v(NULL, "n", 1, msg, sizeof msg), got);
    case 1: return neg(uccl_engine_send_notif_v(stale, "n", 1, msg, sizeof msg), got);
    case 2: return neg(uccl_engine_send_notif_v(P.conn_a, NULL, 5, msg, sizeof msg), got);
    case 3: return neg(uccl_engine_send_notif_v(P.conn_a, "n", 1, NULL, 10), got);
    case 4: return neg(uccl_engine_send_notif_v(P.conn_a, "n", 1, msg, SIZE_MAX), got);
    case 5: return neg(uccl_engine_send_notif_v(P.conn_a, "n", SIZE_MAX, msg, sizeof msg), got);
    default: return false;
  }
}

static bool row_orphan(int arg, long long *got, char *why, size_t why_len) {
  static const char msg[8] = "orphan";
  uint64_t id = 0;
  int rc;
  switch (arg) {
    case 0: return neg(uccl_engine_send_notif_v(orphan, "n", 1, msg, sizeof msg), got);
    case 1: return neg(uccl_engine_send_async(orphan, cmr, cbuf, 4096, &id), got);
    case 2: return neg(uccl_engine_start_listener(orphan), got);
    case 3:
      /* The receive was pending when the engine went away: it must end, and end in error. */
      rc = wait_xfer(orphan, orphan_recv, NULL, POLL_MS);
      *got = rc;
      if (rc == WAIT_TIMED_OUT) snprintf(why, why_len, "still in progress");
      return rc < 0 && rc != WAIT_TIMED_OUT;
    case 4:
      rc = uccl_engine_recv_async(orphan_peer, bmr, bbuf, 4096, &id);
      rc = post_then_wait(rc, orphan_peer, id, POLL_MS);
      *got = rc;
      if (rc == WAIT_TIMED_OUT) snprintf(why, why_len, "still in progress");
      return rc < 0 && rc != WAIT_TIMED_OUT;
    default: return false;
  }
}

static bool row_get_notifs(int arg, long long *got, char *why, size_t why_len) {
  size_t n = uccl_engine_get_notifs(NULL, 1);
  (void)arg;
  (void)why;
  (void)why_len;
  *got = (long long)n;
  return n == 0;
}

static bool row_conn_is_local(int arg, long long *got, char *why, size_t why_len) {
  bool r = uccl_engine_conn_is_local(arg == 0 ? NULL : stale);
  (void)why;
  (void)why_len;
  *got = r;
  return !r;
}

static bool row_ipc(int arg, long long *got, char *why, size_t why_len) {
  char ipc[IPC_INFO_SIZE];
  bool has = false;
  int rc = 0;
  switch (arg) {
    case 0: rc = uccl_engine_get_ipc_info(NULL, (uintptr_t)abuf, ipc, &has); break;
    case 1:
      rc = uccl_engine_get_ipc_info(P.a, (uintptr_t)&rc, ipc, &has);
      if (rc != UCCL_STATUS_ERR_NOT_FOUND) snprintf(why, why_len, "want ERR_NOT_FOUND");
      *got = rc;
      return rc == UCCL_STATUS_ERR_NOT_FOUND;
    case 2: rc = uccl_engine_get_ipc_info(P.a, (uintptr_t)abuf, NULL, &has); break;
    case 3: rc = uccl_engine_get_ipc_info(P.a, (uintptr_t)abuf, ipc, NULL); break;
    case 4: rc = uccl_engine_update_ipc_info(NULL, (uintptr_t)abuf + 16, (uintptr_t)abuf, ALEN); break;
    case 5:
      memset(ipc, 0, sizeof ipc);
      rc = uccl_engine_update_ipc_info(ipc, (uintptr_t)abuf - 16, (uintptr_t)abuf, ALEN);
      if (rc != UCCL_STATUS_ERR_INVALID_PARAM) snprintf(why, why_len, "want ERR_INVALID_PARAM");
      *got = rc;
      return rc == UCCL_STATUS_ERR_INVALID_PARAM;
    default: break;
  }
  return neg(rc, got);
}

/* ---- set-up and checks outside the table ---------------------------------------------------- */

static void setup(void) {
  link_t second;
  REQUIRE(pair_open(&P));
  abuf = xalloc(ALEN);
  bbuf = xalloc(BLEN);
  shadow = xalloc(BLEN);
  fill_pattern(abuf, ALEN, 1);
  fill_pattern(bbuf, BLEN, 2);
  amr = reg_or_die(P.a, abuf, ALEN);
  bmr = reg_or_die(P.b, bbuf, BLEN);
  adv = bbuf + 65536;
  adv_len = MiB;
  base = fifo_for(P.b, bmr, adv, adv_len);
  good = retarget((uintptr_t)adv, 4096);
  garbled = good;
  {
    uint32_t x = 0xC0FFEEu;
    for (size_t i = 0; i < sizeof garbled.padding; i++) {
      x ^= x << 13;
      x ^= x >> 17;
      x ^= x << 5;
      garbled.padding[i] = (char)(x & 0xff);
    }
  }
  /* Every connection is made before the rows run, so a misbehaving accept row cannot steal one. */
  REQUIRE(connect_engines(P.a, P.b, &second));
  stale = second.initiator;
  peer_gone = second.acceptor;
  uccl_engine_conn_destroy(stale);
  {
    /* Destroying an engine must invalidate the connections it still owns. */
    link_t third;
    uccl_engine_t *c = make_engine();
    REQUIRE(c != NULL);
    REQUIRE(connect_engines(c, P.b, &third));
    orphan = third.initiator;
    orphan_peer = third.acceptor;
    cbuf = xalloc(ALEN);
    cmr = reg_or_die(c, cbuf, ALEN);
    REQUIRE(uccl_engine_recv_async(orphan, cmr, cbuf, 4096, &orphan_recv) == UCCL_STATUS_OK);
    uccl_engine_destroy(c);
  }
}

static void check_no_ops(void) {
  /* Documented no-ops: they must simply return. */
  uccl_engine_destroy(NULL);
  uccl_engine_conn_destroy(NULL);
  uccl_engine_free_string(NULL);
  {
    char one[1] = {'x'};
    char err[64];
    uccl_engine_reg(NULL, 0, 0, NULL); /* guarantees a message to measure */
    size_t full = uccl_engine_last_error(NULL, 0);
    CHECKF(full > 0, "last_error(NULL, 0) returned %zu after a failed call", full);
    CHECK_EQ(uccl_engine_last_error(one, 1), full);
    CHECK(one[0] == '\0');
    CHECK_EQ(uccl_engine_last_error(err, 5), full);
    CHECK(strlen(err) == (full < 4 ? full : 4));
  }
}

static void check_still_usable(void) {
  uint64_t sid = 0, rid = 0, wid = 0;
  size_t bytes = 0;
  FifoItem item = retarget((uintptr_t)adv + 4096, 4096);
  fill_pattern(abuf, 4096, 0x51);
  CHECK_EQ(uccl_engine_write(P.conn_a, amr, abuf, 4096, item, &wid), UCCL_STATUS_OK);
  CHECK_EQ(wait_xfer(P.conn_a, wid, NULL, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
  CHECK(check_pattern(adv + 4096, 4096, 0x51, "write after the bad-input rows"));
  fill_pattern(abuf, 5000, 0x52);
  CHECK_EQ(uccl_engine_recv_async(P.conn_b, bmr, bbuf, 5000, &rid), UCCL_STATUS_OK);
  CHECK_EQ(uccl_engine_send_async(P.conn_a, amr, abuf, 5000, &sid), UCCL_STATUS_OK);
  CHECK_EQ(wait_xfer(P.conn_b, rid, &bytes, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
  CHECK_EQ(wait_xfer(P.conn_a, sid, NULL, DEFAULT_WAIT_MS), UCCL_STATUS_OK);
  CHECK_EQ(bytes, 5000);
  CHECK(check_pattern(bbuf, 5000, 0x52, "message after the bad-input rows"));
}

int main(void) {
  static const int wr_mods[] = {M_NULL_CONN, M_STALE_CONN, M_UNKNOWN_MR, M_NULL_DATA, M_SIZE0,
                                M_SIZE_MAX, M_PAST_END, M_BEFORE_START, M_WRAP, M_NULL_ID,
                                M_GARBLED, M_OUT_OF_RANGE};
  static const int send_async_mods[] = {M_NULL_CONN, M_STALE_CONN, M_UNKNOWN_MR, M_NULL_DATA,
                                            M_SIZE0, M_SIZE_MAX, M_PAST_END, M_BEFORE_START,
                                            M_WRAP, M_NULL_ID, M_PEER_GONE};
  static const int send_mods[] = {M_NULL_CONN, M_STALE_CONN, M_UNKNOWN_MR, M_NULL_DATA,
                                  M_SIZE0, M_PAST_END, M_NULL_ID};
  /* A receive may run past its registration, as UCCL's RDMA receives may (only the message that
   * arrives must fit: test_uccl_transport and tests/uccl_engine_compat.rs), so M_PAST_END is no
   * bad input for receives. */
  static const int recv_async_mods[] = {M_NULL_CONN, M_STALE_CONN, M_UNKNOWN_MR, M_NULL_DATA,
                                        M_SIZE0, M_SIZE_MAX, M_BEFORE_START, M_WRAP, M_NULL_ID,
                                        M_PEER_GONE};
  static const int recv_mods[] = {M_NULL_CONN, M_STALE_CONN, M_UNKNOWN_MR, M_NULL_DATA, M_SIZE0,
                                  M_SIZE_MAX, M_BEFORE_START, M_WRAP, M_PEER_GONE};
  static const int wr_vec_mods[] = {M_NULL_CONN, M_STALE_CONN, M_NUM0, M_NUM_NEG, M_NULL_MRS,
                                    M_NULL_BUFS, M_NULL_SIZES, M_NULL_ITEMS, M_NULL_ID,
                                    M_UNKNOWN_MR, M_NULL_DATA, M_SIZE0, M_SIZE_MAX, M_PAST_END,
                                    M_BEFORE_START, M_WRAP, M_GARBLED, M_OUT_OF_RANGE};
  static const int send_vec_mods[] = {M_NULL_CONN, M_STALE_CONN, M_NUM0, M_NUM_NEG, M_NULL_MRS,
                                      M_NULL_BUFS, M_NULL_SIZES, M_NULL_ID, M_UNKNOWN_MR,
                                      M_NULL_DATA, M_SIZE0, M_SIZE_MAX, M_PAST_END, M_WRAP};
#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

  test_begin("test_bad_input", 115);
  run_create_rows();
  hold_refusing_port();
  setup();

  ROW(row_get_metadata, 0, "get_metadata: NULL engine");
  ROW(row_get_metadata, 1, "get_metadata: NULL out-pointer");
  ROW(row_connect, 0, "connect: NULL engine");
  ROW(row_connect, 1, "connect: NULL ip");
  ROW(row_connect, 2, "connect: NULL remote_gpu");
  ROW(row_connect, 3, "connect: port 0");
  ROW(row_connect, 4, "connect: port -1");
  ROW(row_connect, 5, "connect: port 65536");
  ROW(row_connect, 6, "connect: ip 300.1.2.3");
  ROW(row_connect, 7, "connect: empty ip");
  ROW(row_connect, 8, "connect: nothing listening");
  ROW(row_accept, 0, "accept: NULL engine");
  ROW(row_accept, 1, "accept: ip_addr_buf_len 45");
  ROW(row_accept, 2, "accept: ip_addr_buf_len 0");
  ROW(row_accept, 3, "accept: NULL ip_addr_buf");
  ROW(row_void, 0, "stop_accept: NULL engine");
  ROW(row_start_listener, 0, "start_listener: NULL conn");
  ROW(row_start_listener, 1, "start_listener: destroyed conn");
  ROW(row_stop_listener, 0, "stop_listener: NULL conn");
  ROW(row_stop_listener, 1, "stop_listener: destroyed conn");
  ROW(row_reg, 0, "reg: NULL engine");
  ROW(row_reg, 1, "reg: NULL data");
  ROW(row_reg, 2, "reg: size 0");
  ROW(row_reg, 3, "reg: size SIZE_MAX");
  ROW(row_reg, 4, "reg: data+size wraps");
  ROW(row_reg, 5, "reg: NULL mr_id");
  ROW(row_void, 1, "mr_destroy: NULL engine");
  ROW(row_void, 2, "mr_destroy: unknown mr id");
  ROW(row_prepare_fifo, 0, "prepare_fifo: NULL engine");
  ROW(row_prepare_fifo, 1, "prepare_fifo: unknown mr id");
  ROW(row_prepare_fifo, 2, "prepare_fifo: NULL data");
  ROW(row_prepare_fifo, 3, "prepare_fifo: size 0");
  ROW(row_prepare_fifo, 4, "prepare_fifo: NULL fifo_buf");
  ROW(row_prepare_fifo, 5, "prepare_fifo: data before its region");
  ROW(row_prepare_fifo, 6, "prepare_fifo: data in region, size past its end");
  ROW(row_prepare_fifo, 7, "prepare_fifo: size SIZE_MAX");
  ROW(row_prepare_fifo, 8, "prepare_fifo: data+size wraps");
  ROW(row_prepare_fifo, 9, "prepare_fifo: size above 4 GiB - 1");
  ROW(row_prepare_fifo, 10, "prepare_fifo: mr of another engine");
  ROW(row_update_fifo, 0, "update_fifo: NULL item");
  ROW(row_update_fifo, 1, "update_fifo: size 0");
  ROW(row_update_fifo, 2, "update_fifo: addr+size overflows");
  ROW(row_void, 3, "serialize_fifo_item: NULL item");
  ROW(row_void, 4, "serialize_fifo_item: NULL buf");
  ROW(row_void, 5, "deserialize_fifo_item: NULL buf");
  ROW(row_void, 6, "deserialize_fifo_item: NULL item");
  add_xfer_rows(OP_WRITE, wr_mods, N_OF(wr_mods));
  add_xfer_rows(OP_READ, wr_mods, N_OF(wr_mods));
  add_xfer_rows(OP_SEND_ASYNC, send_async_mods, N_OF(send_async_mods));
  add_xfer_rows(OP_SEND, send_mods, N_OF(send_mods));
  add_xfer_rows(OP_RECV_ASYNC, recv_async_mods, N_OF(recv_async_mods));
  add_xfer_rows(OP_RECV, recv_mods, N_OF(recv_mods));
  add_xfer_rows(OP_WRITE_V, wr_vec_mods, N_OF(wr_vec_mods));
  add_xfer_rows(OP_READ_V, wr_vec_mods, N_OF(wr_vec_mods));
  add_xfer_rows(OP_SEND_V, send_vec_mods, N_OF(send_vec_mods));
  ROW(row_poll, 0, "poll: NULL conn");
  ROW(row_poll, 1, "poll: destroyed conn");
  ROW(row_poll, 2, "poll: unknown transfer id");
  ROW(row_poll, 3, "poll: unknown transfer id, NULL bytes");
  ROW(row_xfer_status, 0, "xfer_status: NULL conn");
  ROW(row_xfer_status, 1, "xfer_status: destroyed conn");
  ROW(row_xfer_status, 2, "xfer_status: unknown transfer id");
  ROW(row_send_notif, 0, "send_notif: NULL conn");
  ROW(row_send_notif, 1, "send_notif: destroyed conn");
  ROW(row_send_notif, 2, "send_notif: NULL msg");
  ROW(row_send_notif, 3, "send_notif: name without NUL");
  ROW(row_send_notif_v, 0, "send_notif_v: NULL conn");
  ROW(row_send_notif_v, 1, "send_notif_v: destroyed conn");
  ROW(row_send_notif_v, 2, "send_notif_v: NULL name");
  ROW(row_send_notif_v, 3, "send_notif_v: NULL msg, msg_len 10");
  ROW(row_send_notif_v, 4, "send_notif_v: msg_len SIZE_MAX");
  ROW(row_send_notif_v, 5, "send_notif_v: name_len SIZE_MAX");
  ROW(row_orphan, 0, "send_notif_v: conn of a destroyed engine");
  ROW(row_orphan, 1, "send_async: conn of a destroyed engine");
  ROW(row_orphan, 2, "start_listener: conn of a destroyed engine");
  ROW(row_orphan, 3, "poll: receive pending when its engine was destroyed");
  ROW(row_orphan, 4, "recv_async: peer's engine destroyed");
  ROW(row_get_notifs, 0, "get_notifs: NULL out, capacity 1");
  ROW(row_conn_is_local, 0, "conn_is_local: NULL conn");
  ROW(row_conn_is_local, 1, "conn_is_local: destroyed conn");
  ROW(row_ipc, 0, "get_ipc_info: NULL engine");
  ROW(row_ipc, 1, "get_ipc_info: unregistered addr");
  ROW(row_ipc, 2, "get_ipc_info: NULL ipc_buf");
  ROW(row_ipc, 3, "get_ipc_info: NULL has_ipc");
  ROW(row_ipc, 4, "update_ipc_info: NULL ipc_buf");
  ROW(row_ipc, 5, "update_ipc_info: addr below base");

  for (int i = 0; i < nrows; i++) run_row(&rows[i]);
  if (stuck) {
    /* Tearing down under a thread that is still inside the library could hang or crash. */
    fprintf(stderr, "test_bad_input: FAILED (a row blocked; skipping teardown)\n");
    fflush(NULL);
    _exit(1);
  }

  check_no_ops();
  check_still_usable();

  uccl_engine_conn_destroy(peer_gone);
  uccl_engine_conn_destroy(orphan_peer);
  uccl_engine_mr_destroy(P.a, amr);
  uccl_engine_mr_destroy(P.b, bmr);
  pair_close(&P);
  free(abuf);
  free(bbuf);
  free(shadow);
  watchdog_disarm();
  return finish("test_bad_input");
}
