/* Fixed-bucket latency histograms (see hist.h). */
#include "util/hist.h"

const double arq_hist_bounds[ARQ_HIST_NBOUNDS] = {0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025,
                                                  0.0005,   0.001,   0.0025,   0.005,   0.01,   0.025,
                                                  0.05,     0.1,     0.25,     1.0};

static const uint64_t bounds_ns[ARQ_HIST_NBOUNDS] = {5000,    10000,    25000,    50000,    100000,    250000,
                                                     500000,  1000000,  2500000,  5000000,  10000000,  25000000,
                                                     50000000, 100000000, 250000000, 1000000000};

void arq_hist_observe(arq_hist_t *h, uint64_t ns) {
  h->count++;
  h->sum_ns += ns;
  for (int i = 0; i < ARQ_HIST_NBOUNDS; i++) {
    if (ns <= bounds_ns[i]) {
      h->buckets[i]++;
      return;
    }
  }
}
