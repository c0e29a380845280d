/* Redis mode: durable history on Redis Streams, and several nodes sharing
 * Redis acting as one bus.
 *
 * Every message for a channel is appended with XADD to the stream
 * arqon:room:{room}:channel:{channel} on the channel's shard (a hash of
 * "room:channel" picks one of the configured Redis servers); the stream id
 * Redis gives it is its position. No node delivers a channel message when it
 * is published: each node reads the streams of the channels that have
 * members on it with one blocking XREAD per shard (on a connection of its
 * own) and delivers what it reads, so every node delivers every message of a
 * channel once, in stream order, whichever node it was published on.
 *
 * While a shard is unreachable, messages are delivered on this node at once
 * and held in memory (bounded by count and bytes), then written back in
 * order when Redis is back; in strict mode they are refused instead. An
 * acknowledgement is sent only for a message Redis has stored.
 *
 * Everything goes through hiredis' asynchronous API on the libuv loop
 * (store/redis.h): nothing here waits on Redis.
 */
#ifndef ARQ_STORE_CLUSTER_H
#define ARQ_STORE_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "bus/bus.h"
#include "store/redis.h"

typedef struct arq_cluster arq_cluster_t;

typedef struct arq_cluster_opts {
  const char *urls;         /* comma-separated redis:// URLs, one per shard (checked) */
  uint64_t timeout_ms;
  size_t history_size;      /* MAXLEN ~ of every stream (at least 1000), and the cache per channel */
  uint64_t max_age_ms;      /* streams are also trimmed to this age (MINID ~); 0: no age limit */
  bool strict;              /* refuse publishes that cannot be stored */
  size_t buffer_messages;   /* outage buffer bounds */
  size_t buffer_bytes;
  const char *node_id;      /* this node's name on the bus */
  uint64_t node_ttl_ms;     /* how long a silent node's clients stay present */
} arq_cluster_opts_t;

/* Returns a cluster (caller owns) that starts connecting at once. */
arq_cluster_t *arq_cluster_new(uv_loop_t *loop, const arq_cluster_opts_t *o);
/* Returns the history backend that reads the streams (owned by whoever
 * frees it: the bus; freeing it releases only the cache). */
arq_history_t *arq_cluster_history(arq_cluster_t *cl);
/* Tells the cluster its bus (after arq_bus_new). */
void arq_cluster_attach(arq_cluster_t *cl, arq_bus_t *bus);

/* The bus's io.append and io.interest. */
void arq_cluster_append(arq_cluster_t *cl, arq_bus_pub_t *p);
void arq_cluster_interest(arq_cluster_t *cl, const char *room, const char *channel, bool on);
/* The bus's io.cast: appended to the stream arqon:bus that every node reads. */
void arq_cluster_cast(arq_cluster_t *cl, const arq_bus_cast_t *m);

/* Periodic work (age trimming, the node's presence); 'now_ms' monotonic. */
void arq_cluster_tick(arq_cluster_t *cl, uint64_t now_ms);

/* True while every shard is reachable. */
bool arq_cluster_up(const arq_cluster_t *cl);
/* The first shard's connection error ("" when none). */
const char *arq_cluster_error(const arq_cluster_t *cl);
const char *arq_cluster_node_id(const arq_cluster_t *cl);
size_t arq_cluster_shards(const arq_cluster_t *cl);

typedef struct arq_cluster_stats {
  uint64_t written;       /* messages stored (XADD answered) */
  uint64_t failed;        /* XADDs that failed (error reply or connection lost) */
  uint64_t held;          /* messages put in the outage buffer */
  uint64_t written_back;  /* ... later stored */
  uint64_t refused;       /* publishes refused: strict mode or the buffer full */
  uint64_t read;          /* stream entries read by XREAD */
  uint64_t read_gaps;     /* times this node fell behind a stream past its trimming */
  uint64_t casts;         /* messages for the other nodes sent to arqon:bus */
  uint64_t casts_lost;    /* ... not sent: shard 0 was unreachable */
  uint64_t held_now;      /* in the outage buffer now */
  uint64_t held_bytes;
  arq_redis_stats_t redis; /* every connection's counters added up */
} arq_cluster_stats_t;
void arq_cluster_stats(const arq_cluster_t *cl, arq_cluster_stats_t *s);

/* The node is shutting down: its presence is withdrawn at once, so the
 * other nodes stop counting its clients (they are closing). */
void arq_cluster_leave(arq_cluster_t *cl);

/* Starts closing: messages still held or in flight end (their senders are
 * gone by now), connections close. */
void arq_cluster_close(arq_cluster_t *cl);
/* Frees what is left once the loop has run the close callbacks. */
void arq_cluster_free(arq_cluster_t *cl);

#endif
