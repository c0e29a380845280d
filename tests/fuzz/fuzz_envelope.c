/* libFuzzer target for what a client controls before routing: the envelope
 * parser (bus/envelope) and the upgrade query parser (bus/params).
 *
 * Every input goes through both, each from a copy of its exact size so that
 * ASan sees any byte read past the end:
 *
 *   envelope  arq_env_parse(). A valid envelope is checked against the
 *             contract, rebuilt as the bus forwards it (arq_env_build with
 *             arq_env_extra), framed (arq_env_frame), and the framed JSON
 *             must parse again to the same envelope. An error must carry a
 *             stable code of the malformed class, a message that is UTF-8
 *             (it is sent inside a JSON string) and a correlation_id that is
 *             empty or a valid id.
 *   params    arq_bus_parse_params(). What it accepts must obey the name
 *             rules and the size limits of arq_client_params_t.
 *
 * FUZZ_ENVELOPE_SKIP in the environment skips what failed when this target
 * was written, so that the rest can be fuzzed until it is fixed: "utf8" the
 * check that error messages are UTF-8, "params" the params section (a long
 * channel= overflows a stack buffer), "utf8,params" both.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bus/bus.h"
#include "bus/envelope.h"
#include "bus/names.h"
#include "util/err.h"
#include "util/rcbuf.h"
#include "wire/utf8.h"

static bool skip_utf8, skip_params;

static void check(bool ok, const char *what) {
  if (!ok) {
    fprintf(stderr, "fuzz_envelope: %s\n", what);
    abort();
  }
}

static bool utf8(const char *s, size_t n) { return arq_utf8_validate((const uint8_t *)s, n) == 0; }

static bool name_ok(const char *s) { return arq_names_valid_channel(s, strlen(s)); }

/* Checks a parsed envelope against the contract in envelope.h. */
static void check_valid(const arq_env_t *e) {
  check(e->root && json_is_object(e->root), "valid envelope without an object");
  check((unsigned)e->type < ARQ_MSG_NTYPES, "type out of range");
  check(!e->room[0] || name_ok(e->room), "invalid room accepted");
  check(!e->channel[0] || name_ok(e->channel), "invalid channel accepted");
  check(!e->channel[0] || e->room[0], "channel without a room");
  check(!e->id || arq_env_valid_id(e->id), "invalid id accepted");
  check(!e->timestamp || arq_env_valid_timestamp(e->timestamp), "invalid timestamp accepted");
  check((e->type == ARQ_MSG_COMMAND) == (e->command != NULL), "command field and type disagree");
  check(!e->command || (strlen(e->command) >= 1 && strlen(e->command) <= ARQ_ENV_MAX_COMMAND), "command length");
  check((e->type == ARQ_MSG_PRIVATE) == (e->to != NULL), "to field and type disagree");
  if (e->to) {
    size_t n = json_array_size(e->to);
    check(n >= 1 && n <= ARQ_ENV_MAX_TO, "recipient count");
    for (size_t i = 0; i < n; i++) {
      json_t *id = json_array_get(e->to, i);
      check(json_is_string(id) && arq_names_valid_client_id(json_string_value(id), json_string_length(id)),
            "invalid recipient accepted");
    }
  }
  check(!e->payload || json_is_object(e->payload), "payload not an object");
  check(!e->metadata || json_is_object(e->metadata), "metadata not an object");
  check(!e->correlation_id || strlen(e->correlation_id) <= ARQ_ENV_MAX_ID, "correlation_id length");
}

/* Rebuilds 'e' as the bus forwards it, frames it, and parses the frame's
 * JSON again. */
static void round_trip(const arq_env_t *e, arq_buf_t *scratch) {
  json_t *extra = arq_env_extra(e);
  check(e->minor > 0 || extra == NULL, "extra fields in a 1.0 envelope");
  if (extra)
    check(json_object_size(extra) > 0, "empty extra object");
  arq_env_out_t o = {.type = e->type,
                     .minor = e->minor,
                     .id = e->id ? e->id : "arq_fuzz",
                     .room = e->room,
                     .channel = e->channel,
                     .from = "fuzzer",
                     .to = e->to,
                     .command = e->command,
                     .payload = e->payload,
                     .metadata = e->metadata,
                     .timestamp = e->timestamp ? e->timestamp : "2026-01-31T12:00:00.000Z",
                     .correlation_id = e->correlation_id,
                     .extra = extra};
  json_t *obj = arq_env_build(&o);
  json_decref(extra);
  check(obj != NULL, "build failed");

  size_t off = 0, len = 0;
  arq_rcbuf_t *f = arq_env_frame(obj, scratch, &off, &len);
  check(f != NULL && f->refs == 1, "frame reference");
  check(off + len == f->len, "frame length");
  check(f->data[0] == 0x81 && (f->data[1] & 0x80) == 0, "frame header");
  size_t want_hdr = len < 126 ? 2 : len < 65536 ? 4 : 10;
  check(off == want_hdr, "frame header length");
  uint64_t announced = f->data[1] & 0x7f;
  if (announced == 126) {
    announced = ((uint64_t)f->data[2] << 8) | f->data[3];
  } else if (announced == 127) {
    announced = 0;
    for (int i = 2; i < 10; i++)
      announced = (announced << 8) | f->data[i];
  }
  check(announced == len, "frame length field");
  check(utf8((const char *)f->data + off, len), "frame text is not UTF-8");

  char *dumped = json_dumps(obj, JSON_COMPACT);
  check(dumped && strlen(dumped) == len && memcmp(dumped, f->data + off, len) == 0, "frame is not the compact JSON");
  free(dumped);

  /* What the server sends parses as the same envelope. */
  arq_env_t back;
  arq_env_error_t err;
  int rc = arq_env_parse(&back, (const char *)f->data + off, len, &err);
  if (rc != 0)
    fprintf(stderr, "fuzz_envelope: reparse: %s: %s\n", arq_code_name(err.code), err.message);
  check(rc == 0, "the forwarded envelope does not parse");
  check(back.type == e->type && back.minor == e->minor, "round trip changed type or version");
  check(strcmp(back.room, e->room) == 0 && strcmp(back.channel, e->channel) == 0, "round trip changed the target");
  check(strcmp(back.id, o.id) == 0, "round trip changed the id");
  check((back.command == NULL) == (e->command == NULL) && (!e->command || strcmp(back.command, e->command) == 0),
        "round trip changed the command");
  check(e->payload ? json_equal(back.payload, e->payload) : json_object_size(back.payload) == 0,
        "round trip changed the payload");
  check(!e->metadata || json_equal(back.metadata, e->metadata), "round trip changed the metadata");
  arq_env_free(&back);

  json_decref(obj);
  arq_rcbuf_unref(f);
}

static void fuzz_envelope(const char *buf, size_t size) {
  static arq_buf_t scratch; /* reused across runs, as the bus does */
  arq_env_t e;
  arq_env_error_t err;
  memset(&err, 0x5a, sizeof err);
  int rc = arq_env_parse(&e, buf, size, &err);
  if (rc == 0) {
    check_valid(&e);
    round_trip(&e, &scratch);
    arq_env_free(&e);
    check(e.root == NULL, "free left the root");
    arq_env_free(&e);
    return;
  }
  check(rc == ARQ_EINVAL, "parse error other than ARQ_EINVAL");
  check(e.root == NULL, "failed parse kept a root");
  check((unsigned)err.code < ARQ_CODE_NCODES && arq_code_is_malformed(err.code), "parse error of a non-malformed code");
  size_t mlen = strnlen(err.message, sizeof err.message);
  check(mlen > 0 && mlen < sizeof err.message, "error message empty or unterminated");
  if (!skip_utf8)
    check(utf8(err.message, mlen), "error message is not UTF-8");
  size_t clen = strnlen(err.correlation_id, sizeof err.correlation_id);
  check(clen < sizeof err.correlation_id, "correlation_id unterminated");
  check(clen == 0 || arq_env_valid_id(err.correlation_id), "correlation_id is not a valid id");
}

static bool text_ok(const char *s, size_t cap) {
  size_t n = strnlen(s, cap);
  if (n == cap)
    return false;
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
      return false;
  return utf8(s, n);
}

static void fuzz_params(const char *buf, size_t size) {
  arq_client_params_t p;
  char err[256];
  memset(err, 0x5a, sizeof err);
  int rc = arq_bus_parse_params(buf, size, &p, err, sizeof err);
  if (rc != 0) {
    check(rc == ARQ_EINVAL, "params error other than ARQ_EINVAL");
    size_t n = strnlen(err, sizeof err);
    check(n > 0 && n < sizeof err, "params error empty or unterminated");
    return;
  }
  check(!p.client_id[0] || arq_names_valid_client_id(p.client_id, strlen(p.client_id)), "invalid client_id accepted");
  check((unsigned)p.type < ARQ_CLIENT_NTYPES, "client type out of range");
  check(text_ok(p.screen_name, sizeof p.screen_name), "screen_name");
  check(text_ok(p.avatar, sizeof p.avatar), "avatar");
  check(text_ok(p.personality, sizeof p.personality), "personality");
  check(!p.room[0] == !p.channel[0], "room without channel or channel without room");
  check(!p.room[0] || (name_ok(p.room) && name_ok(p.channel)), "invalid initial channel accepted");
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  const char *v = getenv("FUZZ_ENVELOPE_SKIP");
  skip_utf8 = v && strstr(v, "utf8");
  skip_params = v && strstr(v, "params");
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *buf = malloc(size ? size : 1);
  check(buf != NULL, "out of memory");
  if (size)
    memcpy(buf, data, size);
  fuzz_envelope(buf, size);
  if (!skip_params)
    fuzz_params(buf, size);
  free(buf);
  return 0;
}
