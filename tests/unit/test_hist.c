/* Unit tests for util/hist: fixed-bucket latency histograms.
 *
 * A bucket counts the observations at most its upper bound and above the
 * previous one (the counts are not cumulative; the Prometheus exposition adds
 * them up). An observation above the last bound (1 s) counts only in 'count',
 * the implicit +Inf bucket. The bounds are checked at their exact value in
 * nanoseconds and one nanosecond above, as the exposition's "le" labels
 * promise: le is inclusive.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <string.h>

#include "util/hist.h"

/* The bound of bucket 'i' in nanoseconds. */
static uint64_t bound_ns(int i) { return (uint64_t)(arq_hist_bounds[i] * 1e9 + 0.5); }

static uint64_t bucket_total(const arq_hist_t *h) {
  uint64_t n = 0;
  for (int i = 0; i < ARQ_HIST_NBOUNDS; i++)
    n += h->buckets[i];
  return n;
}

/* Asserts that 'h' holds exactly one observation, in bucket 'want' (-1: +Inf). */
static void expect_only(const arq_hist_t *h, int want) {
  assert_int_equal(h->count, 1);
  for (int i = 0; i < ARQ_HIST_NBOUNDS; i++) {
    if (h->buckets[i] != (i == want ? 1u : 0u))
      print_error("bucket %d holds %llu (want the observation in %d)\n", i, (unsigned long long)h->buckets[i], want);
    assert_int_equal(h->buckets[i], i == want ? 1 : 0);
  }
}

static void test_bounds(void **state) {
  assert_int_equal(ARQ_HIST_NBOUNDS, 16);
  assert_true(arq_hist_bounds[0] == 0.000005); /* 5 us */
  assert_true(arq_hist_bounds[ARQ_HIST_NBOUNDS - 1] == 1.0);
  for (int i = 1; i < ARQ_HIST_NBOUNDS; i++)
    assert_true(arq_hist_bounds[i] > arq_hist_bounds[i - 1]);
  assert_int_equal(bound_ns(0), 5000);
  assert_int_equal(bound_ns(7), 1000000);
  assert_int_equal(bound_ns(ARQ_HIST_NBOUNDS - 1), 1000000000);
}

/* Each bound belongs to its own bucket; one nanosecond more belongs to the
 * next one (or to +Inf after the last). */
static void test_bounds_inclusive(void **state) {
  for (int i = 0; i < ARQ_HIST_NBOUNDS; i++) {
    arq_hist_t at = {0}, above = {0}, below = {0};
    print_message("bound %d: %llu ns\n", i, (unsigned long long)bound_ns(i));
    arq_hist_observe(&at, bound_ns(i));
    expect_only(&at, i);
    assert_int_equal(at.sum_ns, bound_ns(i));
    arq_hist_observe(&above, bound_ns(i) + 1);
    expect_only(&above, i + 1 < ARQ_HIST_NBOUNDS ? i + 1 : -1);
    arq_hist_observe(&below, bound_ns(i) - 1);
    expect_only(&below, i);
  }
}

static void test_zero_and_small(void **state) {
  arq_hist_t h = {0};
  arq_hist_observe(&h, 0);
  expect_only(&h, 0);
  assert_int_equal(h.sum_ns, 0);
  arq_hist_observe(&h, 1);
  arq_hist_observe(&h, 4999);
  assert_int_equal(h.count, 3);
  assert_int_equal(h.buckets[0], 3);
  assert_int_equal(h.sum_ns, 5000);
}

static void test_inf(void **state) {
  arq_hist_t h = {0};
  arq_hist_observe(&h, 1000000001);
  expect_only(&h, -1);
  arq_hist_observe(&h, 3600ull * 1000000000ull); /* an hour */
  assert_int_equal(h.count, 2);
  assert_int_equal(bucket_total(&h), 0);
  assert_int_equal(h.sum_ns, 1000000001ull + 3600ull * 1000000000ull);
  /* The largest value fits too (alone: the sum cannot overflow). */
  arq_hist_t big = {0};
  arq_hist_observe(&big, UINT64_MAX);
  expect_only(&big, -1);
  assert_true(big.sum_ns == UINT64_MAX);
}

static void test_count_and_sum(void **state) {
  arq_hist_t h;
  memset(&h, 0, sizeof h);
  static const uint64_t obs[] = {100, 5000, 5001, 20000, 30000, 2000000, 2000000, 999999999, 1000000000, 1500000000};
  uint64_t sum = 0;
  for (size_t i = 0; i < sizeof obs / sizeof obs[0]; i++) {
    arq_hist_observe(&h, obs[i]);
    sum += obs[i];
  }
  assert_int_equal(h.count, 10);
  assert_int_equal(h.sum_ns, sum);
  assert_int_equal(h.buckets[0], 2);  /* 100, 5000 */
  assert_int_equal(h.buckets[1], 1);  /* 5001 */
  assert_int_equal(h.buckets[2], 1);  /* 20000 <= 25 us */
  assert_int_equal(h.buckets[3], 1);  /* 30000 <= 50 us */
  assert_int_equal(h.buckets[8], 2);  /* 2 ms <= 2.5 ms */
  assert_int_equal(h.buckets[15], 2); /* 999999999 and exactly 1 s */
  assert_int_equal(bucket_total(&h), 9); /* 1.5 s only in +Inf */
  assert_int_equal(h.count - bucket_total(&h), 1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_bounds),
      cmocka_unit_test(test_bounds_inclusive),
      cmocka_unit_test(test_zero_and_small),
      cmocka_unit_test(test_inf),
      cmocka_unit_test(test_count_and_sum),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
