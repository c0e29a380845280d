/* Unit tests for bus/names: the name rules, the room:channel split and the
 * query-value unescaper.
 *
 * Inputs that are not NUL-terminated are copied into allocations of their
 * exact length first, so that ASan reports any byte read past 'n'.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bus/names.h"
#include "util/err.h"

/* Returns 'n' copies of 'c' (caller frees). */
static char *repeat(char c, size_t n) {
  char *s = malloc(n + 1);
  assert_non_null(s);
  memset(s, c, n);
  s[n] = '\0';
  return s;
}

/* Returns the 'n' bytes at 's' in an allocation of exactly 'n' bytes. */
static char *exact(const char *s, size_t n) {
  char *p = malloc(n ? n : 1);
  assert_non_null(p);
  memcpy(p, s, n);
  return p;
}

static bool chan(const char *s) {
  char *p = exact(s, strlen(s));
  bool ok = arq_names_valid_channel(p, strlen(s));
  free(p);
  return ok;
}

static bool cid(const char *s) {
  char *p = exact(s, strlen(s));
  bool ok = arq_names_valid_client_id(p, strlen(s));
  free(p);
  return ok;
}

/* ---- name rules ---- */

static void test_channel_names_valid(void **state) {
  assert_true(chan("a"));
  assert_true(chan("Z"));
  assert_true(chan("0"));
  assert_true(chan("science"));
  assert_true(chan("Explore_1-2.3"));
  assert_true(chan("9lives"));
  assert_true(chan("a_"));
  assert_true(chan("a-"));
  assert_true(chan("a."));
}

static void test_channel_names_invalid(void **state) {
  assert_false(chan(""));
  assert_false(chan("_a"));
  assert_false(chan("-a"));
  assert_false(chan(".a"));
  assert_false(chan("a@b")); /* '@' is for client ids only */
  assert_false(chan("a:b"));
  assert_false(chan("a b"));
  assert_false(chan("a/b"));
  assert_false(chan("a+b"));
  assert_false(chan("caf\xc3\xa9"));
  assert_false(chan("\xc3\xa9t\xc3\xa9"));
  assert_false(chan("a\tb"));
}

static void test_channel_name_embedded_nul(void **state) {
  /* The length says 3: the NUL in the middle is a byte of the name. */
  assert_false(arq_names_valid_channel("a\0b", 3));
  assert_false(arq_names_valid_client_id("a\0b", 3));
  assert_true(arq_names_valid_channel("a\0b", 1));
}

static void test_name_length_boundaries(void **state) {
  char *s64 = repeat('a', 64), *s65 = repeat('a', 65);
  assert_int_equal(ARQ_NAME_MAX, 64);
  assert_true(chan(s64));
  assert_false(chan(s65));
  assert_true(cid(s64));
  assert_false(cid(s65));
  /* Only 'n' bytes are looked at. */
  assert_true(arq_names_valid_channel(s65, 64));
  assert_false(arq_names_valid_channel(s65, 0));
  free(s64);
  free(s65);
}

static void test_client_ids(void **state) {
  assert_true(cid("alice"));
  assert_true(cid("alice@example.com"));
  assert_true(cid("agent-7_b.c@d"));
  assert_true(cid("7"));
  assert_false(cid(""));
  assert_false(cid("@alice"));
  assert_false(cid("_alice"));
  assert_false(cid("alice smith"));
  assert_false(cid("alice:1"));
  assert_false(cid("al\xc3\xaf" "ce"));
  assert_false(cid("alice/1"));
}

/* ---- room:channel ---- */

static void test_split_room_channel(void **state) {
  char room[ARQ_NAME_MAX + 1], channel[ARQ_NAME_MAX + 1];
  assert_int_equal(arq_names_split("science:explore", room, channel), 0);
  assert_string_equal(room, "science");
  assert_string_equal(channel, "explore");
  assert_int_equal(arq_names_split("a:b", room, channel), 0);
  assert_string_equal(room, "a");
  assert_string_equal(channel, "b");
}

static void test_split_room_alone(void **state) {
  char room[ARQ_NAME_MAX + 1], channel[ARQ_NAME_MAX + 1] = "stale";
  assert_int_equal(arq_names_split("science", room, channel), 0);
  assert_string_equal(room, "science");
  assert_string_equal(channel, "");
}

static void test_split_invalid(void **state) {
  char room[ARQ_NAME_MAX + 1], channel[ARQ_NAME_MAX + 1];
  const char *bad[] = {"", ":", "science:", ":explore", "a:b:c", "sci ence:x", "science:ex plore", "_a:b", "a:_b",
                       "a::b", "science:explore:"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    print_message("split \"%s\"\n", bad[i]);
    assert_int_equal(arq_names_split(bad[i], room, channel), ARQ_EINVAL);
  }
}

static void test_split_length_boundaries(void **state) {
  char room[ARQ_NAME_MAX + 1], channel[ARQ_NAME_MAX + 1];
  char *r64 = repeat('r', 64), *c64 = repeat('c', 64), *r65 = repeat('r', 65), *c65 = repeat('c', 65);
  char buf[200];

  snprintf(buf, sizeof buf, "%s:%s", r64, c64);
  assert_int_equal(arq_names_split(buf, room, channel), 0);
  assert_string_equal(room, r64);
  assert_string_equal(channel, c64);

  snprintf(buf, sizeof buf, "%s:%s", r65, c64);
  assert_int_equal(arq_names_split(buf, room, channel), ARQ_EINVAL);
  snprintf(buf, sizeof buf, "%s:%s", r64, c65);
  assert_int_equal(arq_names_split(buf, room, channel), ARQ_EINVAL);
  assert_int_equal(arq_names_split(r65, room, channel), ARQ_EINVAL);
  assert_int_equal(arq_names_split(r64, room, channel), 0);
  assert_string_equal(room, r64);
  free(r64);
  free(c64);
  free(r65);
  free(c65);
}

/* ---- unescape ---- */

/* Unescapes 's' (not NUL-terminated in memory) into 'out' of 'cap' bytes. */
static long unesc(const char *s, char *out, size_t cap) {
  size_t n = strlen(s);
  char *p = exact(s, n);
  long r = arq_names_unescape(p, n, out, cap);
  free(p);
  return r;
}

static void test_unescape_plain_and_plus(void **state) {
  char out[64];
  assert_int_equal(unesc("alice", out, sizeof out), 5);
  assert_string_equal(out, "alice");
  assert_int_equal(unesc("a+b+", out, sizeof out), 4);
  assert_string_equal(out, "a b ");
  assert_int_equal(unesc("", out, sizeof out), 0);
  assert_string_equal(out, "");
}

static void test_unescape_percent(void **state) {
  char out[64];
  assert_int_equal(unesc("%41%62c", out, sizeof out), 3);
  assert_string_equal(out, "Abc");
  assert_int_equal(unesc("%2B%2b", out, sizeof out), 2);
  assert_string_equal(out, "++");
  assert_int_equal(unesc("science%3Aexplore", out, sizeof out), 15);
  assert_string_equal(out, "science:explore");
  assert_int_equal(unesc("caf%C3%A9", out, sizeof out), 5);
  assert_string_equal(out, "caf\xc3\xa9");
  /* Bytes are bytes: the unescaper does not judge UTF-8. */
  assert_int_equal(unesc("%ff", out, sizeof out), 1);
  assert_int_equal((unsigned char)out[0], 0xff);
  assert_int_equal(unesc("%25", out, sizeof out), 1);
  assert_string_equal(out, "%");
}

static void test_unescape_truncated_escapes(void **state) {
  char out[64];
  const char *bad[] = {"%", "%4", "a%", "a%4", "abc%", "%%", "%%41", "%4g", "%g4", "%zz", "% 41", "%-1"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    print_message("unescape \"%s\"\n", bad[i]);
    assert_int_equal(unesc(bad[i], out, sizeof out), -1);
  }
  /* An escape cut by 'n' is truncated even if the bytes after it look fine. */
  assert_int_equal(arq_names_unescape("%41", 2, out, sizeof out), -1);
  assert_int_equal(arq_names_unescape("ab%41", 2, out, sizeof out), 2);
  assert_string_equal(out, "ab");
}

static void test_unescape_nul_refused(void **state) {
  char out[64];
  assert_int_equal(unesc("%00", out, sizeof out), -1);
  assert_int_equal(unesc("abc%00def", out, sizeof out), -1);
  assert_int_equal(arq_names_unescape("a\0b", 3, out, sizeof out), -1);
}

static void test_unescape_overflow(void **state) {
  char out[8];
  memset(out, 'x', sizeof out);
  /* 'cap' counts the NUL: 3 bytes of text need 4. */
  assert_int_equal(unesc("abc", out, 3), -1);
  assert_int_equal(out[3], 'x');
  assert_int_equal(unesc("abc", out, 4), 3);
  assert_string_equal(out, "abc");
  assert_int_equal(unesc("%41%42%43", out, 3), -1);
  assert_int_equal(unesc("%41%42%43", out, 4), 3);
  assert_string_equal(out, "ABC");
  assert_int_equal(unesc("a", out, 1), -1);
  assert_int_equal(unesc("", out, 1), 0);
  assert_string_equal(out, "");
  /* A long value into a small buffer never writes past 'cap'. */
  char *big = repeat('q', 1000);
  memset(out, 'x', sizeof out);
  assert_int_equal(unesc(big, out, 5), -1);
  assert_int_equal(out[5], 'x');
  free(big);
}

/* 'cap' 0 has no room even for the NUL: the result must be -1 and nothing
 * may be written. */
static void test_unescape_cap_zero(void **state) {
  char out[2] = {'x', 'x'};
  assert_int_equal(arq_names_unescape("a", 1, out, 0), -1);
  assert_int_equal(out[0], 'x');
  long r = arq_names_unescape("", 0, out, 0);
  assert_int_equal(out[0], 'x'); /* BUG: names.c writes out[0] = '\0' with cap 0 */
  assert_int_equal(r, -1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_channel_names_valid),
      cmocka_unit_test(test_channel_names_invalid),
      cmocka_unit_test(test_channel_name_embedded_nul),
      cmocka_unit_test(test_name_length_boundaries),
      cmocka_unit_test(test_client_ids),
      cmocka_unit_test(test_split_room_channel),
      cmocka_unit_test(test_split_room_alone),
      cmocka_unit_test(test_split_invalid),
      cmocka_unit_test(test_split_length_boundaries),
      cmocka_unit_test(test_unescape_plain_and_plus),
      cmocka_unit_test(test_unescape_percent),
      cmocka_unit_test(test_unescape_truncated_escapes),
      cmocka_unit_test(test_unescape_nul_refused),
      cmocka_unit_test(test_unescape_overflow),
      cmocka_unit_test(test_unescape_cap_zero),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
