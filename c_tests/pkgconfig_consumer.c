/* Built by check_pkg_config.cmake with nothing but pkg-config's flags (and once through UCCL's
 * library name, -luccl_p2p): create an engine, read its metadata, destroy it. */
#include <stdio.h>
#include <string.h>

#include <uccl_engine.h>

int main(void) {
  uccl_engine_t *e = uccl_engine_create(1, false);
  char *md = NULL;
  int ok;
  if (!e) {
    char err[256];
    uccl_engine_last_error(err, sizeof err);
    fprintf(stderr, "uccl_engine_create failed: %s\n", err);
    return 1;
  }
  ok = uccl_engine_get_metadata(e, &md) == UCCL_STATUS_OK && md && strchr(md, '?');
  printf("metadata: %s\n", md ? md : "(none)");
  uccl_engine_free_string(md);
  uccl_engine_destroy(e);
  printf("pkgconfig_consumer: %s\n", ok ? "PASSED" : "FAILED");
  return ok ? 0 : 1;
}
