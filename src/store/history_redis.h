/* History written through to Redis Streams (see history_redis.c). */
#ifndef ARQ_STORE_HISTORY_REDIS_H
#define ARQ_STORE_HISTORY_REDIS_H

#include <stdint.h>

#include "bus/history.h"

struct arq_redis;

typedef struct arq_history_redis_stats {
  uint64_t pending;  /* XADDs sent */
  uint64_t written;  /* ... acknowledged by Redis */
  uint64_t failed;   /* ... answered with an error or lost with the connection */
  uint64_t skipped;  /* messages not written because Redis was unreachable */
} arq_history_redis_stats_t;

/* Returns a history backend (caller owns) that keeps 'capacity' messages per
 * channel in memory and appends every message to its Redis stream through
 * 'redis' (borrowed; it must outlive the backend's use, and callbacks it
 * runs after the backend is freed must not happen: free the backend only
 * after arq_redis_close()). */
arq_history_t *arq_history_redis_new(struct arq_redis *redis, size_t capacity, uint64_t first_position);

/* Returns the write-through counters of 'h', or NULL when 'h' is not this
 * backend. */
const arq_history_redis_stats_t *arq_history_redis_stats(const arq_history_t *h);

#endif
