/* Latency histograms with fixed buckets, in the shape Prometheus exposes.
 *
 * Bucket upper bounds are the same for every histogram (ARQ_HIST_BOUNDS, in
 * seconds, from 5 us to 1 s), so one histogram is a small array of counts and
 * observing is a short scan. Values above the last bound count only in the
 * implicit +Inf bucket (count).
 */
#ifndef ARQ_UTIL_HIST_H
#define ARQ_UTIL_HIST_H

#include <stddef.h>
#include <stdint.h>

#define ARQ_HIST_NBOUNDS 16

typedef struct arq_hist {
  uint64_t buckets[ARQ_HIST_NBOUNDS]; /* observations <= bound i (not cumulative) */
  uint64_t count;                     /* all observations */
  uint64_t sum_ns;                    /* sum of all observations */
} arq_hist_t;

/* Upper bounds of the buckets, in seconds. */
extern const double arq_hist_bounds[ARQ_HIST_NBOUNDS];

/* Records one observation of 'ns' nanoseconds. */
void arq_hist_observe(arq_hist_t *h, uint64_t ns);

#endif
