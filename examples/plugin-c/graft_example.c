/* A graft method plugin in plain C99, written against include/graft_plugin.h alone.
 *
 * Method `scale_v`: IA3-style learned scaling of every value projection's output,
 * v' = v ⊙ s with s [out_features] trainable and initialised to one, so the model is unchanged
 * until s is trained. The patch records a `scale_output` fold, so `graft merge` multiplies the
 * columns of W_v (and its bias) by s and removes the Mul.
 *
 * The plugin reads the JSON request with a small parser below and writes its JSON reply by
 * hand. Build:
 *   cc -std=c99 -shared -fPIC -I plugins/sdk/include -o libgraft_example_c.so \
 *      examples/plugin-c/graft_example.c
 * and load with `graft apply --plugin ./libgraft_example_c.so -m scale_v ...`.
 */

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graft_plugin.h"

/* ---------- A growable byte buffer ---------- */

typedef struct buffer {
  uint8_t *data;
  size_t len, cap;
  int failed; /* set when an allocation failed; the buffer is then unusable */
} buffer;

static void buffer_reserve(buffer *b, size_t extra) {
  if (b->failed || b->len + extra <= b->cap) return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra) cap *= 2;
  uint8_t *data = realloc(b->data, cap);
  if (!data) {
    b->failed = 1;
    return;
  }
  b->data = data;
  b->cap = cap;
}

static void buffer_bytes(buffer *b, const void *bytes, size_t len) {
  buffer_reserve(b, len);
  if (b->failed) return;
  memcpy(b->data + b->len, bytes, len);
  b->len += len;
}

static void buffer_str(buffer *b, const char *s) { buffer_bytes(b, s, strlen(s)); }

static void buffer_printf(buffer *b, const char *format, ...) {
  char small[64];
  va_list args;
  va_start(args, format);
  int n = vsnprintf(small, sizeof small, format, args);
  va_end(args);
  if (n > 0) buffer_bytes(b, small, (size_t)n < sizeof small ? (size_t)n : sizeof small - 1);
}

/* Appends `s` as a JSON string literal. */
static void buffer_json_string(buffer *b, const char *s) {
  buffer_str(b, "\"");
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p == '"' || *p == '\\') {
      char escaped[2] = {'\\', (char)*p};
      buffer_bytes(b, escaped, 2);
    } else if (*p < 0x20) {
      buffer_printf(b, "\\u%04x", *p);
    } else {
      buffer_bytes(b, p, 1);
    }
  }
  buffer_str(b, "\"");
}

/* ---------- A small JSON reader ---------- */

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_type;

/* A parsed value. Arrays and objects chain their members through `child` and `next`; an
 * object member's name is in `key`. Strings are unescaped and NUL-terminated. */
typedef struct json {
  json_type type;
  double number;
  char *string;
  char *key;
  struct json *child, *next;
} json;

typedef struct parser {
  const char *at, *end;
  const char *error;
} parser;

static void json_free(json *value) {
  while (value) {
    json *next = value->next;
    json_free(value->child);
    free(value->string);
    free(value->key);
    free(value);
    value = next;
  }
}

static void skip_space(parser *p) {
  while (p->at < p->end && (*p->at == ' ' || *p->at == '\n' || *p->at == '\r' || *p->at == '\t'))
    p->at++;
}

static void put_utf8(buffer *b, unsigned long code) {
  unsigned char out[4];
  size_t n;
  if (code < 0x80) {
    out[0] = (unsigned char)code;
    n = 1;
  } else if (code < 0x800) {
    out[0] = (unsigned char)(0xC0 | (code >> 6));
    out[1] = (unsigned char)(0x80 | (code & 0x3F));
    n = 2;
  } else if (code < 0x10000) {
    out[0] = (unsigned char)(0xE0 | (code >> 12));
    out[1] = (unsigned char)(0x80 | ((code >> 6) & 0x3F));
    out[2] = (unsigned char)(0x80 | (code & 0x3F));
    n = 3;
  } else {
    out[0] = (unsigned char)(0xF0 | (code >> 18));
    out[1] = (unsigned char)(0x80 | ((code >> 12) & 0x3F));
    out[2] = (unsigned char)(0x80 | ((code >> 6) & 0x3F));
    out[3] = (unsigned char)(0x80 | (code & 0x3F));
    n = 4;
  }
  buffer_bytes(b, out, n);
}

static int read_hex4(parser *p, unsigned long *code) {
  if (p->end - p->at < 4) return 0;
  *code = 0;
  for (int i = 0; i < 4; i++) {
    char c = *p->at++;
    *code <<= 4;
    if (c >= '0' && c <= '9') *code |= (unsigned long)(c - '0');
    else if (c >= 'a' && c <= 'f') *code |= (unsigned long)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') *code |= (unsigned long)(c - 'A' + 10);
    else return 0;
  }
  return 1;
}

/* Parses a string literal at p->at (which is '"'); returns a malloc'd, unescaped copy. */
static char *parse_string(parser *p) {
  buffer out = {0};
  p->at++;
  while (p->at < p->end && *p->at != '"') {
    char c = *p->at++;
    if (c != '\\') {
      buffer_bytes(&out, &c, 1);
      continue;
    }
    if (p->at >= p->end) break;
    char e = *p->at++;
    unsigned long code;
    switch (e) {
      case '"': case '\\': case '/': buffer_bytes(&out, &e, 1); break;
      case 'b': buffer_str(&out, "\b"); break;
      case 'f': buffer_str(&out, "\f"); break;
      case 'n': buffer_str(&out, "\n"); break;
      case 'r': buffer_str(&out, "\r"); break;
      case 't': buffer_str(&out, "\t"); break;
      case 'u':
        if (!read_hex4(p, &code)) {
          p->error = "bad \\u escape";
          free(out.data);
          return NULL;
        }
        if (code >= 0xD800 && code < 0xDC00 && p->end - p->at >= 6 && p->at[0] == '\\' &&
            p->at[1] == 'u') {
          unsigned long low;
          p->at += 2;
          if (!read_hex4(p, &low) || low < 0xDC00 || low > 0xDFFF) {
            p->error = "bad surrogate pair";
            free(out.data);
            return NULL;
          }
          code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
        }
        put_utf8(&out, code);
        break;
      default:
        p->error = "bad escape";
        free(out.data);
        return NULL;
    }
  }
  if (p->at >= p->end) {
    p->error = "unterminated string";
    free(out.data);
    return NULL;
  }
  p->at++;
  buffer_bytes(&out, "", 1);
  if (out.failed) {
    p->error = "out of memory";
    free(out.data);
    return NULL;
  }
  return (char *)out.data;
}

static json *parse_value(parser *p, int depth);

/* Parses the members of an array or object after its opening bracket. */
static json *parse_members(parser *p, json *container, char close, int depth) {
  json **tail = &container->child;
  skip_space(p);
  if (p->at < p->end && *p->at == close) {
    p->at++;
    return container;
  }
  for (;;) {
    char *key = NULL;
    if (close == '}') {
      skip_space(p);
      if (p->at >= p->end || *p->at != '"') {
        p->error = "expected a member name";
        return NULL;
      }
      key = parse_string(p);
      if (!key) return NULL;
      skip_space(p);
      if (p->at >= p->end || *p->at != ':') {
        free(key);
        p->error = "expected ':'";
        return NULL;
      }
      p->at++;
    }
    json *member = parse_value(p, depth + 1);
    if (!member) {
      free(key);
      return NULL;
    }
    member->key = key;
    *tail = member;
    tail = &member->next;
    skip_space(p);
    if (p->at < p->end && *p->at == ',') {
      p->at++;
      continue;
    }
    if (p->at < p->end && *p->at == close) {
      p->at++;
      return container;
    }
    p->error = "expected ',' or a closing bracket";
    return NULL;
  }
}

static json *parse_value(parser *p, int depth) {
  if (depth > 64) {
    p->error = "nested too deeply";
    return NULL;
  }
  skip_space(p);
  if (p->at >= p->end) {
    p->error = "unexpected end of input";
    return NULL;
  }
  json *value = calloc(1, sizeof *value);
  if (!value) {
    p->error = "out of memory";
    return NULL;
  }
  char c = *p->at;
  if (c == '{' || c == '[') {
    p->at++;
    value->type = c == '{' ? JSON_OBJECT : JSON_ARRAY;
    if (!parse_members(p, value, c == '{' ? '}' : ']', depth)) {
      json_free(value);
      return NULL;
    }
  } else if (c == '"') {
    value->type = JSON_STRING;
    value->string = parse_string(p);
    if (!value->string) {
      json_free(value);
      return NULL;
    }
  } else if (p->end - p->at >= 4 && !strncmp(p->at, "true", 4)) {
    value->type = JSON_BOOL;
    value->number = 1;
    p->at += 4;
  } else if (p->end - p->at >= 5 && !strncmp(p->at, "false", 5)) {
    value->type = JSON_BOOL;
    p->at += 5;
  } else if (p->end - p->at >= 4 && !strncmp(p->at, "null", 4)) {
    value->type = JSON_NULL;
    p->at += 4;
  } else {
    char digits[64];
    size_t n = 0;
    while (p->at < p->end && n + 1 < sizeof digits && strchr("+-0123456789.eE", *p->at))
      digits[n++] = *p->at++;
    digits[n] = '\0';
    char *stop;
    value->type = JSON_NUMBER;
    value->number = strtod(digits, &stop);
    if (n == 0 || *stop != '\0') {
      p->error = "invalid value";
      json_free(value);
      return NULL;
    }
  }
  return value;
}

static json *json_get(const json *object, const char *key) {
  if (!object || object->type != JSON_OBJECT) return NULL;
  for (json *member = object->child; member; member = member->next)
    if (member->key && !strcmp(member->key, key)) return member;
  return NULL;
}

static const char *json_string(const json *object, const char *key) {
  json *value = json_get(object, key);
  return value && value->type == JSON_STRING ? value->string : NULL;
}

/* ---------- The plugin ---------- */

static const char DESCRIPTION[] =
    "{\"name\":\"example-c\",\"version\":\"0.1.0\",\"methods\":[{\"name\":\"scale_v\","
    "\"summary\":\"IA3-style learned scaling of every value projection's output, starting at "
    "one\",\"config\":[]}]}";

/* The element type of initializer `name`, from the graph view's tensor list. */
static const char *tensor_dtype(const json *graph, const char *name) {
  json *tensors = json_get(graph, "tensors");
  for (json *t = tensors ? tensors->child : NULL; t; t = t->next) {
    const char *tensor_name = json_string(t, "name");
    if (tensor_name && !strcmp(tensor_name, name)) return json_string(t, "dtype");
  }
  return NULL;
}

/* Writes the patch for every `v` site of `graph` into `out`; returns an error or NULL. */
static const char *build_patch(const json *graph, buffer *out) {
  buffer parameters = {0}, nodes = {0}, rewires = {0}, folds = {0};
  const char *error = NULL;
  int n_sites = 0;
  json *stacks = json_get(graph, "stacks");
  for (json *stack = stacks ? stacks->child : NULL; stack; stack = stack->next) {
    json *layers = json_get(stack, "layers");
    for (json *layer = layers ? layers->child : NULL; layer; layer = layer->next) {
      json *sites = json_get(layer, "sites");
      for (json *site = sites ? sites->child : NULL; site; site = site->next) {
        const char *kind = json_string(site, "kind");
        if (!kind || strcmp(kind, "v")) continue;
        const char *weight = json_string(site, "weight");
        const char *output = json_string(site, "output");
        const char *layout = json_string(site, "layout");
        const char *node = json_string(site, "node");
        const char *label = json_string(site, "label");
        const char *bias = json_string(site, "bias");
        json *out_features = json_get(site, "out_features");
        if (!weight || !output || !layout || !node || !out_features ||
            out_features->type != JSON_NUMBER) {
          error = "a v site lacks weight, output, layout, node or out_features";
          goto done;
        }
        const char *dtype = tensor_dtype(graph, weight);
        if (!dtype) {
          error = "a v site's weight is not among the graph's tensors";
          goto done;
        }
        const char *stem = label ? label : node;
        char *scale = malloc(strlen(stem) + 32), *mul = malloc(strlen(stem) + 32),
             *scaled = malloc(strlen(stem) + 40);
        if (!scale || !mul || !scaled) {
          free(scale);
          free(mul);
          free(scaled);
          error = "out of memory";
          goto done;
        }
        sprintf(scale, "scale_v.%s.scale", stem);
        sprintf(mul, "scale_v.%s.mul", stem);
        sprintf(scaled, "scale_v.%s.mul.out", stem);
        const char *separator = n_sites ? "," : "";

        buffer_str(&parameters, separator);
        buffer_str(&parameters, "{\"name\":");
        buffer_json_string(&parameters, scale);
        buffer_str(&parameters, ",\"dtype\":");
        buffer_json_string(&parameters, dtype);
        buffer_printf(&parameters, ",\"shape\":[%.0f]", out_features->number);
        buffer_str(&parameters, ",\"init\":{\"kind\":\"ones\"},\"trainable\":true}");

        buffer_str(&nodes, separator);
        buffer_str(&nodes, "{\"name\":");
        buffer_json_string(&nodes, mul);
        buffer_str(&nodes, ",\"op_type\":\"Mul\",\"inputs\":[");
        buffer_json_string(&nodes, output);
        buffer_str(&nodes, ",");
        buffer_json_string(&nodes, scale);
        buffer_str(&nodes, "],\"outputs\":[");
        buffer_json_string(&nodes, scaled);
        buffer_str(&nodes, "]}");

        buffer_str(&rewires, separator);
        buffer_str(&rewires, "{\"value\":");
        buffer_json_string(&rewires, output);
        buffer_str(&rewires, ",\"replacement\":");
        buffer_json_string(&rewires, scaled);
        buffer_str(&rewires, "}");

        buffer_str(&folds, separator);
        buffer_str(&folds, "{\"kind\":\"scale_output\",\"weight\":");
        buffer_json_string(&folds, weight);
        if (bias) {
          buffer_str(&folds, ",\"bias\":");
          buffer_json_string(&folds, bias);
        }
        buffer_str(&folds, ",\"vector\":");
        buffer_json_string(&folds, scale);
        buffer_str(&folds, ",\"layout\":");
        buffer_json_string(&folds, layout);
        buffer_str(&folds, ",\"branch_nodes\":[");
        buffer_json_string(&folds, mul);
        buffer_str(&folds, "],\"branch_output\":");
        buffer_json_string(&folds, scaled);
        buffer_str(&folds, ",\"base_output\":");
        buffer_json_string(&folds, output);
        buffer_str(&folds, "}");

        free(scale);
        free(mul);
        free(scaled);
        n_sites++;
      }
    }
  }
  if (n_sites == 0) {
    error = "scale_v: the model has no value projection (v site)";
    goto done;
  }
  buffer_str(out, "{\"parameters\":[");
  buffer_bytes(out, parameters.data, parameters.len);
  buffer_str(out, "],\"nodes\":[");
  buffer_bytes(out, nodes.data, nodes.len);
  buffer_str(out, "],\"rewires\":[");
  buffer_bytes(out, rewires.data, rewires.len);
  buffer_str(out, "],\"folds\":[");
  buffer_bytes(out, folds.data, folds.len);
  buffer_str(out, "]}");
  if (parameters.failed || nodes.failed || rewires.failed || folds.failed || out->failed)
    error = "out of memory";
done:
  free(parameters.data);
  free(nodes.data);
  free(rewires.data);
  free(folds.data);
  return error;
}

static int32_t reply_error(const char *message, graft_bytes *reply) {
  size_t len = strlen(message);
  reply->ptr = malloc(len ? len : 1);
  reply->len = reply->ptr ? len : 0;
  if (reply->ptr) memcpy(reply->ptr, message, len);
  return 1;
}

/* Stores a response frame (8-byte little-endian JSON length, the JSON, no tensor blob). */
static int32_t reply_frame(const buffer *json_text, graft_bytes *reply) {
  uint8_t *frame = malloc(8 + json_text->len);
  if (!frame) return reply_error("out of memory", reply);
  uint64_t n = json_text->len;
  for (int i = 0; i < 8; i++) frame[i] = (uint8_t)(n >> (8 * i));
  memcpy(frame + 8, json_text->data, json_text->len);
  reply->ptr = frame;
  reply->len = 8 + json_text->len;
  return 0;
}

static int32_t example_call(const graft_host *host, const uint8_t *request, size_t request_len,
                            graft_bytes *reply) {
  (void)host;
  parser p = {(const char *)request, (const char *)request + request_len, NULL};
  json *root = parse_value(&p, 0);
  if (!root) return reply_error(p.error ? p.error : "invalid request", reply);
  const char *op = json_string(root, "op");
  const char *method = json_string(root, "method");
  int32_t status;
  buffer out = {0};
  if (op && !strcmp(op, "describe")) {
    buffer_str(&out, DESCRIPTION);
    status = out.failed ? reply_error("out of memory", reply) : reply_frame(&out, reply);
  } else if (op && !strcmp(op, "patch") && method && !strcmp(method, "scale_v")) {
    const char *error = build_patch(json_get(root, "graph"), &out);
    status = error ? reply_error(error, reply) : reply_frame(&out, reply);
  } else {
    status = reply_error("example-c: unknown request (it knows describe and patch scale_v)",
                         reply);
  }
  free(out.data);
  json_free(root);
  return status;
}

static void example_free(graft_bytes reply) { free(reply.ptr); }

/* ABI version 1: requests arrive as plain JSON, which is all this plugin parses. The host
   still speaks version 1 (GRAFT_PLUGIN_ABI_MIN_VERSION); a version-2 plugin receives frames. */
static const graft_plugin_table TABLE = {
    1, sizeof(graft_plugin_table), "example-c", "0.1.0",
    example_call,            example_free,
};

const graft_plugin_table *graft_plugin_entry(void) { return &TABLE; }
