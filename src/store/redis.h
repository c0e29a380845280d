/* The connection to Redis: hiredis' asynchronous API on the libuv loop.
 *
 * Nothing here ever waits on Redis: the address is resolved with
 * uv_getaddrinfo (a libuv worker thread), hiredis connects non-blocking and
 * is driven by a uv_poll handle (our own adapter, redis.c), and every command completes
 * through its callback. The connection manager keeps one connection,
 * reconnects with exponential backoff when it drops, and pings it every
 * second: a ping unanswered for 'timeout' counts as a dead connection (hiredis
 * 0.14 has no command timeouts), which is dropped so that its pending
 * callbacks run with a NULL reply and the manager reconnects.
 */
#ifndef ARQ_STORE_REDIS_H
#define ARQ_STORE_REDIS_H

#include <hiredis/async.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "store/redis_url.h"

typedef struct arq_redis arq_redis_t;

/* Called when the connection comes up ('up' true) or goes down. */
typedef void (*arq_redis_state_cb)(void *ud, bool up);

/* Returns a manager (caller owns) for 'url' (already checked) on 'loop',
 * which starts connecting at once. */
arq_redis_t *arq_redis_new(uv_loop_t *loop, const char *url, uint64_t timeout_ms, arq_redis_state_cb cb, void *ud);

/* Sends a command in hiredis' format (%s a C string, %b a pointer and a
 * size_t length: binary-safe; not printf's) when connected. Returns 0 and 'fn' will be
 * called exactly once (with a NULL reply if the connection drops first), or
 * ARQ_ECLOSED when not connected ('fn' is not called). */
int arq_redis_command(arq_redis_t *r, redisCallbackFn *fn, void *privdata, const char *fmt, ...);

/* The same with the command as 'argc' arguments ('argv', 'lens': binary-safe). */
int arq_redis_argv(arq_redis_t *r, redisCallbackFn *fn, void *privdata, int argc, const char **argv,
                   const size_t *lens);

/* True while connected and answering. */
bool arq_redis_up(const arq_redis_t *r);
/* The last connection error ("" when none), for /health and logs. */
const char *arq_redis_error(const arq_redis_t *r);

typedef struct arq_redis_stats {
  uint64_t connects;      /* successful connections */
  uint64_t disconnects;   /* connections lost */
  uint64_t errors;        /* error replies and failed commands */
  uint64_t timeouts;      /* pings that went unanswered */
} arq_redis_stats_t;
const arq_redis_stats_t *arq_redis_stats(const arq_redis_t *r);

/* Starts closing: pending callbacks run with NULL replies, handles are
 * closed; the memory goes once the loop has run the close callbacks. */
void arq_redis_close(arq_redis_t *r);

#endif
