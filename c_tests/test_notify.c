/* Notifications: exact binary payloads, truncation to MSG_SIZE in the fixed form and whole messages
 * in the variable one, name_len honoured, ordering, and draining one at a time. */
#include "harness.h"

#define NUM_BURST 20

static pair_t P;

typedef struct {
  char name[MSG_SIZE];
  uint8_t msg[MSG_SIZE]; /* expected bytes on receipt, zero padded */
} expect_t;

/* Collects exactly one notification, bounded; capacity 1 must never write past out[0]. */
static bool get_one(notify_msg_t *out, unsigned timeout_ms) {
  notify_msg_t buf[2];
  double deadline = now_ms() + timeout_ms;
  memset(&buf[1], 0x77, sizeof buf[1]);
  for (;;) {
    size_t n = uccl_engine_get_notifs(buf, 1);
    if (n > 1) {
      fprintf(stderr, "  get_notifs(capacity 1) returned %zu\n", n);
      note_failure();
      return false;
    }
    if (n == 1) {
      notify_msg_t guard;
      memset(&guard, 0x77, sizeof guard);
      CHECKF(memcmp(&buf[1], &guard, sizeof guard) == 0, "get_notifs wrote past its capacity");
      *out = buf[0];
      return true;
    }
    if (now_ms() > deadline) return false;
    sleep_ms(1);
  }
}

static void check_notif(const notify_msg_t *got, const expect_t *want, const char *what) {
  size_t name_len = strlen(want->name);
  CHECKF(memchr(got->name, '\0', sizeof got->name) != NULL, "%s: name not NUL-terminated", what);
  CHECKF(strncmp(got->name, want->name, sizeof got->name) == 0, "%s: name \"%.*s\", want \"%s\"",
         what, (int)sizeof got->name, got->name, want->name);
  for (size_t i = name_len; i < sizeof got->name; i++)
    if (got->name[i] != '\0') {
      fprintf(stderr, "  %s: name byte %zu after the terminator is 0x%02x\n", what, i,
              (unsigned)(uint8_t)got->name[i]);
      note_failure();
      break;
    }
  CHECKF(check_bytes((const uint8_t *)got->msg, want->msg, MSG_SIZE, what), "%s: msg differs", what);
}

/* Collects `want` entries through uccl_engine_get_notifs_v, one per call: capacity 1 must never
 * write past out[0]. */
static size_t get_whole(uccl_notif_v_t *out, size_t want, unsigned timeout_ms) {
  size_t have = 0;
  double deadline = now_ms() + timeout_ms;
  while (have < want && now_ms() < deadline) {
    uccl_notif_v_t buf[2];
    memset(buf, 0x77, sizeof buf);
    size_t n = uccl_engine_get_notifs_v(buf, 1);
    uint8_t guard[sizeof buf[1]];
    memset(guard, 0x77, sizeof guard);
    CHECKF(memcmp(&buf[1], guard, sizeof guard) == 0, "get_notifs_v wrote past its capacity");
    CHECKF(n <= 1, "get_notifs_v(capacity 1) returned %zu", n);
    if (n == 1)
      out[have++] = buf[0];
    else
      sleep_ms(1);
  }
  return have;
}

/* The variable-length form: messages of any size come back whole, zero bytes included, from the
 * same queue the fixed form drains. */
static void test_whole_messages(void) {
  const size_t big_len = 3 * 1024 * 1024 + 7;
  uint8_t *big = xalloc(big_len);
  notify_msg_t fixed;
  uccl_notif_v_t got[3];
  char err[256];
  int seen = 0;

  fill_pattern(big, big_len, 60);
  big[0] = 0;
  big[big_len - 1] = 0;
  CHECK_EQ(uccl_engine_send_notif_v(P.conn_a, "whole-big-and-ignored", 9, big, big_len),
           UCCL_STATUS_OK);
  CHECK_EQ(uccl_engine_send_notif_v(P.conn_b, "whole-empty", 11, NULL, 0), UCCL_STATUS_OK);
  memset(&fixed, 0, sizeof fixed);
  strcpy(fixed.name, "whole-fixed");
  fill_pattern((uint8_t *)fixed.msg, MSG_SIZE, 61);
  CHECK_EQ(uccl_engine_send_notif(P.conn_a, &fixed), UCCL_STATUS_OK);

  /* Bad arguments: capacity 0 is a no-op, a NULL array with room is refused and drains nothing. */
  CHECK_EQ(uccl_engine_get_notifs_v(NULL, 0), 0);
  CHECK_EQ(uccl_engine_get_notifs_v(NULL, 4), 0);
  last_error_text(err, sizeof err);
  CHECKF(strstr(err, "out") != NULL, "last error \"%s\"", err);

  REQUIRE(get_whole(got, 3, DEFAULT_WAIT_MS) == 3);
  for (int i = 0; i < 3; i++) {
    const uccl_notif_v_t *n = &got[i];
    REQUIRE(n->name != NULL && n->msg != NULL);
    CHECKF(n->name[n->name_len] == '\0' && n->msg[n->msg_len] == '\0',
           "entry %d is not NUL-terminated after its bytes", i);
    CHECKF(strlen(n->name) == n->name_len, "entry %d: name_len %zu", i, n->name_len);
    if (strcmp(n->name, "whole-big") == 0) {
      seen |= 1;
      CHECK_EQ(n->msg_len, big_len);
      if (n->msg_len == big_len)
        CHECK(check_bytes((const uint8_t *)n->msg, big, big_len, "the 3 MiB message"));
    } else if (strcmp(n->name, "whole-empty") == 0) {
      seen |= 2;
      CHECK_EQ(n->msg_len, 0);
    } else if (strcmp(n->name, "whole-fixed") == 0) {
      seen |= 4;
      /* The fixed form always sends all MSG_SIZE bytes. */
      CHECK_EQ(n->msg_len, MSG_SIZE);
      if (n->msg_len == MSG_SIZE)
        CHECK(check_bytes((const uint8_t *)n->msg, (const uint8_t *)fixed.msg, MSG_SIZE,
                          "the fixed message"));
    } else {
      fprintf(stderr, "  unexpected notification \"%s\"\n", n->name);
      note_failure();
    }
  }
  CHECK_EQ(seen, 7);

  /* Freeing clears the entry, so a second free (and a NULL one) is a no-op. */
  for (int i = 0; i < 3; i++) {
    uccl_engine_free_notif_v(&got[i]);
    CHECK(got[i].name == NULL && got[i].msg == NULL && got[i].name_len == 0 && got[i].msg_len == 0);
    uccl_engine_free_notif_v(&got[i]);
  }
  uccl_engine_free_notif_v(NULL);

  /* Both forms drain one queue: nothing is left for either. */
  sleep_ms(100);
  {
    notify_msg_t rest;
    uccl_notif_v_t rest_v;
    CHECK_EQ(uccl_engine_get_notifs(&rest, 1), 0);
    CHECK_EQ(uccl_engine_get_notifs_v(&rest_v, 1), 0);
  }
  free(big);
}

int main(void) {
  notify_msg_t n1, got;
  expect_t want[3 + NUM_BURST];
  uint8_t long_msg[1000], short_msg[10];
  const char *long_name_buf = "bravo-and-ignored-suffix";
  int k = 0;

  test_begin("test_notify", 100);
  REQUIRE(pair_open(&P));
  /* The receiving side listens for notifications on its connection. */
  CHECK_EQ(uccl_engine_start_listener(P.conn_b), UCCL_STATUS_OK);

  /* Nothing may be queued before anything was sent. */
  CHECK_EQ(uccl_engine_get_notifs(&got, 1), 0);

  /* 1: fixed-size struct; every msg byte is significant, zeros included, and bytes after the
   * name's terminator are not part of the name. */
  memset(&n1, 0, sizeof n1);
  strcpy(n1.name, "alpha");
  memset(n1.name + 6, 'Z', 20);
  for (size_t i = 0; i < MSG_SIZE; i++) n1.msg[i] = (char)pattern_byte(i, 31);
  n1.msg[0] = 0;
  n1.msg[1] = 0;
  n1.msg[128] = 0;
  n1.msg[200] = (char)0xff;
  n1.msg[MSG_SIZE - 1] = 0;
  n1.msg[MSG_SIZE - 2] = 0x01;
  memset(&want[k], 0, sizeof want[k]);
  strcpy(want[k].name, "alpha");
  memcpy(want[k].msg, n1.msg, MSG_SIZE);
  k++;
  CHECK_EQ(uccl_engine_send_notif(P.conn_a, &n1), UCCL_STATUS_OK);

  /* 2: a 1000-byte message arrives truncated to MSG_SIZE; only name_len bytes of the name count. */
  fill_pattern(long_msg, sizeof long_msg, 32);
  long_msg[5] = 0;
  memset(&want[k], 0, sizeof want[k]);
  strcpy(want[k].name, "bravo");
  memcpy(want[k].msg, long_msg, MSG_SIZE);
  k++;
  CHECK_EQ(uccl_engine_send_notif_v(P.conn_a, long_name_buf, 5, long_msg, sizeof long_msg),
           UCCL_STATUS_OK);

  /* 3: a short message arrives zero padded. */
  fill_pattern(short_msg, sizeof short_msg, 33);
  short_msg[9] = (uint8_t)0xff;
  memset(&want[k], 0, sizeof want[k]);
  strcpy(want[k].name, "charlie");
  memcpy(want[k].msg, short_msg, sizeof short_msg);
  k++;
  CHECK_EQ(uccl_engine_send_notif_v(P.conn_a, "charlie", 7, short_msg, sizeof short_msg),
           UCCL_STATUS_OK);

  /* A burst checks ordering over more than a handful of frames. */
  for (int i = 0; i < NUM_BURST; i++) {
    uint8_t m[MSG_SIZE];
    size_t len = (size_t)(i * 37 % MSG_SIZE) + 1;
    fill_pattern(m, len, 100u + (uint32_t)i);
    memset(&want[k], 0, sizeof want[k]);
    snprintf(want[k].name, sizeof want[k].name, "burst-%02d", i);
    memcpy(want[k].msg, m, len);
    CHECK_EQ(uccl_engine_send_notif_v(P.conn_a, want[k].name, strlen(want[k].name), m, len),
             UCCL_STATUS_OK);
    k++;
  }

  for (int i = 0; i < k; i++) {
    char what[MSG_SIZE + 32];
    snprintf(what, sizeof what, "notification %d (%.64s)", i, want[i].name);
    if (!get_one(&got, DEFAULT_WAIT_MS)) {
      fprintf(stderr, "  %s never arrived\n", what);
      note_failure();
      break;
    }
    check_notif(&got, &want[i], what);
  }

  /* Everything was drained; nothing extra may show up. */
  sleep_ms(200);
  {
    notify_msg_t rest[4];
    CHECK_EQ(uccl_engine_get_notifs(rest, 4), 0);
  }

  test_whole_messages();

  pair_close(&P);
  watchdog_disarm();
  return finish("test_notify");
}
