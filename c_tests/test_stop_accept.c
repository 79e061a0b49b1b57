/* stop_accept must release a thread parked in accept promptly, and keep later accepts from
 * blocking, so a host can shut down without a connection ever arriving. */
#include "harness.h"

typedef struct {
  uccl_engine_t *engine;
  uccl_conn_t *conn;
  int remote_gpu;
  char ip[64];
  char error[512];
  double returned_at;
  int done; /* guarded by mu: main polls it while the accept thread may still be running */
  pthread_mutex_t mu;
} accept_job_t;

static void *accept_thread(void *arg) {
  accept_job_t *job = (accept_job_t *)arg;
  uccl_conn_t *c = uccl_engine_accept(job->engine, job->ip, sizeof job->ip, &job->remote_gpu);
  double t = now_ms();
  last_error_text(job->error, sizeof job->error);
  pthread_mutex_lock(&job->mu);
  job->conn = c;
  job->returned_at = t;
  job->done = 1;
  pthread_mutex_unlock(&job->mu);
  return NULL;
}

static int job_done(accept_job_t *job) {
  int d;
  pthread_mutex_lock(&job->mu);
  d = job->done;
  pthread_mutex_unlock(&job->mu);
  return d;
}

int main(void) {
  accept_job_t job;
  pthread_t tid;
  double stopped_at;
  uccl_engine_t *e;

  test_begin("test_stop_accept", 100);
  e = make_engine();
  REQUIRE(e);
  memset(&job, 0, sizeof job);
  pthread_mutex_init(&job.mu, NULL);
  job.engine = e;
  REQUIRE(pthread_create(&tid, NULL, accept_thread, &job) == 0);

  sleep_ms(200);
  CHECKF(!job_done(&job), "accept returned before stop_accept was called");
  stopped_at = now_ms();
  uccl_engine_stop_accept(e);

  /* Nothing but stop_accept ends the accept: the bound only turns a hang into a failure. */
  while (!job_done(&job) && now_ms() - stopped_at < DEFAULT_WAIT_MS) sleep_ms(5);
  if (!job_done(&job)) {
    /* The thread is stuck inside the library; joining would hang the test. */
    fprintf(stderr, "accept still blocked %d ms after stop_accept\n", DEFAULT_WAIT_MS);
    return 1;
  }
  pthread_join(tid, NULL);
  printf("accept returned %.1f ms after stop_accept\n", job.returned_at - stopped_at);
  CHECK(job.conn == NULL);
  CHECKF(job.error[0] != '\0', "last_error is empty in the thread whose accept was stopped");

  /* Later accepts return at once instead of blocking. */
  {
    char ip[64], err[512];
    int gpu = -1;
    uccl_conn_t *c;
    /* A later accept that blocked would block for good: the watchdog fails it. */
    watchdog_arm(DEFAULT_WAIT_MS / 1000, "accept after stop_accept");
    c = uccl_engine_accept(e, ip, sizeof ip, &gpu);
    watchdog_arm(100, "test_stop_accept");
    CHECK(c == NULL);
    CHECK(last_error_text(err, sizeof err) > 0 && err[0] != '\0');
    uccl_engine_conn_destroy(c);
  }

  uccl_engine_destroy(e);
  pthread_mutex_destroy(&job.mu);
  watchdog_disarm();
  return finish("test_stop_accept");
}
