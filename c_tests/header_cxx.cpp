// The generated header must be usable from C++17 as-is: this file fails to compile on C-only
// constructs and fails to link if the declarations lack C linkage. (In C++ the header also pulls
// in uccl_tcpx/engine_cxx.hpp; the C functions called here are the extern "C" ones.)
#include "uccl_engine.h"

#include <cstdio>
#include <cstring>

static_assert(sizeof(FifoItem) == 64, "FifoItem is a 64-byte wire record");
static_assert(sizeof(notify_msg_t) == 512, "notify_msg_t is name[256] + msg[256]");
static_assert(FIFO_SIZE == 64 && MSG_SIZE == 256 && IPC_INFO_SIZE == 128, "size macros");

int main() {
  int failures = 0;
  if (sizeof(FifoItem) != 64) {
    std::fprintf(stderr, "sizeof(FifoItem) = %zu, want 64\n", sizeof(FifoItem));
    failures++;
  }
  if (sizeof(notify_msg_t) != 512) {
    std::fprintf(stderr, "sizeof(notify_msg_t) = %zu, want 512\n", sizeof(notify_msg_t));
    failures++;
  }
  const char* ok = uccl_engine_status_str(UCCL_STATUS_OK);
  if (ok == nullptr || ok[0] == '\0') {
    std::fprintf(stderr, "uccl_engine_status_str(UCCL_STATUS_OK) is empty\n");
    failures++;
  }
  FifoItem item{};
  item.addr = 0x1122334455667788ull;
  item.size = 4096;
  char raw[FIFO_SIZE];
  FifoItem back{};
  uccl_engine_serialize_fifo_item(&item, raw);
  uccl_engine_deserialize_fifo_item(raw, &back);
  if (std::memcmp(&item, &back, sizeof item) != 0) {
    std::fprintf(stderr, "FifoItem did not survive serialize/deserialize\n");
    failures++;
  }
  std::printf("header_cxx: %s\n", failures ? "FAILED" : "PASSED");
  return failures ? 1 : 0;
}
