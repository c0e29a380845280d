/* History on Redis Streams, first step: write-through.
 *
 * Wraps the in-memory backend. Every message stored is kept in the memory
 * ring as before (which still answers history queries) and also appended to
 * the stream arqon:room:{room}:channel:{channel} with XADD, trimmed to about
 * the history size (MAXLEN ~). The entry has the fields "id" (the message
 * id), "position" and "envelope" (the JSON text as delivered). Appends are
 * asynchronous (arq_redis_command); while Redis is down they are skipped and
 * counted. Reading history back from the streams, positions as stream ids,
 * and delivery through the streams across nodes come next.
 */
#include <stdio.h>
#include <string.h>

#include "bus/history.h"
#include "store/history_redis.h"
#include "store/redis.h"
#include "util/alloc.h"

#define MAX_IN_FLIGHT 65536 /* appends sent but not yet answered */

typedef struct redis_history {
  arq_history_t base;
  arq_history_t *mem;
  arq_redis_t *redis;
  size_t maxlen;
  arq_history_redis_stats_t st;
} redis_history_t;

static void on_xadd(redisAsyncContext *ac, void *reply, void *privdata) {
  redis_history_t *h = privdata;
  redisReply *r = reply;
  if (!h)
    return;
  if (!r || r->type == REDIS_REPLY_ERROR)
    h->st.failed++;
  else
    h->st.written++;
}

static uint64_t rh_append(arq_history_t *base, const char *room, const char *channel, const char *id,
                          arq_rcbuf_t *frame, size_t off, size_t len) {
  redis_history_t *h = (redis_history_t *)base;
  uint64_t pos = h->mem->ops->append(h->mem, room, channel, id, frame, off, len);
  if (pos == 0)
    return 0;
  /* A Redis that is slow but still answering must not let appends pile up
   * in hiredis' output buffer without bound: past the cap they are skipped. */
  if (h->st.pending - h->st.written - h->st.failed >= MAX_IN_FLIGHT) {
    h->st.skipped++;
    return pos;
  }
  char key[2 * 64 + 40], position[24], maxlen[24];
  snprintf(key, sizeof key, "arqon:room:%s:channel:%s", room, channel);
  snprintf(position, sizeof position, "%llu", (unsigned long long)pos);
  snprintf(maxlen, sizeof maxlen, "%zu", h->maxlen);
  int rc = arq_redis_command(h->redis, on_xadd, h, "XADD %s MAXLEN ~ %s * id %s position %s envelope %b", key, maxlen,
                             id, position, (const char *)frame->data + off, len);
  if (rc != 0)
    h->st.skipped++;
  else
    h->st.pending++;
  return pos;
}

static void rh_query(arq_history_t *base, const arq_hist_query_t *q, arq_hist_cb cb, void *ud) {
  redis_history_t *h = (redis_history_t *)base;
  h->mem->ops->query(h->mem, q, cb, ud);
}

static void rh_drop(arq_history_t *base, const char *room, const char *channel) {
  /* The stream stays: it is the durable copy (a channel removed for being
   * empty must not lose it). */
  redis_history_t *h = (redis_history_t *)base;
  h->mem->ops->drop(h->mem, room, channel);
}

static size_t rh_count(arq_history_t *base, const char *room, const char *channel) {
  redis_history_t *h = (redis_history_t *)base;
  return h->mem->ops->count(h->mem, room, channel);
}

static size_t rh_total(arq_history_t *base) {
  redis_history_t *h = (redis_history_t *)base;
  return h->mem->ops->total(h->mem);
}

static uint64_t rh_next_position(arq_history_t *base, const char *room, const char *channel) {
  redis_history_t *h = (redis_history_t *)base;
  return h->mem->ops->next_position(h->mem, room, channel);
}

static void rh_free(arq_history_t *base) {
  redis_history_t *h = (redis_history_t *)base;
  h->mem->ops->free(h->mem);
  arq_free(h);
}

static const arq_history_ops_t redis_ops = {
    .append = rh_append,
    .query = rh_query,
    .drop = rh_drop,
    .count = rh_count,
    .total = rh_total,
    .free = rh_free,
    .next_position = rh_next_position,
};

arq_history_t *arq_history_redis_new(arq_redis_t *redis, size_t capacity, uint64_t first_position) {
  redis_history_t *h = arq_calloc(1, sizeof *h);
  h->base.ops = &redis_ops;
  h->mem = arq_history_mem_new_at(capacity, first_position);
  h->redis = redis;
  h->maxlen = capacity ? capacity : 1;
  return &h->base;
}

const arq_history_redis_stats_t *arq_history_redis_stats(const arq_history_t *h) {
  return h->ops == &redis_ops ? &((const redis_history_t *)h)->st : NULL;
}
