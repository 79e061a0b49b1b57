// An acknowledged-message baseline outside the bench, to check its anchor against: a forked server
// process and a client, STREAMS TCP connections over loopback, each message split evenly over them;
// per message every client thread writes its part, the server's thread for that stream reads it
// and answers one byte, and the next message starts once every part was answered (depth 1, as the
// bench's `msg` anchor). Prints time per message, GB/s and CPU per message of both processes.
// OFFSET moves every buffer that many bytes past a page start (the bench's are page aligned), to
// see what the kernel's copies pay for buffers as a plain malloc places them (16 bytes in).
//   gcc -O2 -pthread -o raw_msg scripts/diag/raw_msg.c
//   ./raw_msg STREAMS BYTES MESSAGES [OFFSET [huge]]     ("huge": on transparent huge pages)
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int messages, huge, offset;
static size_t part;
static pthread_barrier_t turn;

static void die(const char *what) { perror(what); exit(1); }

static void io_all(int fd, char *b, size_t n, int sending) {
  while (n) {
    ssize_t r = sending ? send(fd, b, n, MSG_NOSIGNAL) : recv(fd, b, n, 0);
    if (r <= 0) die(sending ? "send" : "recv");
    b += r;
    n -= (size_t)r;
  }
}

// A part's buffer, OFFSET bytes into a page, touched once; with `huge`, starting a 2 MiB extent and
// advised for huge pages (the mapping has room for the alignment, the offset and the part).
static char *buffer(void) {
  const size_t extent = 2u << 20;
  size_t room = part + 4096;
  size_t len = huge ? room + extent : room;
  char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) die("mmap");
  if (huge) {
    p = (char *)(((unsigned long)p + extent - 1) & ~(extent - 1));
    madvise(p, room, MADV_HUGEPAGE);
  }
  p += offset;
  memset(p, 1, part);
  return p;
}

static void *client(void *arg) {
  int fd = (int)(long)arg;
  char *b = buffer(), ack;
  for (int m = 0; m < messages; m++) {
    pthread_barrier_wait(&turn);
    io_all(fd, b, part, 1);
    io_all(fd, &ack, 1, 0);
  }
  return NULL;
}

static void *server(void *arg) {
  int fd = (int)(long)arg;
  char *b = buffer(), ack = 1;
  for (int m = 0; m < messages; m++) {
    io_all(fd, b, part, 0);
    io_all(fd, &ack, 1, 1);
  }
  return NULL;
}

static double seconds(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s STREAMS BYTES MESSAGES [OFFSET [huge]]\n", argv[0]);
    return 2;
  }
  int streams = atoi(argv[1]), one = 1;
  size_t bytes = strtoul(argv[2], NULL, 0);
  messages = atoi(argv[3]);
  offset = argc > 4 ? atoi(argv[4]) : 0;
  huge = argc > 5 && strcmp(argv[5], "huge") == 0;
  if (streams < 1 || streams > 64 || bytes < (size_t)streams || messages < 1 || offset < 0 || offset >= 4096) {
    fprintf(stderr, "1-64 streams, at least a byte per stream, at least one message, an offset below 4096\n");
    return 2;
  }
  part = bytes / streams;
  int l = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t sl = sizeof sa;
  if (l < 0 || bind(l, (void *)&sa, sl) || listen(l, 64) || getsockname(l, (void *)&sa, &sl)) die("listen");
  pthread_t t[64];
  pid_t child = fork();
  if (child < 0) die("fork");
  if (child == 0) {
    for (int i = 0; i < streams; i++) {
      int fd = accept(l, NULL, NULL);
      if (fd < 0) die("accept");
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      pthread_create(&t[i], NULL, server, (void *)(long)fd);
    }
    for (int i = 0; i < streams; i++) pthread_join(t[i], NULL);
    return 0;
  }
  int fds[64];
  for (int i = 0; i < streams; i++) {
    fds[i] = socket(AF_INET, SOCK_STREAM, 0);
    if (fds[i] < 0 || connect(fds[i], (void *)&sa, sizeof sa)) die("connect");
    setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  pthread_barrier_init(&turn, NULL, (unsigned)streams);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < streams; i++) pthread_create(&t[i], NULL, client, (void *)(long)fds[i]);
  for (int i = 0; i < streams; i++) pthread_join(t[i], NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  waitpid(child, NULL, 0);
  struct rusage self, kids;
  getrusage(RUSAGE_SELF, &self);
  getrusage(RUSAGE_CHILDREN, &kids);
  double elapsed = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  double cpu = seconds(self.ru_utime) + seconds(self.ru_stime) + seconds(kids.ru_utime) + seconds(kids.ru_stime);
  printf("%d streams, %zu-byte messages, buffers %d bytes into a page%s: %.1f us per message, %.2f GB/s, CPU %.1f us "
         "per message\n",
         streams, bytes, offset, huge ? ", huge pages" : "", elapsed / messages * 1e6,
         bytes * (double)messages / elapsed / 1e9, cpu / messages * 1e6);
  return 0;
}
