/* The in-memory history backend: one ring buffer per channel.
 *
 * Rings are found by "room:channel" in a hash table and created on the first
 * append. A ring's slot array grows by doubling up to the capacity, so the
 * many channels that only ever see a few messages cost a few slots, not
 * 'capacity' of them; until it is full no slot has wrapped, so growing is a
 * plain realloc. Each slot holds a reference to the frame the message was delivered
 * in; overwriting a slot drops that reference. Positions count from 1 per
 * channel and never repeat while the server runs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uthash.h>

#include "bus/history.h"
#include "bus/names.h"
#include "util/alloc.h"
#include "util/err.h"

typedef struct ring {
  char key[2 * ARQ_NAME_MAX + 2];
  arq_hist_item_t *slots; /* 'nslots' slots; the oldest at 'head' */
  size_t nslots;          /* grows to the capacity as messages arrive */
  size_t head, count;
  uint64_t created_after; /* the last position given out before this ring existed */
  uint64_t dropped_upto;  /* the newest position overwritten (0: none) */
  UT_hash_handle hh;
} ring_t;

typedef struct mem {
  arq_history_t base;
  size_t cap;
  size_t total;
  uint64_t next_seq;    /* positions are one sequence for all channels: they never repeat, even in a
                         * channel deleted and created again */
  uint64_t dropped_max; /* the newest position a dropped channel held */
  ring_t *rings;
  const arq_hist_item_t **view; /* scratch for query results */
} mem_t;

static void make_key(char *key, const char *room, const char *channel) {
  snprintf(key, 2 * ARQ_NAME_MAX + 2, "%s:%s", room, channel);
}

static ring_t *find(mem_t *m, const char *room, const char *channel) {
  char key[2 * ARQ_NAME_MAX + 2];
  make_key(key, room, channel);
  ring_t *r = NULL;
  HASH_FIND_STR(m->rings, key, r);
  return r;
}

static void clear_item(arq_hist_item_t *it) {
  arq_rcbuf_unref(it->frame);
  arq_free(it->id);
  memset(it, 0, sizeof *it);
}

uint64_t arq_hist_pos_value(const char *s) {
  char *end;
  uint64_t a = strtoull(s, &end, 10);
  if (*end != '-')
    return a;
  return a << ARQ_HIST_SEQ_BITS | (strtoull(end + 1, NULL, 10) & ((1ULL << ARQ_HIST_SEQ_BITS) - 1));
}

/* Stores a message at position 'seq' (0: next_seq). */
static uint64_t put(mem_t *m, const char *room, const char *channel, const char *id, arq_rcbuf_t *frame, size_t off,
                    size_t len, uint64_t seq) {
  if (m->cap == 0)
    return 0;
  ring_t *r = find(m, room, channel);
  if (!r) {
    r = arq_calloc(1, sizeof *r);
    make_key(r->key, room, channel);
    r->created_after = m->next_seq - 1;
    HASH_ADD_STR(m->rings, key, r);
  }
  arq_hist_item_t *it;
  if (r->count == r->nslots && r->nslots < m->cap) {
    size_t n = r->nslots ? 2 * r->nslots : 8;
    r->nslots = n < m->cap ? n : m->cap;
    r->slots = arq_realloc(r->slots, r->nslots * sizeof *r->slots);
  }
  if (r->count == m->cap) {
    it = &r->slots[r->head];
    r->dropped_upto = it->seq;
    clear_item(it);
    r->head = (r->head + 1) % m->cap;
  } else {
    it = &r->slots[(r->head + r->count) % m->cap];
    r->count++;
    m->total++;
  }
  it->frame = arq_rcbuf_ref(frame);
  it->off = (uint32_t)off;
  it->len = (uint32_t)len;
  it->seq = seq ? seq : m->next_seq++;
  it->id = arq_strdup(id);
  return it->seq;
}

static uint64_t mem_append(arq_history_t *h, const char *room, const char *channel, const char *id,
                           arq_rcbuf_t *frame, size_t off, size_t len) {
  return put((mem_t *)h, room, channel, id, frame, off, len, 0);
}

void arq_history_mem_put(arq_history_t *h, const char *room, const char *channel, const char *id, arq_rcbuf_t *frame,
                         size_t off, size_t len, uint64_t position) {
  mem_t *m = (mem_t *)h;
  if (position == 0) { /* not stored yet: it comes right after the newest message */
    ring_t *r = find(m, room, channel);
    position = r && r->count ? r->slots[(r->head + r->count - 1) % m->cap].seq + 1 : 1;
  }
  put(m, room, channel, id, frame, off, len, position);
}

static uint64_t mem_next_position(arq_history_t *h, const char *room, const char *channel) {
  mem_t *m = (mem_t *)h;
  if (m->cap == 0)
    return 0;
  (void)room;
  (void)channel;
  return m->next_seq;
}

static void mem_query(arq_history_t *h, const arq_hist_query_t *q, arq_hist_cb cb, void *ud) {
  mem_t *m = (mem_t *)h;
  arq_hist_result_t res = {.status = 0, .since_found = true};
  ring_t *r = find(m, q->room, q->channel);
  size_t count = r ? r->count : 0;
  size_t first = 0; /* index (0 = oldest) of the first message returned */
  size_t n;
  if (q->since && strncmp(q->since, "arq_", 4) != 0) {
    /* A position: everything after it. Something is missing when messages
     * after it were overwritten, or when it is older than this channel's
     * current life (the channel was removed and created again). Position 0
     * asks for everything since the channel came to be. */
    uint64_t pos = arq_hist_pos_value(q->since);
    if (!r)
      res.since_found = pos == 0 || pos >= m->dropped_max;
    else if (pos == 0)
      res.since_found = r->dropped_upto == 0;
    else
      res.since_found = pos >= r->dropped_upto && pos > r->created_after;
    first = count;
    for (size_t i = 0; i < count; i++) {
      if (r->slots[(r->head + i) % m->cap].seq > pos) {
        first = i;
        break;
      }
    }
    n = count - first < q->limit ? count - first : q->limit;
    res.more = first + n < count;
  } else if (q->since) {
    res.since_found = false;
    for (size_t i = count; i-- > 0;) {
      if (strcmp(r->slots[(r->head + i) % m->cap].id, q->since) == 0) {
        res.since_found = true;
        first = i + 1;
        break;
      }
    }
    n = count - first < q->limit ? count - first : q->limit;
    res.more = first + n < count;
  } else {
    n = count < q->limit ? count : q->limit;
    first = count - n;
    res.more = first > 0;
  }
  for (size_t i = 0; i < n; i++)
    m->view[i] = &r->slots[(r->head + first + i) % m->cap];
  res.items = m->view;
  res.count = n;
  cb(ud, &res);
}

static void free_ring(mem_t *m, ring_t *r) {
  for (size_t i = 0; i < r->count; i++)
    clear_item(&r->slots[(r->head + i) % m->cap]);
  m->total -= r->count;
  HASH_DEL(m->rings, r);
  arq_free(r->slots);
  arq_free(r);
}

static void mem_drop(arq_history_t *h, const char *room, const char *channel) {
  mem_t *m = (mem_t *)h;
  ring_t *r = find(m, room, channel);
  if (!r)
    return;
  /* Remember how far dropped history went: a client that asks for what came
   * after an older position of a channel that is gone is told of the gap. */
  uint64_t newest = r->count ? r->slots[(r->head + r->count - 1) % m->cap].seq : r->dropped_upto;
  if (newest > m->dropped_max)
    m->dropped_max = newest;
  free_ring(m, r);
}

static size_t mem_count(arq_history_t *h, const char *room, const char *channel) {
  ring_t *r = find((mem_t *)h, room, channel);
  return r ? r->count : 0;
}

static size_t mem_total(arq_history_t *h) { return ((mem_t *)h)->total; }

static void mem_free(arq_history_t *h) {
  mem_t *m = (mem_t *)h;
  ring_t *r, *tmp;
  HASH_ITER(hh, m->rings, r, tmp) free_ring(m, r);
  arq_free(m->view);
  arq_free(m);
}

static const arq_history_ops_t mem_ops = {
    .next_position = mem_next_position,
    .append = mem_append,
    .query = mem_query,
    .drop = mem_drop,
    .count = mem_count,
    .total = mem_total,
    .free = mem_free,
};

arq_history_t *arq_history_mem_new(size_t capacity) { return arq_history_mem_new_at(capacity, 1); }

arq_history_t *arq_history_mem_new_at(size_t capacity, uint64_t first_position) {
  mem_t *m = arq_calloc(1, sizeof *m);
  m->base.ops = &mem_ops;
  m->cap = capacity;
  m->view = arq_calloc(capacity ? capacity : 1, sizeof *m->view);
  m->next_seq = first_position ? first_position : 1;
  return &m->base;
}
