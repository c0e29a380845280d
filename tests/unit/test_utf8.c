/* Unit tests for wire/utf8: the incremental UTF-8 validator behind text
 * messages. Every refusal class of RFC 3629 (overlongs, surrogates, values
 * past U+10FFFF, stray and missing continuation bytes) is checked both as a
 * whole text and fed one piece at a time, since frames split code points.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <string.h>

#include "util/err.h"
#include "wire/utf8.h"

#define BYTES(s) (const uint8_t *)(s), sizeof(s) - 1

/* Feeds 'p' split in two at 'cut' and returns what a message end would say:
 * 0 when valid and complete, ARQ_EUTF8 otherwise. */
static int validate_split(const uint8_t *p, size_t n, size_t cut) {
  arq_utf8_t s;
  arq_utf8_init(&s);
  if (arq_utf8_feed(&s, p, cut) != 0)
    return ARQ_EUTF8;
  if (arq_utf8_feed(&s, p + cut, n - cut) != 0)
    return ARQ_EUTF8;
  return arq_utf8_complete(&s) ? 0 : ARQ_EUTF8;
}

/* Same, one byte per call. */
static int validate_bytewise(const uint8_t *p, size_t n) {
  arq_utf8_t s;
  arq_utf8_init(&s);
  for (size_t i = 0; i < n; i++)
    if (arq_utf8_feed(&s, p + i, 1) != 0)
      return ARQ_EUTF8;
  return arq_utf8_complete(&s) ? 0 : ARQ_EUTF8;
}

static void assert_valid(const uint8_t *p, size_t n) {
  assert_int_equal(arq_utf8_validate(p, n), 0);
  assert_int_equal(validate_bytewise(p, n), 0);
  for (size_t cut = 0; cut <= n; cut++)
    assert_int_equal(validate_split(p, n, cut), 0);
}

static void assert_invalid(const uint8_t *p, size_t n) {
  assert_int_equal(arq_utf8_validate(p, n), ARQ_EUTF8);
  assert_int_equal(validate_bytewise(p, n), ARQ_EUTF8);
  for (size_t cut = 0; cut <= n; cut++)
    assert_int_equal(validate_split(p, n, cut), ARQ_EUTF8);
}

static void test_empty(void **state) {
  assert_int_equal(arq_utf8_validate(NULL, 0), 0);
  arq_utf8_t s;
  arq_utf8_init(&s);
  assert_true(arq_utf8_complete(&s));
}

static void test_ascii(void **state) {
  assert_valid(BYTES("hello"));
  /* Long enough to go through the eight-bytes-at-a-time path, with the
   * multi-byte character at every alignment after an ASCII run. */
  assert_valid(BYTES("{\"type\":\"message\",\"room\":\"lobby\",\"payload\":\"abcdefghijklmnop\"}"));
  uint8_t buf[64];
  for (size_t at = 0; at + 2 <= sizeof buf; at++) {
    memset(buf, 'a', sizeof buf);
    buf[at] = 0xC3;
    buf[at + 1] = 0xA9; /* U+00E9 */
    assert_valid(buf, sizeof buf);
    buf[at + 1] = 'a'; /* lead byte without its continuation */
    assert_invalid(buf, sizeof buf);
  }
  uint8_t all[128];
  for (int i = 0; i < 128; i++)
    all[i] = (uint8_t)i;
  assert_valid(all, sizeof all);
}

static void test_multibyte_valid(void **state) {
  assert_valid(BYTES("\xC2\x80"));             /* U+0080, smallest 2-byte */
  assert_valid(BYTES("\xDF\xBF"));             /* U+07FF */
  assert_valid(BYTES("\xE0\xA0\x80"));         /* U+0800, smallest 3-byte */
  assert_valid(BYTES("\xE2\x82\xAC"));         /* U+20AC euro sign */
  assert_valid(BYTES("\xED\x9F\xBF"));         /* U+D7FF, just below the surrogates */
  assert_valid(BYTES("\xEE\x80\x80"));         /* U+E000, just above them */
  assert_valid(BYTES("\xEF\xBF\xBF"));         /* U+FFFF */
  assert_valid(BYTES("\xF0\x90\x80\x80"));     /* U+10000, smallest 4-byte */
  assert_valid(BYTES("\xF0\x9F\x98\x80"));     /* U+1F600 */
  assert_valid(BYTES("\xF4\x8F\xBF\xBF"));     /* U+10FFFF, the largest */
  assert_valid(BYTES("Hello-\xC2\xB5@\xC3\x9F\xC3\xB6\xC3\xA4\xC3\xBC\xC3\xA0\xC3\xA1-UTF-8!!"));
}

static void test_overlong(void **state) {
  assert_invalid(BYTES("\xC0\x80"));
  assert_invalid(BYTES("\xC1\xBF"));
  assert_invalid(BYTES("\xE0\x80\x80"));
  assert_invalid(BYTES("\xE0\x9F\xBF"));
  assert_invalid(BYTES("\xF0\x80\x80\x80"));
  assert_invalid(BYTES("\xF0\x8F\xBF\xBF"));
}

static void test_surrogates(void **state) {
  assert_invalid(BYTES("\xED\xA0\x80")); /* U+D800 */
  assert_invalid(BYTES("\xED\xAF\xBF")); /* U+DBFF */
  assert_invalid(BYTES("\xED\xB0\x80")); /* U+DC00 */
  assert_invalid(BYTES("\xED\xBF\xBF")); /* U+DFFF */
  assert_invalid(BYTES("\xED\xA0\x80\xED\xB0\x80")); /* a CESU-8 pair */
}

static void test_beyond_max(void **state) {
  assert_invalid(BYTES("\xF4\x90\x80\x80")); /* U+110000 */
  for (unsigned lead = 0xF5; lead <= 0xFF; lead++) {
    uint8_t b[4] = {(uint8_t)lead, 0x80, 0x80, 0x80};
    assert_invalid(b, sizeof b);
    assert_invalid(b, 1);
  }
}

static void test_stray_continuation(void **state) {
  for (unsigned c = 0x80; c <= 0xBF; c++) {
    uint8_t b[3] = {'a', (uint8_t)c, 'b'};
    assert_invalid(b, sizeof b);
    assert_invalid(b + 1, 1);
  }
  assert_invalid(BYTES("\xC3\xA9\xA9")); /* one continuation too many */
}

static void test_truncated(void **state) {
  assert_invalid(BYTES("\xC3"));
  assert_invalid(BYTES("\xE2\x82"));
  assert_invalid(BYTES("\xE2"));
  assert_invalid(BYTES("\xF0\x9F\x98"));
  assert_invalid(BYTES("\xF0\x9F"));
  assert_invalid(BYTES("\xF0"));
  assert_invalid(BYTES("\xE2\x82 ")); /* interrupted by ASCII */
  assert_invalid(BYTES("\xF0\x9F\x98\xC3\xA9"));
}

static void test_feed_prefix_is_incomplete(void **state) {
  /* A valid prefix is not an error until the message ends; complete() says
   * whether it ended on a boundary. */
  arq_utf8_t s;
  arq_utf8_init(&s);
  assert_int_equal(arq_utf8_feed(&s, BYTES("ab\xF0\x9F")), 0);
  assert_false(arq_utf8_complete(&s));
  assert_int_equal(arq_utf8_feed(&s, BYTES("\x98")), 0);
  assert_false(arq_utf8_complete(&s));
  assert_int_equal(arq_utf8_feed(&s, BYTES("\x80")), 0);
  assert_true(arq_utf8_complete(&s));
  /* An invalid byte is reported as soon as it is seen. */
  arq_utf8_init(&s);
  assert_int_equal(arq_utf8_feed(&s, BYTES("\xED")), 0);
  assert_int_equal(arq_utf8_feed(&s, BYTES("\xA0")), ARQ_EUTF8);
}

static void test_every_split_of_mixed_text(void **state) {
  static const uint8_t text[] = "a\xC3\xA9" "b\xE2\x82\xAC" "c\xF0\x9F\x98\x80" "d\xF4\x8F\xBF\xBF"
                                "\xED\x9F\xBF" "0123456789abcdef\xC2\x80";
  size_t n = sizeof text - 1;
  assert_valid(text, n);
  /* Three pieces at every pair of cut points. */
  for (size_t a = 0; a <= n; a++) {
    for (size_t b = a; b <= n; b++) {
      arq_utf8_t s;
      arq_utf8_init(&s);
      assert_int_equal(arq_utf8_feed(&s, text, a), 0);
      assert_int_equal(arq_utf8_feed(&s, text + a, b - a), 0);
      assert_int_equal(arq_utf8_feed(&s, text + b, n - b), 0);
      assert_true(arq_utf8_complete(&s));
    }
  }
  /* Every proper prefix that ends inside a code point is incomplete. */
  for (size_t cut = 1; cut < n; cut++) {
    arq_utf8_t s;
    arq_utf8_init(&s);
    assert_int_equal(arq_utf8_feed(&s, text, cut), 0);
    bool boundary = (text[cut] & 0xC0) != 0x80;
    assert_int_equal(arq_utf8_complete(&s), boundary);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_empty),
      cmocka_unit_test(test_ascii),
      cmocka_unit_test(test_multibyte_valid),
      cmocka_unit_test(test_overlong),
      cmocka_unit_test(test_surrogates),
      cmocka_unit_test(test_beyond_max),
      cmocka_unit_test(test_stray_continuation),
      cmocka_unit_test(test_truncated),
      cmocka_unit_test(test_feed_prefix_is_incomplete),
      cmocka_unit_test(test_every_split_of_mixed_text),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
