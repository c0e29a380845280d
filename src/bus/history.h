/* Message history behind one storage interface.
 *
 * The bus appends every event routed to a channel and answers the history
 * command through this interface only, so a backend (the in-memory ring here,
 * Redis Streams later) can be swapped without touching the router. Queries
 * complete through a callback because a networked backend answers later; the
 * in-memory backend calls it before returning.
 *
 * A stored message is the JSON text of the envelope as it was delivered: the
 * ring keeps a reference to the delivered frame itself, so history costs no
 * copy of the message.
 */
#ifndef ARQ_BUS_HISTORY_H
#define ARQ_BUS_HISTORY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/rcbuf.h"

/* One message as stored: JSON text at 'frame'->data + 'off', 'len' bytes. */
typedef struct arq_hist_item {
  arq_rcbuf_t *frame;
  uint32_t off;
  uint32_t len;
  uint64_t seq;  /* position in its channel, from 1 */
  char *id;      /* the envelope's id */
} arq_hist_item_t;

typedef struct arq_hist_query {
  const char *room;
  const char *channel;
  size_t limit;      /* at most this many messages */
  const char *since; /* NULL: the newest 'limit'; else the oldest 'limit' after this message id or position */
} arq_hist_query_t;

typedef struct arq_hist_result {
  int status;                       /* 0, or a negative ARQ_E* code */
  const arq_hist_item_t *const *items; /* oldest first; borrowed for the callback */
  size_t count;
  bool since_found;                 /* nothing is missing after 'since' (false: a gap, all retained messages follow) */
  bool more;                        /* more messages exist beyond the ones returned */
} arq_hist_result_t;

typedef void (*arq_hist_cb)(void *ud, const arq_hist_result_t *r);

typedef struct arq_history arq_history_t;

typedef struct arq_history_ops {
  /* Stores a message of 'room':'channel'. 'frame' is borrowed (the backend
   * takes its own reference if it keeps it); 'id' is copied. Returns the
   * message's position in its channel, or 0 when it was not stored. */
  uint64_t (*append)(arq_history_t *h, const char *room, const char *channel, const char *id, arq_rcbuf_t *frame,
                     size_t off, size_t len);
  /* Runs 'q' and calls 'cb' exactly once with the result. */
  void (*query)(arq_history_t *h, const arq_hist_query_t *q, arq_hist_cb cb, void *ud);
  /* Forgets the channel's messages (the channel was deleted). */
  void (*drop)(arq_history_t *h, const char *room, const char *channel);
  /* Returns how many messages the channel holds. */
  size_t (*count)(arq_history_t *h, const char *room, const char *channel);
  /* Returns how many messages are held in total. */
  size_t (*total)(arq_history_t *h);
  /* Releases the backend. */
  void (*free)(arq_history_t *h);
  /* Returns the position the next message stored in 'room':'channel' will
   * get, or 0 when it will not be stored or the backend gives no positions
   * (NULL is the same). */
  uint64_t (*next_position)(arq_history_t *h, const char *room, const char *channel);
} arq_history_ops_t;

struct arq_history {
  const arq_history_ops_t *ops;
};

/* Returns the in-memory backend (caller owns): a ring of 'capacity' messages
 * per channel, the oldest overwritten first. Positions start at 1. */
arq_history_t *arq_history_mem_new(size_t capacity);
/* The same with positions starting at 'first_position' (at least 1). The
 * server starts them at its start time in milliseconds times 1024, so that a
 * restarted server never hands out a position an earlier run did (unless that
 * run averaged over a million stored messages a second), and a client
 * resuming with a position from before the restart is told of the gap. */
arq_history_t *arq_history_mem_new_at(size_t capacity, uint64_t first_position);

/* Stores a message in the in-memory backend 'h' at the position 'position'
 * given by someone else (a Redis stream id as arq_hist_pos_value gives it; 0:
 * not known yet, it comes right after the channel's newest message, so that
 * a query since that message finds it). A cache of what a node delivered in
 * cluster mode. */
void arq_history_mem_put(arq_history_t *h, const char *room, const char *channel, const char *id, arq_rcbuf_t *frame,
                         size_t off, size_t len, uint64_t position);

/* A position as one number that orders like the position: digits as they
 * are, a Redis stream id "ms-seq" as ms << ARQ_HIST_SEQ_BITS | seq. */
#define ARQ_HIST_SEQ_BITS 22
uint64_t arq_hist_pos_value(const char *s);

#endif
