/* Token buckets for per-client rate limits (see ratelimit.h).
 *
 * A bucket of rate r holds at most r * 10^9 units (one second's worth of
 * tokens, in billionths) and gains r units per nanosecond. With r and a
 * cost both below 2^32, every level stays within +-2^62: no overflow.
 */
#include "bus/ratelimit.h"

#define UNIT INT64_C(1000000000) /* units per token */

static uint64_t clamp(uint64_t v) { return v > ARQ_RATE_MAX ? ARQ_RATE_MAX : v; }

void arq_rate_init(arq_rate_t *r, uint64_t now_ns) {
  /* INT64_MAX reads as "full" whatever the rate: the refill caps it. */
  r->msgs = r->bytes = (arq_bucket_t){.level = INT64_MAX, .at_ns = now_ns};
}

static void refill(arq_bucket_t *b, uint64_t rate, uint64_t now_ns) {
  int64_t cap = (int64_t)rate * UNIT;
  uint64_t dt = now_ns > b->at_ns ? now_ns - b->at_ns : 0;
  if (now_ns > b->at_ns)
    b->at_ns = now_ns;
  if (b->level >= cap) {
    b->level = cap;
    return;
  }
  uint64_t missing = (uint64_t)(cap - b->level);
  if (dt >= missing / rate + 1)
    b->level = cap;
  else
    b->level += (int64_t)(rate * dt);
  if (b->level > cap)
    b->level = cap;
}

/* Nanoseconds until 'cost' tokens may be taken (0: now). What is needed is
 * the cost, or a full bucket for a cost larger than the bucket. */
static uint64_t wait_for(const arq_bucket_t *b, uint64_t rate, uint64_t cost) {
  int64_t cap = (int64_t)rate * UNIT, need = (int64_t)cost * UNIT;
  if (need > cap)
    need = cap;
  if (b->level >= need)
    return 0;
  uint64_t deficit = (uint64_t)(need - b->level);
  return (deficit + rate - 1) / rate;
}

void arq_rate_charge(arq_rate_t *r, uint64_t msg_rate, uint64_t msgs, uint64_t now_ns) {
  msg_rate = clamp(msg_rate);
  if (!msg_rate || !msgs)
    return;
  refill(&r->msgs, msg_rate, now_ns);
  /* At most one bucket's worth of debt: the level stays within +-2^62. */
  r->msgs.level -= (int64_t)(msgs < msg_rate ? msgs : msg_rate) * UNIT;
}

arq_rate_verdict_t arq_rate_admit(arq_rate_t *r, uint64_t msg_rate, uint64_t byte_rate, size_t len, uint64_t now_ns,
                                  uint64_t *retry_ns) {
  msg_rate = clamp(msg_rate);
  byte_rate = clamp(byte_rate);
  uint64_t bytes = clamp(len);
  uint64_t wait_msgs = 0, wait_bytes = 0;
  if (msg_rate) {
    refill(&r->msgs, msg_rate, now_ns);
    wait_msgs = wait_for(&r->msgs, msg_rate, 1);
  }
  if (byte_rate) {
    refill(&r->bytes, byte_rate, now_ns);
    wait_bytes = wait_for(&r->bytes, byte_rate, bytes);
  }
  if (wait_msgs || wait_bytes) {
    *retry_ns = wait_msgs > wait_bytes ? wait_msgs : wait_bytes;
    return wait_msgs >= wait_bytes ? ARQ_RATE_MESSAGES : ARQ_RATE_BYTES;
  }
  if (msg_rate)
    r->msgs.level -= UNIT;
  if (byte_rate)
    r->bytes.level -= (int64_t)bytes * UNIT;
  return ARQ_RATE_OK;
}
