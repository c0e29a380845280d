/* libFuzzer target for the RFC 6455 frame decoder (wire/frame).
 *
 * The first input byte chooses how the rest is cut into reads and which
 * decoder reads it:
 *
 *   bit  7 6 5 4 3 2 1 0
 *        | | | +-+ +-+-+-- split pattern (whole, 1, 2, 3, 7, 64 bytes, random, two halves)
 *        | | |  +--------- max_message: 4096, 16, 125 or 70000
 *        | | +------------ client decoder (unmasked frames) instead of a server one
 *        +-+-------------- seed for the random split
 *
 * Every read is copied into an allocation of its exact size, so that ASan
 * sees any byte read past it. The decoder is then fed as a connection feeds
 * it, taking messages until ARQ_AGAIN or an error, and what comes out is
 * checked against the contract and against a second decoder that got all the
 * bytes in one piece: the split must never change the result.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"
#include "wire/frame.h"
#include "wire/utf8.h"

/* One decoded message, reduced to what a comparison needs. */
typedef struct event {
  uint8_t opcode;
  size_t len;
  uint64_t hash;
  uint16_t close_code;
  size_t reason_len;
} event_t;

typedef struct run {
  event_t *events;
  size_t n;
  size_t cap;
  int rc;             /* ARQ_AGAIN, or the error that stopped the run */
  uint16_t close_code; /* the decoder's after an error */
} run_t;

static void check(bool ok, const char *what) {
  if (!ok) {
    fprintf(stderr, "fuzz_frame: %s\n", what);
    abort();
  }
}

static uint64_t fnv1a(const uint8_t *p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++)
    h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

/* Checks 'm' against the decoder contract and records it. */
static void record(run_t *r, const arq_ws_decoder_t *d, const arq_ws_msg_t *m) {
  switch (m->opcode) {
  case ARQ_WS_OP_TEXT:
    check(arq_utf8_validate(m->data, m->len) == 0, "text message is not valid UTF-8");
    /* fall through */
  case ARQ_WS_OP_BINARY:
    check(m->len <= d->max_message, "message over max_message");
    break;
  case ARQ_WS_OP_CLOSE:
    check(m->len <= ARQ_WS_MAX_CONTROL, "control frame over 125 bytes");
    if (m->len == 0) {
      check(m->close_code == ARQ_WS_CLOSE_NO_STATUS && m->reason_len == 0, "empty close without 1005");
    } else {
      check(m->len >= 2 && arq_ws_close_code_valid(m->close_code), "close with an invalid code");
      check(m->close_code == (uint16_t)((m->data[0] << 8) | m->data[1]), "close code differs from payload");
      check(m->reason_len == m->len - 2 && m->reason == m->data + 2, "close reason slice");
      check(arq_utf8_validate(m->reason, m->reason_len) == 0, "close reason is not valid UTF-8");
    }
    break;
  case ARQ_WS_OP_PING:
  case ARQ_WS_OP_PONG:
    check(m->len <= ARQ_WS_MAX_CONTROL, "control frame over 125 bytes");
    break;
  default:
    check(false, "unexpected opcode");
  }
  if (r->n == r->cap) {
    r->cap = r->cap ? r->cap * 2 : 16;
    r->events = realloc(r->events, r->cap * sizeof(*r->events));
    check(r->events != NULL, "out of memory");
  }
  r->events[r->n++] = (event_t){
      .opcode = m->opcode,
      .len = m->len,
      .hash = m->len ? fnv1a(m->data, m->len) : 0,
      .close_code = m->close_code,
      .reason_len = m->reason_len,
  };
}

/* Feeds one read of 'n' bytes. Returns false once the decoder has failed. */
static bool feed(arq_ws_decoder_t *d, const uint8_t *data, size_t n, run_t *r) {
  uint8_t *buf = malloc(n ? n : 1);
  check(buf != NULL, "out of memory");
  if (n)
    memcpy(buf, data, n);
  size_t off = 0;
  bool alive = true;
  for (;;) {
    size_t used = (size_t)-1;
    arq_ws_msg_t m;
    int rc = arq_ws_decode(d, buf + off, n - off, &used, &m);
    check(used <= n - off, "used past the buffer");
    off += used;
    if (rc == ARQ_OK) {
      record(r, d, &m);
      continue;
    }
    r->rc = rc;
    if (rc == ARQ_AGAIN) {
      check(off == n, "ARQ_AGAIN with bytes left");
    } else {
      check(rc == ARQ_EPROTO || rc == ARQ_EUTF8 || rc == ARQ_ETOOBIG, "unexpected return code");
      check(d->errstr != NULL, "error without errstr");
      uint16_t want = rc == ARQ_EPROTO ? 1002 : rc == ARQ_EUTF8 ? 1007 : 1009;
      check(d->close_code == want, "close code does not match the error");
      r->close_code = d->close_code;
      /* The error sticks and nothing more is taken. */
      size_t again_used = 1;
      check(arq_ws_decode(d, buf, n, &again_used, &m) == rc && again_used == 0, "error did not stick");
      alive = false;
    }
    break;
  }
  free(buf);
  return alive;
}

static uint32_t next_random(uint32_t *s) {
  *s = *s * 1103515245u + 12345u;
  return *s >> 16;
}

static size_t chunk_size(uint8_t pattern, uint32_t *seed, size_t left, size_t total) {
  switch (pattern) {
  case 0: return left;
  case 1: return 1;
  case 2: return 2;
  case 3: return 3;
  case 4: return 7;
  case 5: return 64;
  case 6: return 1 + next_random(seed) % 300;
  default: return left == total ? total / 2 + (total == 1) : left;
  }
}

static void run_free(run_t *r) { free(r->events); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  static const uint64_t limits[] = {4096, 16, 125, 70000};
  uint8_t mode = data[0];
  uint8_t pattern = mode & 7;
  uint64_t limit = limits[(mode >> 3) & 3];
  bool server = (mode & 0x20) == 0;
  uint32_t seed = mode >> 6;
  data++;
  size--;

  /* In reads of the chosen pattern. */
  arq_ws_decoder_t d;
  arq_ws_decoder_init(&d, limit, server);
  check(arq_ws_decoder_idle(&d), "fresh decoder not idle");
  run_t split = {0};
  split.rc = ARQ_AGAIN;
  size_t pos = 0;
  while (pos < size) {
    size_t k = chunk_size(pattern, &seed, size - pos, size);
    if (k > size - pos)
      k = size - pos;
    if (!feed(&d, data + pos, k, &split))
      break;
    pos += k;
  }
  if (split.rc == ARQ_AGAIN) {
    /* A last empty read releases the last message; then idle means no heap. */
    feed(&d, data, 0, &split);
    if (arq_ws_decoder_idle(&d))
      check(d.msg == NULL, "idle decoder holds memory");
  }
  arq_ws_decoder_free(&d);

  /* In one piece. */
  arq_ws_decoder_init(&d, limit, server);
  run_t whole = {0};
  whole.rc = ARQ_AGAIN;
  feed(&d, data, size, &whole);
  arq_ws_decoder_free(&d);

  check(split.rc == whole.rc, "the split changed the return code");
  check(split.close_code == whole.close_code, "the split changed the close code");
  check(split.n == whole.n, "the split changed the number of messages");
  for (size_t i = 0; i < whole.n; i++) {
    const event_t *a = &split.events[i], *b = &whole.events[i];
    check(a->opcode == b->opcode && a->len == b->len && a->hash == b->hash && a->close_code == b->close_code &&
              a->reason_len == b->reason_len,
          "the split changed a message");
  }
  run_free(&split);
  run_free(&whole);
  return 0;
}
