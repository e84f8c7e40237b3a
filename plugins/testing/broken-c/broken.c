/* A deliberately broken graft plugin in C, for the process-isolation tests: method `broken`
 * misbehaves as the environment says.
 *
 *   GRAFT_TEST_BROKEN     segfault | abort | exit | hang | alloc  (what to do; default: an
 *                         ordinary error reply)
 *   GRAFT_TEST_BROKEN_AT  describe | patch                        (when; default: patch)
 *
 * `alloc` asks for 64 GiB and aborts when it is refused, as a Rust plugin does on a failed
 * allocation. Build: cc -std=c99 -shared -fPIC -I plugins/sdk/include -o libbroken.so broken.c
 */

#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graft_plugin.h"

static const char DESCRIPTION[] =
    "{\"name\":\"broken\",\"version\":\"0.1.0\",\"methods\":[{\"name\":\"broken\","
    "\"summary\":\"misbehaves as GRAFT_TEST_BROKEN says\",\"config\":[]}]}";

static void misbehave(void) {
  const char *mode = getenv("GRAFT_TEST_BROKEN");
  if (!mode) return;
  if (strcmp(mode, "segfault") == 0) {
    volatile int *nowhere = NULL;
    *nowhere = 1;
  } else if (strcmp(mode, "abort") == 0) {
    abort();
  } else if (strcmp(mode, "exit") == 0) {
    exit(0);
  } else if (strcmp(mode, "hang") == 0) {
    for (;;) pause();
  } else if (strcmp(mode, "alloc") == 0) {
    size_t size = (size_t)64 << 30;
    char *block = malloc(size);
    if (!block) abort();
    memset(block, 1, size);
  }
}

static int32_t reply_with(graft_bytes *reply, const char *text, int frame) {
  size_t len = strlen(text), prefix = frame ? 8 : 0;
  uint8_t *data = malloc(prefix + len);
  if (!data) return 1;
  for (size_t i = 0; i < prefix; i++) data[i] = (uint8_t)((uint64_t)len >> (8 * i));
  memcpy(data + prefix, text, len);
  reply->ptr = data;
  reply->len = prefix + len;
  return frame ? 0 : 1;
}

static int32_t call(const graft_host *host, const uint8_t *request, size_t request_len,
                    graft_bytes *reply) {
  (void)host;
  const char *at = getenv("GRAFT_TEST_BROKEN_AT");
  int describe = request_len >= 17 && memmem(request, request_len, "\"describe\"", 10) != NULL;
  if (describe == (at && strcmp(at, "describe") == 0)) misbehave();
  if (describe) return reply_with(reply, DESCRIPTION, 1);
  return reply_with(reply, "broken: no misbehaviour was asked for", 0);
}

static void release(graft_bytes reply) { free(reply.ptr); }

static const graft_plugin_table TABLE = {1, sizeof(graft_plugin_table), "broken", "0.1.0",
                                         call, release};

const graft_plugin_table *graft_plugin_entry(void) { return &TABLE; }
