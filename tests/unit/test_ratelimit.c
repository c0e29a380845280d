/* Unit tests for bus/ratelimit: the per-client token buckets.
 *
 * Time is passed explicitly (nanoseconds), so every case is exact: a bucket
 * starts full with one second's worth, refills continuously, refuses without
 * taking anything and says when the same message would pass.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "bus/ratelimit.h"

#define SEC UINT64_C(1000000000)
#define MS UINT64_C(1000000)

static uint64_t retry;

/* Sends 'n' messages of 'len' bytes at 'now' and returns how many passed. */
static unsigned burst(arq_rate_t *r, uint64_t msgs, uint64_t bytes, unsigned n, size_t len, uint64_t now) {
  unsigned ok = 0;
  for (unsigned i = 0; i < n; i++)
    ok += arq_rate_admit(r, msgs, bytes, len, now, &retry) == ARQ_RATE_OK;
  return ok;
}

static void test_burst_of_one_seconds_worth(void **state) {
  arq_rate_t r;
  arq_rate_init(&r, 5 * SEC);
  assert_int_equal(burst(&r, 10, 0, 10, 100, 5 * SEC), 10);
  assert_int_equal(arq_rate_admit(&r, 10, 0, 100, 5 * SEC, &retry), ARQ_RATE_MESSAGES);
  assert_int_equal(retry, 100 * MS); /* one token at 10/s */
  /* Refused messages take nothing: the next token comes after 100 ms. */
  assert_int_equal(arq_rate_admit(&r, 10, 0, 100, 5 * SEC + 100 * MS - 1, &retry), ARQ_RATE_MESSAGES);
  assert_int_equal(retry, 1);
  assert_int_equal(arq_rate_admit(&r, 10, 0, 100, 5 * SEC + 100 * MS, &retry), ARQ_RATE_OK);
  assert_int_equal(arq_rate_admit(&r, 10, 0, 100, 5 * SEC + 100 * MS, &retry), ARQ_RATE_MESSAGES);
}

static void test_steady_rate_passes(void **state) {
  arq_rate_t r;
  arq_rate_init(&r, 0);
  burst(&r, 1000, 0, 1000, 1, 0); /* empty */
  /* Exactly the rate, one message a millisecond, for ten seconds. */
  for (uint64_t t = 1; t <= 10000; t++)
    assert_int_equal(arq_rate_admit(&r, 1000, 0, 1, t * MS, &retry), ARQ_RATE_OK);
  /* Twice the rate: every other message is refused. */
  unsigned ok = 0;
  for (uint64_t t = 1; t <= 2000; t++)
    ok += arq_rate_admit(&r, 1000, 0, 1, 10 * SEC + t * MS / 2, &retry) == ARQ_RATE_OK;
  assert_int_equal(ok, 1000);
}

static void test_refill_caps_at_one_second(void **state) {
  arq_rate_t r;
  arq_rate_init(&r, 0);
  assert_int_equal(burst(&r, 5, 0, 10, 1, 0), 5);
  /* An hour of quiet refills one second's worth, no more. */
  assert_int_equal(burst(&r, 5, 0, 10, 1, 3600 * SEC), 5);
  /* Half a second refills half. */
  assert_int_equal(burst(&r, 5, 0, 10, 1, 3600 * SEC + SEC / 2), 2);
}

static void test_bytes_bucket(void **state) {
  arq_rate_t r;
  arq_rate_init(&r, 0);
  /* 1000 bytes/s: three 300-byte messages pass, the fourth waits for 200 bytes. */
  assert_int_equal(burst(&r, 0, 1000, 3, 300, 0), 3);
  assert_int_equal(arq_rate_admit(&r, 0, 1000, 300, 0, &retry), ARQ_RATE_BYTES);
  assert_int_equal(retry, 200 * MS);
  /* A small one still fits in what is left. */
  assert_int_equal(arq_rate_admit(&r, 0, 1000, 100, 0, &retry), ARQ_RATE_OK);
  assert_int_equal(arq_rate_admit(&r, 0, 1000, 1, 0, &retry), ARQ_RATE_BYTES);
}

static void test_both_buckets_and_the_longer_wait(void **state) {
  arq_rate_t r;
  arq_rate_init(&r, 0);
  assert_int_equal(burst(&r, 2, 1000, 2, 100, 0), 2);
  /* Messages are short (500 ms), bytes are not (800 bytes left). */
  assert_int_equal(arq_rate_admit(&r, 2, 1000, 100, 0, &retry), ARQ_RATE_MESSAGES);
  assert_int_equal(retry, 500 * MS);
  arq_rate_init(&r, 0);
  assert_int_equal(burst(&r, 100, 1000, 1, 900, 0), 1);
  /* Bytes are short by 400 (400 ms); messages are not. Nothing was taken. */
  assert_int_equal(arq_rate_admit(&r, 100, 1000, 500, 0, &retry), ARQ_RATE_BYTES);
  assert_int_equal(retry, 400 * MS);
  assert_int_equal(burst(&r, 100, 0, 99, 1, 0), 99); /* the message bucket still had 99 */
}

static void test_message_larger_than_the_bucket(void **state) {
  arq_rate_t r;
  arq_rate_init(&r, 0);
  /* 3000 bytes under 1000 bytes/s: it passes on a full bucket, then the debt
   * keeps everything out for three seconds. */
  assert_int_equal(arq_rate_admit(&r, 0, 1000, 3000, 0, &retry), ARQ_RATE_OK);
  assert_int_equal(arq_rate_admit(&r, 0, 1000, 1, 0, &retry), ARQ_RATE_BYTES);
  assert_int_equal(retry, 2 * SEC + MS);
  assert_int_equal(arq_rate_admit(&r, 0, 1000, 3000, 2 * SEC, &retry), ARQ_RATE_BYTES);
  assert_int_equal(retry, SEC); /* back to a full bucket */
  assert_int_equal(arq_rate_admit(&r, 0, 1000, 3000, 3 * SEC, &retry), ARQ_RATE_OK);
}

static void test_time_going_back_and_limits_off(void **state) {
  arq_rate_t r;
  arq_rate_init(&r, 10 * SEC);
  assert_int_equal(burst(&r, 3, 0, 3, 1, 10 * SEC), 3);
  /* An earlier time counts as no time passed. */
  assert_int_equal(arq_rate_admit(&r, 3, 0, 1, 9 * SEC, &retry), ARQ_RATE_MESSAGES);
  assert_int_equal(arq_rate_admit(&r, 3, 0, 1, 10 * SEC + SEC / 3 + 1, &retry), ARQ_RATE_OK);
  /* Both off: anything passes. */
  assert_int_equal(burst(&r, 0, 0, 100000, 1u << 30, 0), 100000);
}

static void test_extremes_do_not_overflow(void **state) {
  arq_rate_t r;
  arq_rate_init(&r, 0);
  /* The largest rates and a cost over the cap. */
  assert_int_equal(arq_rate_admit(&r, UINT64_MAX, UINT64_MAX, SIZE_MAX, 0, &retry), ARQ_RATE_OK);
  assert_int_equal(arq_rate_admit(&r, ARQ_RATE_MAX, ARQ_RATE_MAX, ARQ_RATE_MAX, 0, &retry), ARQ_RATE_BYTES);
  assert_true(retry > 0 && retry <= SEC);
  assert_int_equal(arq_rate_admit(&r, ARQ_RATE_MAX, ARQ_RATE_MAX, 1, UINT64_MAX, &retry), ARQ_RATE_OK);
  arq_rate_init(&r, 0);
  assert_int_equal(arq_rate_admit(&r, 1, 1, 1, 0, &retry), ARQ_RATE_OK);
  assert_int_equal(arq_rate_admit(&r, 1, 1, 1, 0, &retry), ARQ_RATE_MESSAGES);
  assert_int_equal(retry, SEC);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_burst_of_one_seconds_worth),
      cmocka_unit_test(test_steady_rate_passes),
      cmocka_unit_test(test_refill_caps_at_one_second),
      cmocka_unit_test(test_bytes_bucket),
      cmocka_unit_test(test_both_buckets_and_the_longer_wait),
      cmocka_unit_test(test_message_larger_than_the_bucket),
      cmocka_unit_test(test_time_going_back_and_limits_off),
      cmocka_unit_test(test_extremes_do_not_overflow),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
