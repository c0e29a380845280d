/* Per-client rate limits: two token buckets, one counting messages and one
 * counting bytes, refilled continuously at their rate per second and holding
 * at most one second's worth.
 *
 * No clock of its own: every call takes the time (monotonic nanoseconds), so
 * the bus passes a message's arrival time and the tests pass whatever they
 * like. Levels are kept in billionths of a token, so that a refill over any
 * number of nanoseconds is exact integer arithmetic.
 *
 * A message larger than a whole bucket (a 2 MiB message under a 1 MiB/s byte
 * limit) would never fit: it is admitted when the bucket is full and leaves
 * the bucket in debt, which the refill pays back before anything else passes.
 * The average rate is kept either way.
 */
#ifndef ARQ_BUS_RATELIMIT_H
#define ARQ_BUS_RATELIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The largest rate and the largest cost one bucket handles (2^32 - 1). */
#define ARQ_RATE_MAX UINT64_C(0xffffffff)

typedef struct arq_bucket {
  int64_t level;  /* billionths of a token; below 0 after a take larger than the bucket */
  uint64_t at_ns; /* time of the last refill */
} arq_bucket_t;

typedef struct arq_rate {
  arq_bucket_t msgs, bytes;
} arq_rate_t;

/* What arq_rate_admit() decided. */
typedef enum {
  ARQ_RATE_OK = 0,   /* admitted: one message and its bytes were taken */
  ARQ_RATE_MESSAGES, /* refused: the message bucket is short */
  ARQ_RATE_BYTES,    /* refused: the byte bucket is short */
} arq_rate_verdict_t;

/* Starts 'r' with both buckets full at time 'now_ns'. */
void arq_rate_init(arq_rate_t *r, uint64_t now_ns);

/* Admits a message of 'len' bytes at 'now_ns' under 'msg_rate' messages and
 * 'byte_rate' bytes per second (0: that bucket is off; both are capped at
 * ARQ_RATE_MAX, and 'len' too). Admitted, it takes one message and 'len'
 * bytes; refused, it takes nothing and sets '*retry_ns' to the time until
 * the same message would be admitted. A time before the last one counts as
 * no time passed. */
arq_rate_verdict_t arq_rate_admit(arq_rate_t *r, uint64_t msg_rate, uint64_t byte_rate, size_t len, uint64_t now_ns,
                                  uint64_t *retry_ns);

/* Takes 'msgs' more messages (at most one second's worth, 'msg_rate') from
 * the message bucket at 'now_ns', after the message that was admitted: the
 * cost of a request that did much more work than routing one message (a
 * listing of thousands of channels). The bucket may go into debt; later
 * messages wait until it is paid back. */
void arq_rate_charge(arq_rate_t *r, uint64_t msg_rate, uint64_t msgs, uint64_t now_ns);

#endif
