/* graft plugin ABI: the binary contract between the graft core and a method plugin.
 *
 * A plugin is a shared library exporting one symbol, graft_plugin_entry, which returns a
 * static table. The core sends requests through `call`; the plugin answers with a response
 * frame (or an error message) in a buffer it allocates and the core returns through `free`.
 * ABI version 1: a request is UTF-8 JSON. ABI version 2: a request is a frame (the same
 * layout as a response frame: JSON, then a safetensors blob). Requests:
 *   {"op":"describe"}
 *       -> frame whose JSON is a PluginDescription
 *   {"op":"patch","method":"<name>","config":{...},"graph":<GraphView>}
 *       -> frame whose JSON is a Patch, followed by a safetensors blob with Init::Data payloads
 *   {"op":"step","method":"<name>","config":{...},"step":N,"total_steps":T,"seed":S,
 *    "state":...} + blob of float32 "value/<tensor>", "grad/<tensor>", "state/<key>"   (ABI 2)
 *       -> frame whose JSON is {"state":...,"metrics":{...}}, blob "state/<key>", "set/<name>"
 * A response frame is: an 8-byte little-endian u64 N, N bytes of JSON, then the (possibly
 * empty) safetensors blob. The JSON schemas are those of the Rust crate graft-plugin-sdk.
 */
#ifndef GRAFT_PLUGIN_H
#define GRAFT_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define GRAFT_PLUGIN_ABI_VERSION 2
#define GRAFT_PLUGIN_ABI_MIN_VERSION 1

/* A byte buffer; owned by whoever allocated it. */
typedef struct graft_bytes {
  uint8_t *ptr;
  size_t len;
} graft_bytes;

typedef struct graft_host {
  const void *ctx;
  /* Lends a read-only view of an existing initializer's raw little-endian bytes. Returns 0 and
     sets *data and *len on success, non-zero if the tensor is unknown. The view is valid until
     `call` returns. May be NULL when the core lends no tensors. */
  int32_t (*tensor_view)(const void *ctx, const uint8_t *name, size_t name_len,
                         const uint8_t **data, size_t *len);
} graft_host;

typedef struct graft_plugin_table {
  uint32_t abi_version; /* GRAFT_PLUGIN_ABI_VERSION, or 1 for a plugin speaking ABI 1 */
  uint32_t table_size;  /* sizeof(graft_plugin_table) */
  const char *name;     /* NUL-terminated, static */
  const char *version;  /* NUL-terminated, static */
  /* request: UTF-8 JSON (ABI 1) or a frame (ABI 2). On return *reply is allocated by the plugin; 0 = ok (reply = response
     frame), non-zero = error (reply = UTF-8 message). */
  int32_t (*call)(const graft_host *host, const uint8_t *request, size_t request_len,
                  graft_bytes *reply);
  void (*free)(graft_bytes reply); /* frees a reply allocated by this plugin's call */
} graft_plugin_table;

/* The one exported symbol. */
const graft_plugin_table *graft_plugin_entry(void);

#ifdef __cplusplus
}
#endif

#endif /* GRAFT_PLUGIN_H */
