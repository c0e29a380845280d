/* Unit tests for wire/frame: the RFC 6455 decoder and encoders.
 *
 * Test frames are built the way a client builds them (arq_ws_header_encode()
 * with a mask, payload XORed by a plain reference loop) or by hand for the
 * hostile cases, then fed to a server-side decoder whole, in two pieces at
 * every split point and byte by byte. The helper feed() plays the part of a
 * connection: it calls arq_ws_decode() until ARQ_AGAIN or an error and keeps a
 * copy of every message, since their bytes are only borrowed.
 *
 * The allocator hooks of util/alloc count what the decoder asks for, to show
 * that size limits are checked before anything is allocated and that an idle
 * decoder holds no memory.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "util/alloc.h"
#include "util/err.h"
#include "util/rcbuf.h"
#include "wire/frame.h"

#define MAX_MSGS 64
#define BIG_LIMIT (1u << 20)

/* ---- what a decoder produced ---- */

typedef struct got_msg {
  uint8_t opcode;
  uint8_t *data; /* copy (owned) */
  size_t len;
  uint16_t close_code;
  uint8_t *reason; /* copy (owned) */
  size_t reason_len;
} got_msg_t;

typedef struct results {
  got_msg_t msgs[MAX_MSGS];
  size_t n;
  int rc;             /* last return: ARQ_AGAIN or an error */
  uint16_t close_code; /* the decoder's after an error */
} results_t;

static void *dup_bytes(const void *p, size_t n) {
  void *q = malloc(n ? n : 1);
  assert_non_null(q);
  if (n)
    memcpy(q, p, n);
  return q;
}

static void results_free(results_t *r) {
  for (size_t i = 0; i < r->n; i++) {
    free(r->msgs[i].data);
    free(r->msgs[i].reason);
  }
  memset(r, 0, sizeof(*r));
}

/* Feeds 'len' bytes of 'buf' to 'd', collecting messages into 'r' until the
 * decoder wants more bytes or fails. Returns the last return code. */
static int feed(arq_ws_decoder_t *d, uint8_t *buf, size_t len, results_t *r) {
  static uint8_t empty[1];
  size_t off = 0;
  if (buf == NULL)
    buf = empty;
  for (;;) {
    size_t used = (size_t)-1;
    arq_ws_msg_t m;
    memset(&m, 0xA5, sizeof m);
    int rc = arq_ws_decode(d, buf + off, len - off, &used, &m);
    assert_true(used <= len - off);
    off += used;
    r->rc = rc;
    if (rc == ARQ_OK) {
      assert_true(r->n < MAX_MSGS);
      got_msg_t *g = &r->msgs[r->n++];
      g->opcode = m.opcode;
      g->len = m.len;
      g->data = dup_bytes(m.data, m.len);
      if (m.opcode == ARQ_WS_OP_CLOSE) {
        g->close_code = m.close_code;
        g->reason_len = m.reason_len;
        g->reason = dup_bytes(m.reason_len ? m.reason : NULL, m.reason_len);
      }
      continue;
    }
    if (rc == ARQ_AGAIN) {
      assert_int_equal(off, len);
    } else {
      assert_true(rc < 0);
      assert_non_null(d->errstr);
      r->close_code = d->close_code;
    }
    return rc;
  }
}

static void assert_results_equal(const results_t *a, const results_t *b) {
  assert_int_equal(a->rc, b->rc);
  assert_int_equal(a->close_code, b->close_code);
  assert_int_equal(a->n, b->n);
  for (size_t i = 0; i < a->n; i++) {
    const got_msg_t *x = &a->msgs[i], *y = &b->msgs[i];
    assert_int_equal(x->opcode, y->opcode);
    assert_int_equal(x->len, y->len);
    assert_memory_equal(x->data, y->data, x->len);
    assert_int_equal(x->close_code, y->close_code);
    assert_int_equal(x->reason_len, y->reason_len);
    if (x->reason_len)
      assert_memory_equal(x->reason, y->reason, x->reason_len);
  }
}

static void assert_msg(const results_t *r, size_t i, uint8_t opcode, const void *data, size_t len) {
  assert_true(i < r->n);
  assert_int_equal(r->msgs[i].opcode, opcode);
  assert_int_equal(r->msgs[i].len, len);
  if (len)
    assert_memory_equal(r->msgs[i].data, data, len);
}

/* ---- building frames ---- */

typedef struct bytes {
  uint8_t *p;
  size_t n;
  size_t cap;
} bytes_t;

/* Makes room for 'n' more bytes and returns where they go. */
static uint8_t *reserve(bytes_t *b, size_t n) {
  if (b->n + n > b->cap) {
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + n)
      cap *= 2;
    b->p = realloc(b->p, cap);
    assert_non_null(b->p);
    b->cap = cap;
  }
  return b->p + b->n;
}

static void put(bytes_t *b, const void *src, size_t n) {
  uint8_t *at = reserve(b, n);
  if (n)
    memcpy(at, src, n);
  b->n += n;
}

static void bytes_free(bytes_t *b) {
  free(b->p);
  memset(b, 0, sizeof(*b));
}

/* The reference masking loop of RFC 6455 section 5.3. */
static void xor_mask(uint8_t *p, size_t n, const uint8_t key[4], size_t offset) {
  for (size_t i = 0; i < n; i++)
    p[i] ^= key[(offset + i) % 4];
}

static unsigned mask_seed = 1;

/* Appends a frame; masked with a fresh key when 'masked', as a client sends. */
static void put_frame(bytes_t *b, bool fin, uint8_t opcode, const void *payload, size_t n, bool masked) {
  uint8_t key[4] = {(uint8_t)(0x37 * mask_seed), (uint8_t)(0xFA + mask_seed), 0x21, (uint8_t)(0x3D ^ mask_seed)};
  mask_seed++;
  b->n += arq_ws_header_encode(reserve(b, ARQ_WS_MAX_HEADER), fin, opcode, n, masked ? key : NULL);
  size_t at = b->n;
  put(b, payload, n);
  if (masked)
    xor_mask(b->p + at, n, key, 0);
}

static void put_masked(bytes_t *b, bool fin, uint8_t opcode, const void *payload, size_t n) {
  put_frame(b, fin, opcode, payload, n, true);
}

static void put_close(bytes_t *b, uint16_t code, const void *reason, size_t n) {
  uint8_t payload[2 + 256];
  assert_true(n <= 256);
  payload[0] = (uint8_t)(code >> 8);
  payload[1] = (uint8_t)code;
  if (n)
    memcpy(payload + 2, reason, n);
  put_masked(b, true, ARQ_WS_OP_CLOSE, payload, 2 + n);
}

/* Decodes 'b' (a copy of it: the decoder unmasks in place) with a fresh
 * server decoder of 'limit' and returns the results in 'r'. */
static int decode_all(const bytes_t *b, uint64_t limit, results_t *r) {
  arq_ws_decoder_t d;
  arq_ws_decoder_init(&d, limit, true);
  uint8_t *copy = dup_bytes(b->p, b->n);
  int rc = feed(&d, copy, b->n, r);
  free(copy);
  arq_ws_decoder_free(&d);
  return rc;
}

/* Asserts that 'b' fails with 'err' and 'code', also fed byte by byte. */
static void assert_fails(const bytes_t *b, int err, uint16_t code) {
  results_t r = {0};
  assert_int_equal(decode_all(b, BIG_LIMIT, &r), err);
  assert_int_equal(r.close_code, code);
  results_free(&r);

  arq_ws_decoder_t d;
  arq_ws_decoder_init(&d, BIG_LIMIT, true);
  uint8_t *copy = dup_bytes(b->p, b->n);
  int rc = ARQ_AGAIN;
  for (size_t i = 0; i < b->n && rc == ARQ_AGAIN; i++)
    rc = feed(&d, copy + i, 1, &r);
  assert_int_equal(rc, err);
  assert_int_equal(d.close_code, code);
  free(copy);
  results_free(&r);
  arq_ws_decoder_free(&d);
}

static void fill_pattern(uint8_t *p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; i++)
    p[i] = (uint8_t)(i * 31 + seed + (i >> 8));
}

/* ---- allocation counting through the hooks ---- */

static size_t live_blocks;
static size_t alloc_calls;
static size_t largest_request;

static void *count_malloc(size_t n) {
  alloc_calls++;
  live_blocks++;
  if (n > largest_request)
    largest_request = n;
  return malloc(n);
}

static void *count_realloc(void *p, size_t n) {
  alloc_calls++;
  if (p == NULL)
    live_blocks++;
  if (n > largest_request)
    largest_request = n;
  return realloc(p, n);
}

static void count_free(void *p) {
  if (p != NULL)
    live_blocks--;
  free(p);
}

static const arq_alloc_hooks_t counting_hooks = {count_malloc, count_realloc, count_free};

static void counting_start(void) {
  live_blocks = alloc_calls = largest_request = 0;
  arq_alloc_set_hooks(&counting_hooks);
}

static void counting_stop(void) { arq_alloc_set_hooks(NULL); }

/* ================= masking and header encoding ================= */

static void test_mask_offsets_and_lengths(void **state) {
  const uint8_t key[4] = {0x12, 0x9A, 0xF0, 0x5C};
  uint8_t src[32], got[32], want[32];
  fill_pattern(src, sizeof src, 7);
  /* Also from an unaligned start, since the implementation works in words. */
  for (size_t start = 0; start < 4; start++) {
    for (uint64_t offset = 0; offset < 4; offset++) {
      for (size_t n = 0; n <= 20; n++) {
        memcpy(got, src, sizeof got);
        memcpy(want, src, sizeof want);
        arq_ws_mask(got + start, n, key, offset);
        xor_mask(want + start, n, key, (size_t)offset);
        assert_memory_equal(got, want, sizeof got); /* nothing outside the n bytes */
        arq_ws_mask(got + start, n, key, offset);
        assert_memory_equal(got, src, sizeof got); /* masking twice restores */
      }
    }
  }
  /* The offset counts modulo 4, also past 32 bits. */
  memcpy(got, src, sizeof got);
  memcpy(want, src, sizeof want);
  arq_ws_mask(got, 13, key, (1ull << 32) + 7);
  xor_mask(want, 13, key, 3);
  assert_memory_equal(got, want, sizeof got);
}

static void test_mask_long_buffer(void **state) {
  const uint8_t key[4] = {0xDE, 0xAD, 0xBE, 0xEF};
  size_t n = 100003;
  uint8_t *a = malloc(n), *b = malloc(n);
  assert_non_null(a);
  assert_non_null(b);
  fill_pattern(a, n, 3);
  memcpy(b, a, n);
  arq_ws_mask(a + 1, n - 1, key, 2);
  xor_mask(b + 1, n - 1, key, 2);
  assert_memory_equal(a, b, n);
  /* Masking in pieces at running offsets equals masking at once, which is
   * what the decoder does with a frame split across reads. */
  fill_pattern(a, n, 3);
  fill_pattern(b, n, 3);
  size_t pos = 0, step = 1;
  while (pos < n) {
    size_t k = step < n - pos ? step : n - pos;
    arq_ws_mask(a + pos, k, key, pos);
    pos += k;
    step = step * 3 % 97 + 1;
  }
  xor_mask(b, n, key, 0);
  assert_memory_equal(a, b, n);
  free(a);
  free(b);
}

static void test_header_encode_bytes(void **state) {
  uint8_t h[ARQ_WS_MAX_HEADER];
  const uint8_t key[4] = {1, 2, 3, 4};

  assert_int_equal(arq_ws_header_encode(h, true, ARQ_WS_OP_TEXT, 0, NULL), 2);
  assert_memory_equal(h, ((uint8_t[]){0x81, 0x00}), 2);
  assert_int_equal(arq_ws_header_encode(h, true, ARQ_WS_OP_BINARY, 125, NULL), 2);
  assert_memory_equal(h, ((uint8_t[]){0x82, 125}), 2);
  assert_int_equal(arq_ws_header_encode(h, false, ARQ_WS_OP_TEXT, 5, NULL), 2);
  assert_memory_equal(h, ((uint8_t[]){0x01, 5}), 2);
  assert_int_equal(arq_ws_header_encode(h, true, ARQ_WS_OP_CONT, 5, key), 6);
  assert_memory_equal(h, ((uint8_t[]){0x80, 0x85, 1, 2, 3, 4}), 6);

  assert_int_equal(arq_ws_header_encode(h, true, ARQ_WS_OP_BINARY, 126, NULL), 4);
  assert_memory_equal(h, ((uint8_t[]){0x82, 126, 0x00, 0x7E}), 4);
  assert_int_equal(arq_ws_header_encode(h, true, ARQ_WS_OP_BINARY, 65535, key), 8);
  assert_memory_equal(h, ((uint8_t[]){0x82, 0xFE, 0xFF, 0xFF, 1, 2, 3, 4}), 8);

  assert_int_equal(arq_ws_header_encode(h, true, ARQ_WS_OP_BINARY, 65536, NULL), 10);
  assert_memory_equal(h, ((uint8_t[]){0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0}), 10);
  assert_int_equal(arq_ws_header_encode(h, false, ARQ_WS_OP_BINARY, 0x0102030405060708ull, key), 14);
  assert_memory_equal(h, ((uint8_t[]){0x02, 0xFF, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4}), 14);
}

/* ================= frame forms ================= */

static void test_text_and_binary(void **state) {
  bytes_t b = {0};
  put_masked(&b, true, ARQ_WS_OP_TEXT, "hello", 5);
  put_masked(&b, true, ARQ_WS_OP_TEXT, "", 0);
  put_masked(&b, true, ARQ_WS_OP_BINARY, "\x00\xFF\x80\xC0", 4);
  put_masked(&b, true, ARQ_WS_OP_BINARY, "", 0);
  put_masked(&b, true, ARQ_WS_OP_TEXT, "\xE2\x82\xAC \xF0\x9F\x98\x80", 8);
  results_t r = {0};
  assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 5);
  assert_msg(&r, 0, ARQ_WS_OP_TEXT, "hello", 5);
  assert_msg(&r, 1, ARQ_WS_OP_TEXT, "", 0);
  assert_msg(&r, 2, ARQ_WS_OP_BINARY, "\x00\xFF\x80\xC0", 4);
  assert_msg(&r, 3, ARQ_WS_OP_BINARY, "", 0);
  assert_msg(&r, 4, ARQ_WS_OP_TEXT, "\xE2\x82\xAC \xF0\x9F\x98\x80", 8);
  results_free(&r);
  bytes_free(&b);
}

static void test_ping_pong(void **state) {
  uint8_t big[ARQ_WS_MAX_CONTROL];
  fill_pattern(big, sizeof big, 9);
  bytes_t b = {0};
  put_masked(&b, true, ARQ_WS_OP_PING, "", 0);
  put_masked(&b, true, ARQ_WS_OP_PING, "are you there", 13);
  put_masked(&b, true, ARQ_WS_OP_PONG, "", 0);
  put_masked(&b, true, ARQ_WS_OP_PONG, "yes", 3);
  put_masked(&b, true, ARQ_WS_OP_PING, big, sizeof big);
  results_t r = {0};
  assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 5);
  assert_msg(&r, 0, ARQ_WS_OP_PING, "", 0);
  assert_msg(&r, 1, ARQ_WS_OP_PING, "are you there", 13);
  assert_msg(&r, 2, ARQ_WS_OP_PONG, "", 0);
  assert_msg(&r, 3, ARQ_WS_OP_PONG, "yes", 3);
  assert_msg(&r, 4, ARQ_WS_OP_PING, big, sizeof big);
  results_free(&r);
  bytes_free(&b);
}

static void test_close_forms(void **state) {
  bytes_t b = {0};
  put_masked(&b, true, ARQ_WS_OP_CLOSE, "", 0);
  put_close(&b, 1000, NULL, 0);
  put_close(&b, 1001, "going away", 10);
  put_close(&b, 4000, "caf\xC3\xA9", 5);
  results_t r = {0};
  assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 4);
  for (size_t i = 0; i < 4; i++)
    assert_int_equal(r.msgs[i].opcode, ARQ_WS_OP_CLOSE);
  assert_int_equal(r.msgs[0].close_code, ARQ_WS_CLOSE_NO_STATUS);
  assert_int_equal(r.msgs[0].len, 0);
  assert_int_equal(r.msgs[0].reason_len, 0);
  assert_int_equal(r.msgs[1].close_code, 1000);
  assert_int_equal(r.msgs[1].len, 2);
  assert_int_equal(r.msgs[1].reason_len, 0);
  assert_int_equal(r.msgs[2].close_code, 1001);
  assert_int_equal(r.msgs[2].reason_len, 10);
  assert_memory_equal(r.msgs[2].reason, "going away", 10);
  assert_int_equal(r.msgs[3].close_code, 4000);
  assert_int_equal(r.msgs[3].reason_len, 5);
  assert_memory_equal(r.msgs[3].reason, "caf\xC3\xA9", 5);
  results_free(&r);
  bytes_free(&b);
}

static void test_whole_frame_is_returned_in_place(void **state) {
  /* The header promises zero copy for a whole unfragmented frame. */
  bytes_t b = {0};
  put_masked(&b, true, ARQ_WS_OP_BINARY, "0123456789", 10);
  arq_ws_decoder_t d;
  arq_ws_decoder_init(&d, BIG_LIMIT, true);
  size_t used;
  arq_ws_msg_t m;
  assert_int_equal(arq_ws_decode(&d, b.p, b.n, &used, &m), ARQ_OK);
  assert_int_equal(used, b.n);
  assert_ptr_equal(m.data, b.p + 6);
  assert_memory_equal(m.data, "0123456789", 10);
  assert_null(d.msg);
  arq_ws_decoder_free(&d);
  bytes_free(&b);
}

/* ================= length boundaries ================= */

static void test_length_boundaries(void **state) {
  static const size_t lens[] = {0, 1, 124, 125, 126, 127, 65535, 65536, 65537, 200000};
  static const size_t hdr_sizes[] = {6, 6, 6, 6, 8, 8, 8, 14, 14, 14};
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    size_t n = lens[i];
    uint8_t *payload = malloc(n ? n : 1);
    assert_non_null(payload);
    fill_pattern(payload, n, (unsigned)i);
    bytes_t b = {0};
    put_masked(&b, true, ARQ_WS_OP_BINARY, payload, n);
    assert_int_equal(b.n, hdr_sizes[i] + n);

    /* Whole. */
    results_t r = {0};
    assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
    assert_int_equal(r.n, 1);
    assert_msg(&r, 0, ARQ_WS_OP_BINARY, payload, n);
    results_free(&r);

    /* Header in one read, the payload in two more. */
    arq_ws_decoder_t d;
    arq_ws_decoder_init(&d, BIG_LIMIT, true);
    uint8_t *copy = dup_bytes(b.p, b.n);
    size_t h = hdr_sizes[i], half = h + n / 2;
    assert_int_equal(feed(&d, copy, h, &r), ARQ_AGAIN);
    assert_int_equal(feed(&d, copy + h, half - h, &r), ARQ_AGAIN);
    assert_int_equal(r.n, n == 0 ? 1 : 0); /* an empty frame is whole with its header */
    assert_int_equal(feed(&d, copy + half, b.n - half, &r), ARQ_AGAIN);
    assert_int_equal(r.n, 1);
    assert_msg(&r, 0, ARQ_WS_OP_BINARY, payload, n);
    assert_true(arq_ws_decoder_idle(&d));
    results_free(&r);
    free(copy);
    arq_ws_decoder_free(&d);
    bytes_free(&b);
    free(payload);
  }
}

static void test_length_boundaries_text(void **state) {
  static const size_t lens[] = {125, 126, 65535, 65536};
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    size_t n = lens[i];
    uint8_t *payload = malloc(n);
    assert_non_null(payload);
    for (size_t j = 0; j < n; j++)
      payload[j] = (uint8_t)('a' + j % 26);
    if (n >= 3)
      memcpy(payload + n - 3, "\xE2\x82\xAC", 3); /* ends on a 3-byte code point */
    bytes_t b = {0};
    put_masked(&b, true, ARQ_WS_OP_TEXT, payload, n);
    results_t r = {0};
    assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
    assert_int_equal(r.n, 1);
    assert_msg(&r, 0, ARQ_WS_OP_TEXT, payload, n);
    results_free(&r);
    bytes_free(&b);
    free(payload);
  }
}

/* ================= fragmentation ================= */

static void test_fragmented_two(void **state) {
  bytes_t b = {0};
  put_masked(&b, false, ARQ_WS_OP_TEXT, "Hello, ", 7);
  put_masked(&b, true, ARQ_WS_OP_CONT, "world", 5);
  put_masked(&b, false, ARQ_WS_OP_BINARY, "\x01\x02", 2);
  put_masked(&b, true, ARQ_WS_OP_CONT, "\x03", 1);
  results_t r = {0};
  assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 2);
  assert_msg(&r, 0, ARQ_WS_OP_TEXT, "Hello, world", 12);
  assert_msg(&r, 1, ARQ_WS_OP_BINARY, "\x01\x02\x03", 3);
  results_free(&r);
  bytes_free(&b);
}

static void test_fragmented_many(void **state) {
  /* 40 fragments of growing size, some empty, for text and binary. */
  for (int op = ARQ_WS_OP_TEXT; op <= ARQ_WS_OP_BINARY; op++) {
    uint8_t whole[4000];
    size_t total = 0;
    bytes_t b = {0};
    for (size_t f = 0; f < 40; f++) {
      size_t n = f % 7 == 3 ? 0 : f * 5;
      uint8_t frag[200];
      for (size_t j = 0; j < n; j++)
        frag[j] = (uint8_t)(op == ARQ_WS_OP_TEXT ? 'A' + (total + j) % 26 : (total + j) * 7);
      memcpy(whole + total, frag, n);
      total += n;
      put_masked(&b, f == 39, f == 0 ? (uint8_t)op : ARQ_WS_OP_CONT, frag, n);
    }
    results_t r = {0};
    assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
    assert_int_equal(r.n, 1);
    assert_msg(&r, 0, (uint8_t)op, whole, total);
    results_free(&r);
    bytes_free(&b);
  }
}

static void test_fragmented_empty(void **state) {
  bytes_t b = {0};
  put_masked(&b, false, ARQ_WS_OP_TEXT, "", 0);
  put_masked(&b, false, ARQ_WS_OP_CONT, "", 0);
  put_masked(&b, true, ARQ_WS_OP_CONT, "", 0);
  put_masked(&b, true, ARQ_WS_OP_TEXT, "next", 4);
  results_t r = {0};
  assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 2);
  assert_msg(&r, 0, ARQ_WS_OP_TEXT, "", 0);
  assert_msg(&r, 1, ARQ_WS_OP_TEXT, "next", 4);
  results_free(&r);
  bytes_free(&b);
}

static void test_control_between_fragments(void **state) {
  bytes_t b = {0};
  put_masked(&b, false, ARQ_WS_OP_TEXT, "Hel", 3);
  put_masked(&b, true, ARQ_WS_OP_PING, "p1", 2);
  put_masked(&b, false, ARQ_WS_OP_CONT, "lo ", 3);
  put_masked(&b, true, ARQ_WS_OP_PONG, "", 0);
  put_masked(&b, true, ARQ_WS_OP_PING, "p2", 2);
  put_masked(&b, true, ARQ_WS_OP_CONT, "world", 5);
  put_masked(&b, false, ARQ_WS_OP_BINARY, "\xAA", 1);
  put_masked(&b, true, ARQ_WS_OP_PING, "p3", 2);
  put_masked(&b, true, ARQ_WS_OP_CONT, "\xBB", 1);
  results_t r = {0};
  assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 6);
  assert_msg(&r, 0, ARQ_WS_OP_PING, "p1", 2);
  assert_msg(&r, 1, ARQ_WS_OP_PONG, "", 0);
  assert_msg(&r, 2, ARQ_WS_OP_PING, "p2", 2);
  assert_msg(&r, 3, ARQ_WS_OP_TEXT, "Hello world", 11);
  assert_msg(&r, 4, ARQ_WS_OP_PING, "p3", 2);
  assert_msg(&r, 5, ARQ_WS_OP_BINARY, "\xAA\xBB", 2);
  results_free(&r);
  bytes_free(&b);
}

static void test_close_between_fragments(void **state) {
  bytes_t b = {0};
  put_masked(&b, false, ARQ_WS_OP_BINARY, "ab", 2);
  put_close(&b, 1000, "bye", 3);
  results_t r = {0};
  assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 1);
  assert_int_equal(r.msgs[0].opcode, ARQ_WS_OP_CLOSE);
  assert_int_equal(r.msgs[0].close_code, 1000);
  results_free(&r);
  bytes_free(&b);
}

/* ================= UTF-8 in text messages ================= */

static void test_invalid_utf8_single_frame(void **state) {
  static const char *bad[] = {"\xC0\x80", "abc\xFF", "\xED\xA0\x80", "\xF4\x90\x80\x80", "ok\x80", "\xE2\x82"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    bytes_t b = {0};
    put_masked(&b, true, ARQ_WS_OP_TEXT, bad[i], strlen(bad[i]));
    assert_fails(&b, ARQ_EUTF8, ARQ_WS_CLOSE_INVALID_DATA);
    bytes_free(&b);
  }
  /* Binary messages are not checked. */
  bytes_t b = {0};
  put_masked(&b, true, ARQ_WS_OP_BINARY, "\xC0\x80", 2);
  results_t r = {0};
  assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 1);
  results_free(&r);
  bytes_free(&b);
}

/* Sends 'text' as two fragments cut at 'cut'. */
static int decode_text_cut(const char *text, size_t n, size_t cut, results_t *r) {
  bytes_t b = {0};
  put_masked(&b, false, ARQ_WS_OP_TEXT, text, cut);
  put_masked(&b, true, ARQ_WS_OP_CONT, text + cut, n - cut);
  int rc = decode_all(&b, BIG_LIMIT, r);
  bytes_free(&b);
  return rc;
}

static void test_utf8_split_across_fragments(void **state) {
  static const char *good[] = {"x\xE2\x82\xACy", "x\xF0\x9F\x98\x80y", "\xF4\x8F\xBF\xBF", "\xED\x9F\xBF"};
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    size_t n = strlen(good[i]);
    for (size_t cut = 0; cut <= n; cut++) {
      results_t r = {0};
      assert_int_equal(decode_text_cut(good[i], n, cut, &r), ARQ_AGAIN);
      assert_int_equal(r.n, 1);
      assert_msg(&r, 0, ARQ_WS_OP_TEXT, good[i], n);
      results_free(&r);
    }
  }
  /* Invalid 3- and 4-byte sequences split the same ways: a surrogate, a
   * value past U+10FFFF, an overlong, and a bad continuation byte. */
  static const char *bad[] = {"x\xED\xA0\x80y", "x\xF4\x90\x80\x80y", "x\xE0\x80\xAFy", "x\xF0\x9F\x41\x80y",
                              "x\xE2\x82\x41y"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    size_t n = strlen(bad[i]);
    for (size_t cut = 0; cut <= n; cut++) {
      results_t r = {0};
      assert_int_equal(decode_text_cut(bad[i], n, cut, &r), ARQ_EUTF8);
      assert_int_equal(r.close_code, ARQ_WS_CLOSE_INVALID_DATA);
      assert_int_equal(r.n, 0);
      results_free(&r);
    }
  }
}

static void test_utf8_message_ends_mid_code_point(void **state) {
  static const char *partial[] = {"a\xE2\x82", "a\xF0\x9F\x98", "\xC3"};
  for (size_t i = 0; i < sizeof partial / sizeof partial[0]; i++) {
    size_t n = strlen(partial[i]);
    for (size_t cut = 0; cut <= n; cut++) {
      results_t r = {0};
      assert_int_equal(decode_text_cut(partial[i], n, cut, &r), ARQ_EUTF8);
      assert_int_equal(r.close_code, ARQ_WS_CLOSE_INVALID_DATA);
      results_free(&r);
    }
    /* And with an empty final fragment after the partial one. */
    bytes_t b = {0};
    put_masked(&b, false, ARQ_WS_OP_TEXT, partial[i], n);
    put_masked(&b, true, ARQ_WS_OP_CONT, "", 0);
    assert_fails(&b, ARQ_EUTF8, ARQ_WS_CLOSE_INVALID_DATA);
    bytes_free(&b);
  }
}

static void test_utf8_state_resets_between_messages(void **state) {
  /* A valid message must not leave state behind for the next one. */
  bytes_t b = {0};
  put_masked(&b, false, ARQ_WS_OP_TEXT, "\xE2", 1);
  put_masked(&b, true, ARQ_WS_OP_CONT, "\x82\xAC", 2);
  put_masked(&b, false, ARQ_WS_OP_TEXT, "\xC3", 1);
  put_masked(&b, true, ARQ_WS_OP_CONT, "\xA9", 1);
  results_t r = {0};
  assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 2);
  assert_msg(&r, 0, ARQ_WS_OP_TEXT, "\xE2\x82\xAC", 3);
  assert_msg(&r, 1, ARQ_WS_OP_TEXT, "\xC3\xA9", 2);
  results_free(&r);
  bytes_free(&b);
}

/* ================= close codes ================= */

static void test_close_codes_invalid(void **state) {
  static const uint16_t codes[] = {0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535};
  for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
    assert_false(arq_ws_close_code_valid(codes[i]));
    bytes_t b = {0};
    put_close(&b, codes[i], NULL, 0);
    assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
    bytes_free(&b);
    put_close(&b, codes[i], "why", 3);
    assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
    bytes_free(&b);
  }
}

static void test_close_codes_valid(void **state) {
  static const uint16_t codes[] = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010,
                                   1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999};
  for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
    assert_true(arq_ws_close_code_valid(codes[i]));
    bytes_t b = {0};
    put_close(&b, codes[i], "r", 1);
    results_t r = {0};
    assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
    assert_int_equal(r.n, 1);
    assert_int_equal(r.msgs[0].opcode, ARQ_WS_OP_CLOSE);
    assert_int_equal(r.msgs[0].close_code, codes[i]);
    assert_int_equal(r.msgs[0].reason_len, 1);
    assert_memory_equal(r.msgs[0].reason, "r", 1);
    results_free(&r);
    bytes_free(&b);
  }
}

static void test_close_one_byte_payload(void **state) {
  bytes_t b = {0};
  put_masked(&b, true, ARQ_WS_OP_CLOSE, "\x03", 1);
  assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
  /* Followed by a byte that would complete code 1000 if it were read. */
  put(&b, "\xE8", 1);
  assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
  bytes_free(&b);
}

static void test_close_reason_invalid_utf8(void **state) {
  bytes_t b = {0};
  put_close(&b, 1000, "bad\xC0\xAF", 5);
  assert_fails(&b, ARQ_EUTF8, ARQ_WS_CLOSE_INVALID_DATA);
  bytes_free(&b);
  put_close(&b, 1000, "cut\xE2\x82", 5); /* ends mid code point */
  assert_fails(&b, ARQ_EUTF8, ARQ_WS_CLOSE_INVALID_DATA);
  bytes_free(&b);
}

/* ================= protocol violations ================= */

static void test_reserved_bits(void **state) {
  static const uint8_t rsv[] = {0x40, 0x20, 0x10, 0x70};
  for (size_t i = 0; i < sizeof rsv; i++) {
    bytes_t b = {0};
    put_masked(&b, true, ARQ_WS_OP_TEXT, "hi", 2);
    b.p[0] |= rsv[i];
    assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
    bytes_free(&b);
    put_masked(&b, true, ARQ_WS_OP_PING, "", 0);
    b.p[0] |= rsv[i];
    assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
    bytes_free(&b);
  }
}

static void test_unknown_opcodes(void **state) {
  static const uint8_t ops[] = {3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF};
  for (size_t i = 0; i < sizeof ops; i++) {
    bytes_t b = {0};
    put_masked(&b, true, ops[i], "x", 1);
    assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
    bytes_free(&b);
  }
}

static void test_masking_direction(void **state) {
  /* A server refuses unmasked frames... */
  bytes_t b = {0};
  put_frame(&b, true, ARQ_WS_OP_TEXT, "hi", 2, false);
  assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
  bytes_free(&b);
  put_frame(&b, true, ARQ_WS_OP_PING, "", 0, false);
  assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
  bytes_free(&b);

  /* ...and a client refuses masked ones. */
  put_masked(&b, true, ARQ_WS_OP_TEXT, "hi", 2);
  arq_ws_decoder_t d;
  arq_ws_decoder_init(&d, BIG_LIMIT, false);
  results_t r = {0};
  assert_int_equal(feed(&d, b.p, b.n, &r), ARQ_EPROTO);
  assert_int_equal(d.close_code, ARQ_WS_CLOSE_PROTOCOL);
  arq_ws_decoder_free(&d);
  results_free(&r);
  bytes_free(&b);
}

/* Feeds only the header bytes 'h' and expects the error at once. */
static void assert_header_fails(const uint8_t *h, size_t n, uint64_t limit, int err, uint16_t code) {
  arq_ws_decoder_t d;
  arq_ws_decoder_init(&d, limit, true);
  uint8_t copy[ARQ_WS_MAX_HEADER];
  memcpy(copy, h, n);
  results_t r = {0};
  assert_int_equal(feed(&d, copy, n, &r), err);
  assert_int_equal(d.close_code, code);
  assert_int_equal(r.n, 0);
  results_free(&r);
  arq_ws_decoder_free(&d);
}

static void test_control_frame_too_long(void **state) {
  uint8_t payload[126];
  memset(payload, 'p', sizeof payload);
  static const uint8_t ops[] = {ARQ_WS_OP_PING, ARQ_WS_OP_PONG, ARQ_WS_OP_CLOSE};
  for (size_t i = 0; i < sizeof ops; i++) {
    bytes_t b = {0};
    put_masked(&b, true, ops[i], payload, sizeof payload);
    assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
    /* Refused from the header alone. */
    assert_header_fails(b.p, 8, BIG_LIMIT, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
    bytes_free(&b);
  }
}

static void test_fragmented_control_frame(void **state) {
  static const uint8_t ops[] = {ARQ_WS_OP_PING, ARQ_WS_OP_PONG, ARQ_WS_OP_CLOSE};
  for (size_t i = 0; i < sizeof ops; i++) {
    /* Refused at once: the frame itself is the violation, nothing comes out. */
    bytes_t b = {0};
    put_masked(&b, false, ops[i], "\x03\xE8", 2);
    assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
    assert_header_fails(b.p, 6, BIG_LIMIT, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
    put_masked(&b, true, ARQ_WS_OP_CONT, "", 0);
    results_t r = {0};
    assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_EPROTO);
    assert_int_equal(r.n, 0);
    results_free(&r);
    bytes_free(&b);
  }
}

static void test_continuation_without_message(void **state) {
  bytes_t b = {0};
  put_masked(&b, true, ARQ_WS_OP_CONT, "orphan", 6);
  assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
  bytes_free(&b);
  /* Also right after a complete message. */
  put_masked(&b, true, ARQ_WS_OP_TEXT, "done", 4);
  put_masked(&b, false, ARQ_WS_OP_CONT, "more", 4);
  results_t r = {0};
  assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_EPROTO);
  assert_int_equal(r.close_code, ARQ_WS_CLOSE_PROTOCOL);
  assert_int_equal(r.n, 1);
  results_free(&r);
  bytes_free(&b);
  /* And after a fragmented one has ended. */
  put_masked(&b, false, ARQ_WS_OP_TEXT, "a", 1);
  put_masked(&b, true, ARQ_WS_OP_CONT, "b", 1);
  put_masked(&b, true, ARQ_WS_OP_CONT, "c", 1);
  assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_EPROTO);
  assert_int_equal(r.n, 1);
  assert_msg(&r, 0, ARQ_WS_OP_TEXT, "ab", 2);
  results_free(&r);
  bytes_free(&b);
}

static void test_new_message_inside_fragmented(void **state) {
  static const uint8_t ops[] = {ARQ_WS_OP_TEXT, ARQ_WS_OP_BINARY};
  for (size_t i = 0; i < 2; i++) {
    for (size_t j = 0; j < 2; j++) {
      bytes_t b = {0};
      put_masked(&b, false, ops[i], "one", 3);
      put_masked(&b, true, ops[j], "two", 3);
      assert_fails(&b, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
      bytes_free(&b);
    }
  }
}

static void test_length_top_bit(void **state) {
  const uint8_t h[] = {0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0x05, 1, 2, 3, 4};
  assert_header_fails(h, sizeof h, UINT64_MAX, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
  assert_header_fails(h, sizeof h, BIG_LIMIT, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL);
}

/* ================= message size limit ================= */

static void test_limit_single_frame(void **state) {
  const size_t limit = 1000;
  uint8_t payload[1001];
  memset(payload, 'z', sizeof payload);

  bytes_t b = {0};
  put_masked(&b, true, ARQ_WS_OP_TEXT, payload, limit);
  results_t r = {0};
  assert_int_equal(decode_all(&b, limit, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 1);
  assert_msg(&r, 0, ARQ_WS_OP_TEXT, payload, limit);
  results_free(&r);
  bytes_free(&b);

  put_masked(&b, true, ARQ_WS_OP_TEXT, payload, limit + 1);
  assert_int_equal(decode_all(&b, limit, &r), ARQ_ETOOBIG);
  assert_int_equal(r.close_code, ARQ_WS_CLOSE_TOO_BIG);
  results_free(&r);
  /* Refused from the 8 header bytes alone, with nothing allocated. */
  counting_start();
  assert_header_fails(b.p, 8, limit, ARQ_ETOOBIG, ARQ_WS_CLOSE_TOO_BIG);
  counting_stop();
  assert_int_equal(alloc_calls, 0);
  bytes_free(&b);

  /* A 64-bit length far over the limit, header only. */
  uint8_t h[ARQ_WS_MAX_HEADER];
  const uint8_t key[4] = {9, 9, 9, 9};
  size_t hl = arq_ws_header_encode(h, true, ARQ_WS_OP_BINARY, 1ull << 40, key);
  counting_start();
  assert_header_fails(h, hl, limit, ARQ_ETOOBIG, ARQ_WS_CLOSE_TOO_BIG);
  counting_stop();
  assert_int_equal(alloc_calls, 0);
}

static void test_limit_fragments(void **state) {
  const size_t limit = 1000;
  uint8_t payload[1001];
  memset(payload, 'f', sizeof payload);

  /* 600 + 400: exactly at the limit. */
  bytes_t b = {0};
  put_masked(&b, false, ARQ_WS_OP_BINARY, payload, 600);
  put_masked(&b, true, ARQ_WS_OP_CONT, payload, 400);
  results_t r = {0};
  assert_int_equal(decode_all(&b, limit, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 1);
  assert_msg(&r, 0, ARQ_WS_OP_BINARY, payload, limit);
  results_free(&r);
  bytes_free(&b);

  /* 600 + 401: the second header is enough to refuse it. */
  put_masked(&b, false, ARQ_WS_OP_TEXT, payload, 600);
  size_t first = b.n;
  put_masked(&b, true, ARQ_WS_OP_CONT, payload, 401);
  arq_ws_decoder_t d;
  arq_ws_decoder_init(&d, limit, true);
  assert_int_equal(feed(&d, b.p, first, &r), ARQ_AGAIN);
  assert_int_equal(feed(&d, b.p + first, 8, &r), ARQ_ETOOBIG);
  assert_int_equal(d.close_code, ARQ_WS_CLOSE_TOO_BIG);
  assert_int_equal(r.n, 0);
  arq_ws_decoder_free(&d);
  results_free(&r);
  bytes_free(&b);

  /* Many small fragments: the running total counts. */
  for (size_t f = 0; f < 10; f++)
    put_masked(&b, false, f == 0 ? ARQ_WS_OP_BINARY : ARQ_WS_OP_CONT, payload, 100);
  put_masked(&b, true, ARQ_WS_OP_CONT, payload, 0);
  assert_int_equal(decode_all(&b, limit, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 1);
  assert_int_equal(r.msgs[0].len, limit);
  results_free(&r);
  bytes_free(&b);
  for (size_t f = 0; f < 10; f++)
    put_masked(&b, false, f == 0 ? ARQ_WS_OP_BINARY : ARQ_WS_OP_CONT, payload, 100);
  put_masked(&b, true, ARQ_WS_OP_CONT, payload, 1);
  assert_int_equal(decode_all(&b, limit, &r), ARQ_ETOOBIG);
  assert_int_equal(r.close_code, ARQ_WS_CLOSE_TOO_BIG);
  assert_int_equal(r.n, 0);
  results_free(&r);
  bytes_free(&b);
}

static void test_limit_does_not_count_control_frames(void **state) {
  /* Pings between fragments are not part of the message. */
  const size_t limit = 10;
  bytes_t b = {0};
  put_masked(&b, false, ARQ_WS_OP_TEXT, "01234", 5);
  put_masked(&b, true, ARQ_WS_OP_PING, "0123456789abcdef", 16);
  put_masked(&b, true, ARQ_WS_OP_CONT, "56789", 5);
  results_t r = {0};
  assert_int_equal(decode_all(&b, limit, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 2);
  assert_msg(&r, 0, ARQ_WS_OP_PING, "0123456789abcdef", 16);
  assert_msg(&r, 1, ARQ_WS_OP_TEXT, "0123456789", 10);
  results_free(&r);
  bytes_free(&b);
}

/* ================= split reads ================= */

/* A stream with one of each kind: masked text with multi-byte characters, a
 * ping, a fragmented binary message with a pong inside, a text frame with a
 * 16-bit length, and a close. */
static void build_mixed_stream(bytes_t *b, uint8_t *long_text, size_t long_len) {
  put_masked(b, true, ARQ_WS_OP_TEXT, "h\xC3\xA9llo \xE2\x82\xAC \xF0\x9F\x98\x80", 15);
  put_masked(b, true, ARQ_WS_OP_PING, "ping!", 5);
  put_masked(b, false, ARQ_WS_OP_BINARY, "\x00\x01\x02", 3);
  put_masked(b, true, ARQ_WS_OP_PONG, "pong", 4);
  put_masked(b, false, ARQ_WS_OP_CONT, "\x03\x04", 2);
  put_masked(b, true, ARQ_WS_OP_CONT, "\x05", 1);
  put_masked(b, false, ARQ_WS_OP_TEXT, "\xE2\x82", 2);
  put_masked(b, true, ARQ_WS_OP_CONT, "\xAC", 1);
  put_masked(b, true, ARQ_WS_OP_TEXT, long_text, long_len);
  put_close(b, 1000, "bye", 3);
}

static void assert_mixed_results(const results_t *r, const uint8_t *long_text, size_t long_len) {
  assert_int_equal(r->rc, ARQ_AGAIN);
  assert_int_equal(r->n, 7);
  assert_msg(r, 0, ARQ_WS_OP_TEXT, "h\xC3\xA9llo \xE2\x82\xAC \xF0\x9F\x98\x80", 15);
  assert_msg(r, 1, ARQ_WS_OP_PING, "ping!", 5);
  assert_msg(r, 2, ARQ_WS_OP_PONG, "pong", 4);
  assert_msg(r, 3, ARQ_WS_OP_BINARY, "\x00\x01\x02\x03\x04\x05", 6);
  assert_msg(r, 4, ARQ_WS_OP_TEXT, "\xE2\x82\xAC", 3);
  assert_msg(r, 5, ARQ_WS_OP_TEXT, long_text, long_len);
  assert_int_equal(r->msgs[6].opcode, ARQ_WS_OP_CLOSE);
  assert_int_equal(r->msgs[6].close_code, 1000);
  assert_int_equal(r->msgs[6].reason_len, 3);
  assert_memory_equal(r->msgs[6].reason, "bye", 3);
}

static void test_split_at_every_byte(void **state) {
  uint8_t long_text[300];
  for (size_t i = 0; i < sizeof long_text; i++)
    long_text[i] = (uint8_t)('a' + i % 26);
  bytes_t b = {0};
  build_mixed_stream(&b, long_text, sizeof long_text);

  results_t whole = {0};
  decode_all(&b, BIG_LIMIT, &whole);
  assert_mixed_results(&whole, long_text, sizeof long_text);

  uint8_t *copy = malloc(b.n);
  assert_non_null(copy);
  for (size_t cut = 0; cut <= b.n; cut++) {
    memcpy(copy, b.p, b.n);
    arq_ws_decoder_t d;
    arq_ws_decoder_init(&d, BIG_LIMIT, true);
    results_t r = {0};
    assert_int_equal(feed(&d, copy, cut, &r), ARQ_AGAIN);
    assert_int_equal(feed(&d, copy + cut, b.n - cut, &r), ARQ_AGAIN);
    assert_results_equal(&r, &whole);
    assert_true(arq_ws_decoder_idle(&d));
    results_free(&r);
    arq_ws_decoder_free(&d);
  }

  /* Byte by byte. */
  memcpy(copy, b.p, b.n);
  arq_ws_decoder_t d;
  arq_ws_decoder_init(&d, BIG_LIMIT, true);
  results_t r = {0};
  for (size_t i = 0; i < b.n; i++)
    assert_int_equal(feed(&d, copy + i, 1, &r), ARQ_AGAIN);
  assert_results_equal(&r, &whole);
  assert_true(arq_ws_decoder_idle(&d));
  results_free(&r);
  arq_ws_decoder_free(&d);

  /* In three pieces at a spread of cut pairs. */
  for (size_t a = 0; a <= b.n; a += 7) {
    for (size_t c = a; c <= b.n; c += 11) {
      memcpy(copy, b.p, b.n);
      arq_ws_decoder_init(&d, BIG_LIMIT, true);
      feed(&d, copy, a, &r);
      feed(&d, copy + a, c - a, &r);
      feed(&d, copy + c, b.n - c, &r);
      assert_results_equal(&r, &whole);
      results_free(&r);
      arq_ws_decoder_free(&d);
    }
  }

  free(copy);
  results_free(&whole);
  bytes_free(&b);
}

static void test_error_is_sticky(void **state) {
  struct {
    const char *bytes;
    size_t n;
    uint64_t limit;
    int err;
    uint16_t code;
  } cases[] = {
      {"\xC1\x80\x00\x00\x00\x00", 6, BIG_LIMIT, ARQ_EPROTO, 1002},        /* RSV1 */
      {"\x81\x81\x00\x00\x00\x00\xFF", 7, BIG_LIMIT, ARQ_EUTF8, 1007},     /* text 0xFF */
      {"\x82\x8B\x00\x00\x00\x00", 6, 10, ARQ_ETOOBIG, 1009},              /* 11 > 10 */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    arq_ws_decoder_t d;
    arq_ws_decoder_init(&d, cases[i].limit, true);
    uint8_t buf[16];
    memcpy(buf, cases[i].bytes, cases[i].n);
    results_t r = {0};
    assert_int_equal(feed(&d, buf, cases[i].n, &r), cases[i].err);
    assert_int_equal(d.close_code, cases[i].code);
    /* A valid frame afterwards still gets the error, and nothing is taken. */
    bytes_t ok = {0};
    put_masked(&ok, true, ARQ_WS_OP_TEXT, "fine", 4);
    for (int k = 0; k < 3; k++) {
      size_t used = 99;
      arq_ws_msg_t m;
      assert_int_equal(arq_ws_decode(&d, ok.p, ok.n, &used, &m), cases[i].err);
      assert_int_equal(used, 0);
      assert_int_equal(d.close_code, cases[i].code);
    }
    assert_false(arq_ws_decoder_idle(&d));
    bytes_free(&ok);
    results_free(&r);
    arq_ws_decoder_free(&d);
  }
}

/* ================= idle state and memory ================= */

static void test_idle(void **state) {
  arq_ws_decoder_t d;
  arq_ws_decoder_init(&d, BIG_LIMIT, true);
  assert_true(arq_ws_decoder_idle(&d));
  assert_null(d.msg);

  bytes_t b = {0};
  put_masked(&b, true, ARQ_WS_OP_TEXT, "abcdefghij", 10); /* 16 bytes */
  results_t r = {0};

  /* Mid-header, after the header, mid-payload. */
  assert_int_equal(feed(&d, b.p, 1, &r), ARQ_AGAIN);
  assert_false(arq_ws_decoder_idle(&d));
  assert_int_equal(feed(&d, b.p + 1, 5, &r), ARQ_AGAIN);
  assert_false(arq_ws_decoder_idle(&d));
  assert_int_equal(feed(&d, b.p + 6, 4, &r), ARQ_AGAIN);
  assert_false(arq_ws_decoder_idle(&d));
  /* The rest: the message comes out and the decoder is idle again. */
  assert_int_equal(feed(&d, b.p + 10, 6, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 1);
  assert_msg(&r, 0, ARQ_WS_OP_TEXT, "abcdefghij", 10);
  assert_true(arq_ws_decoder_idle(&d));
  assert_null(d.msg);
  results_free(&r);
  bytes_free(&b);

  /* Between the fragments of a message (on a frame boundary) it is not idle. */
  put_masked(&b, false, ARQ_WS_OP_BINARY, "12", 2);
  size_t first = b.n;
  put_masked(&b, true, ARQ_WS_OP_PING, "", 0);
  size_t second = b.n;
  put_masked(&b, true, ARQ_WS_OP_CONT, "34", 2);
  assert_int_equal(feed(&d, b.p, first, &r), ARQ_AGAIN);
  assert_false(arq_ws_decoder_idle(&d));
  assert_int_equal(feed(&d, b.p + first, second - first, &r), ARQ_AGAIN);
  assert_false(arq_ws_decoder_idle(&d));
  assert_int_equal(feed(&d, b.p + second, b.n - second, &r), ARQ_AGAIN);
  assert_int_equal(r.n, 2);
  assert_msg(&r, 1, ARQ_WS_OP_BINARY, "1234", 4);
  assert_true(arq_ws_decoder_idle(&d));
  assert_null(d.msg);
  results_free(&r);
  bytes_free(&b);
  arq_ws_decoder_free(&d);
}

static void test_idle_decoder_holds_no_heap(void **state) {
  counting_start();
  arq_ws_decoder_t d;
  arq_ws_decoder_init(&d, 3000, true);
  bytes_t b = {0};
  uint8_t payload[3000];
  fill_pattern(payload, sizeof payload, 5);
  put_masked(&b, false, ARQ_WS_OP_BINARY, payload, 1000);
  put_masked(&b, false, ARQ_WS_OP_CONT, payload + 1000, 1000);
  put_masked(&b, true, ARQ_WS_OP_CONT, payload + 2000, 1000);
  put_masked(&b, true, ARQ_WS_OP_BINARY, payload, 3000);
  results_t r = {0};
  for (size_t i = 0; i < b.n; i += 100) {
    size_t k = b.n - i < 100 ? b.n - i : 100;
    assert_int_equal(feed(&d, b.p + i, k, &r), ARQ_AGAIN);
  }
  assert_int_equal(r.n, 2);
  assert_msg(&r, 0, ARQ_WS_OP_BINARY, payload, 3000);
  assert_msg(&r, 1, ARQ_WS_OP_BINARY, payload, 3000);
  assert_true(arq_ws_decoder_idle(&d));
  assert_int_equal(live_blocks, 0);
  assert_true(alloc_calls > 0);      /* split frames were assembled on the heap */
  assert_true(largest_request <= 3000); /* and never beyond the message limit */

  /* Freeing a decoder in the middle of a message releases its buffer. */
  put_masked(&b, false, ARQ_WS_OP_TEXT, "abc", 3);
  uint8_t *copy = dup_bytes(b.p + b.n - 9, 9);
  assert_int_equal(feed(&d, copy, 9, &r), ARQ_AGAIN);
  assert_false(arq_ws_decoder_idle(&d));
  arq_ws_decoder_free(&d);
  assert_int_equal(live_blocks, 0);
  counting_stop();
  /* It may be initialised again. */
  arq_ws_decoder_init(&d, BIG_LIMIT, true);
  assert_true(arq_ws_decoder_idle(&d));
  arq_ws_decoder_free(&d);
  free(copy);
  results_free(&r);
  bytes_free(&b);
}

static void *failing_malloc(size_t n) { return NULL; }
static void *failing_realloc(void *p, size_t n) { return NULL; }

/* In a child: makes every allocation fail, then decodes a frame split across
 * reads, which needs the assembly buffer. The contract is an abort whose
 * message names the size. */
static void test_out_of_memory_aborts(void **state) {
  int fds[2];
  assert_int_equal(pipe(fds), 0);
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    /* No cmocka assertions here: they belong to the parent. */
    dup2(fds[1], 2);
    close(fds[0]);
    close(fds[1]);
    static const arq_alloc_hooks_t failing = {failing_malloc, failing_realloc, free};
    arq_alloc_set_hooks(&failing);
    arq_ws_decoder_t d;
    arq_ws_decoder_init(&d, BIG_LIMIT, true);
    uint8_t frame[ARQ_WS_MAX_HEADER + 10] = {0};
    const uint8_t key[4] = {1, 2, 3, 4};
    size_t hl = arq_ws_header_encode(frame, true, ARQ_WS_OP_BINARY, 4321, key);
    size_t used;
    arq_ws_msg_t m;
    arq_ws_decode(&d, frame, hl + 10, &used, &m);
    _exit(0); /* not reached when the allocation failure aborts */
  }
  close(fds[1]);
  char out[1024];
  size_t got = 0;
  ssize_t k;
  while (got < sizeof out - 1 && (k = read(fds[0], out + got, sizeof out - 1 - got)) > 0)
    got += (size_t)k;
  out[got] = '\0';
  close(fds[0]);
  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFSIGNALED(status));
  assert_int_equal(WTERMSIG(status), SIGABRT);
  assert_non_null(strstr(out, "out of memory"));
  assert_non_null(strstr(out, "4321"));
}

/* ================= encoders ================= */

static void test_frame_new_decodes_on_client(void **state) {
  static const size_t lens[] = {0, 5, 125, 126, 65535, 65536};
  static const size_t hdr_sizes[] = {2, 2, 2, 4, 4, 10};
  static const uint8_t ops[] = {ARQ_WS_OP_TEXT, ARQ_WS_OP_BINARY};
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    for (size_t o = 0; o < 2; o++) {
      size_t n = lens[i];
      uint8_t *payload = malloc(n ? n : 1);
      assert_non_null(payload);
      for (size_t j = 0; j < n; j++)
        payload[j] = (uint8_t)('A' + j % 26);
      counting_start();
      arq_rcbuf_t *f = arq_ws_frame_new(ops[o], n ? payload : NULL, n);
      assert_int_equal(alloc_calls, 1); /* header and payload in one block */
      counting_stop();
      assert_int_equal(f->refs, 1);
      assert_int_equal(f->len, hdr_sizes[i] + n);
      assert_int_equal(f->data[0], 0x80 | ops[o]);
      assert_int_equal(f->data[1] & 0x80, 0); /* servers do not mask */

      arq_ws_decoder_t d;
      arq_ws_decoder_init(&d, BIG_LIMIT, false);
      uint8_t *copy = dup_bytes(f->data, f->len);
      results_t r = {0};
      assert_int_equal(feed(&d, copy, f->len, &r), ARQ_AGAIN);
      assert_int_equal(r.n, 1);
      assert_msg(&r, 0, ops[o], payload, n);
      results_free(&r);
      free(copy);
      arq_ws_decoder_free(&d);
      arq_rcbuf_unref(f);
      free(payload);
    }
  }
  /* Control frames too. */
  arq_rcbuf_t *f = arq_ws_frame_new(ARQ_WS_OP_PING, "hb", 2);
  arq_ws_decoder_t d;
  arq_ws_decoder_init(&d, BIG_LIMIT, false);
  results_t r = {0};
  assert_int_equal(feed(&d, f->data, f->len, &r), ARQ_AGAIN);
  assert_msg(&r, 0, ARQ_WS_OP_PING, "hb", 2);
  results_free(&r);
  arq_ws_decoder_free(&d);
  arq_rcbuf_unref(f);
}

static void test_rcbuf_refcount(void **state) {
  counting_start();
  arq_rcbuf_t *b = arq_rcbuf_new(10);
  assert_int_equal(b->refs, 1);
  assert_int_equal(b->len, 10);
  memset(b->data, 'x', 10);
  assert_ptr_equal(arq_rcbuf_ref(b), b);
  assert_ptr_equal(arq_rcbuf_ref(b), b);
  assert_int_equal(b->refs, 3);
  arq_rcbuf_unref(b);
  arq_rcbuf_unref(b);
  assert_int_equal(live_blocks, 1); /* one holder left */
  assert_int_equal(b->refs, 1);
  arq_rcbuf_unref(b);
  assert_int_equal(live_blocks, 0);
  counting_stop();
}

static void test_close_payload(void **state) {
  uint8_t out[ARQ_WS_MAX_CONTROL + 8];

  assert_int_equal(arq_ws_close_payload(out, 1000, NULL), 2);
  assert_memory_equal(out, "\x03\xE8", 2);
  assert_int_equal(arq_ws_close_payload(out, 4001, ""), 2);
  assert_memory_equal(out, "\x0F\xA1", 2);
  assert_int_equal(arq_ws_close_payload(out, 1008, "policy"), 8);
  assert_memory_equal(out, "\x03\xF0policy", 8);

  /* ASCII: 123 bytes fit exactly, more is cut to 125 in total. */
  char reason[400];
  memset(reason, 'r', sizeof reason);
  reason[123] = '\0';
  memset(out, 0xEE, sizeof out);
  assert_int_equal(arq_ws_close_payload(out, 1001, reason), 125);
  assert_memory_equal(out + 2, reason, 123);
  assert_int_equal(out[125], 0xEE); /* nothing written past 125 bytes */
  reason[123] = 'r';
  reason[399] = '\0';
  assert_int_equal(arq_ws_close_payload(out, 1001, reason), 125);
  assert_int_equal(out[125], 0xEE);

  /* A code point across the cut is left out whole, at every alignment. */
  static const char *cps[] = {"\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80"};
  for (size_t c = 0; c < 3; c++) {
    size_t cpl = strlen(cps[c]);
    for (size_t prefix = 115; prefix <= 125; prefix++) {
      memset(reason, 'r', prefix);
      size_t len = prefix;
      while (len + cpl < 200) {
        memcpy(reason + len, cps[c], cpl);
        len += cpl;
      }
      reason[len] = '\0';
      memset(out, 0xEE, sizeof out);
      size_t n = arq_ws_close_payload(out, 1000, reason);
      assert_true(n <= 125);
      assert_true(n >= 125 - (cpl - 1)); /* only what must go is dropped */
      assert_int_equal(out[125], 0xEE);
      assert_memory_equal(out + 2, reason, n - 2);
      assert_int_equal(arq_utf8_validate(out + 2, n - 2), 0);

      /* And it decodes as a close frame with that reason. */
      bytes_t b = {0};
      put_masked(&b, true, ARQ_WS_OP_CLOSE, out, n);
      results_t r = {0};
      assert_int_equal(decode_all(&b, BIG_LIMIT, &r), ARQ_AGAIN);
      assert_int_equal(r.msgs[0].close_code, 1000);
      assert_int_equal(r.msgs[0].reason_len, n - 2);
      results_free(&r);
      bytes_free(&b);
    }
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_mask_offsets_and_lengths),
      cmocka_unit_test(test_mask_long_buffer),
      cmocka_unit_test(test_header_encode_bytes),
      cmocka_unit_test(test_text_and_binary),
      cmocka_unit_test(test_ping_pong),
      cmocka_unit_test(test_close_forms),
      cmocka_unit_test(test_whole_frame_is_returned_in_place),
      cmocka_unit_test(test_length_boundaries),
      cmocka_unit_test(test_length_boundaries_text),
      cmocka_unit_test(test_fragmented_two),
      cmocka_unit_test(test_fragmented_many),
      cmocka_unit_test(test_fragmented_empty),
      cmocka_unit_test(test_control_between_fragments),
      cmocka_unit_test(test_close_between_fragments),
      cmocka_unit_test(test_invalid_utf8_single_frame),
      cmocka_unit_test(test_utf8_split_across_fragments),
      cmocka_unit_test(test_utf8_message_ends_mid_code_point),
      cmocka_unit_test(test_utf8_state_resets_between_messages),
      cmocka_unit_test(test_close_codes_invalid),
      cmocka_unit_test(test_close_codes_valid),
      cmocka_unit_test(test_close_one_byte_payload),
      cmocka_unit_test(test_close_reason_invalid_utf8),
      cmocka_unit_test(test_reserved_bits),
      cmocka_unit_test(test_unknown_opcodes),
      cmocka_unit_test(test_masking_direction),
      cmocka_unit_test(test_control_frame_too_long),
      cmocka_unit_test(test_fragmented_control_frame),
      cmocka_unit_test(test_continuation_without_message),
      cmocka_unit_test(test_new_message_inside_fragmented),
      cmocka_unit_test(test_length_top_bit),
      cmocka_unit_test(test_limit_single_frame),
      cmocka_unit_test(test_limit_fragments),
      cmocka_unit_test(test_limit_does_not_count_control_frames),
      cmocka_unit_test(test_split_at_every_byte),
      cmocka_unit_test(test_error_is_sticky),
      cmocka_unit_test(test_idle),
      cmocka_unit_test(test_idle_decoder_holds_no_heap),
      cmocka_unit_test(test_out_of_memory_aborts),
      cmocka_unit_test(test_frame_new_decodes_on_client),
      cmocka_unit_test(test_rcbuf_refcount),
      cmocka_unit_test(test_close_payload),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
