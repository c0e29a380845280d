/* A client connection on any of the three ports.
 *
 * Life: HANDSHAKE (reading the HTTP request head) -> OPEN (WebSocket frames;
 * bus and telemetry ports only) -> CLOSING (a close frame or an HTTP answer is
 * queued; after it is flushed the write side is shut down and the connection
 * waits for the peer's EOF, at most close_timeout) -> CLOSED (uv_close called;
 * the memory goes in the close callback, never earlier).
 *
 * The connection embeds its uv_tcp_t and its one write request: one write is
 * in flight at a time, carrying everything queued when it started.
 *
 * With TLS (net/tls.h) the same states hold: the TLS handshake is part of
 * HANDSHAKE (and of its deadline), plaintext goes through the same request
 * and frame code, and a closing connection sends close_notify after its last
 * frame, before it shuts its write side down.
 */
#ifndef ARQ_NET_CONN_H
#define ARQ_NET_CONN_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "bus/bus.h"
#include "net/outq.h"
#include "net/server.h"
#include "obs/metrics.h"
#include "util/list.h"
#include "wire/frame.h"
#include "wire/http.h"

typedef struct arq_tls arq_tls_t; /* net/tls.h */

typedef enum { ARQ_CONN_HANDSHAKE = 0, ARQ_CONN_OPEN, ARQ_CONN_CLOSING, ARQ_CONN_CLOSED } arq_conn_state_t;

struct arq_conn {
  uv_tcp_t tcp;
  uv_write_t wreq;
  uv_shutdown_t sreq;
  arq_server_t *srv;
  uint64_t id;
  uint8_t kind;            /* arq_port_kind_t */
  uint8_t state;           /* arq_conn_state_t */
  bool writing;            /* wreq in flight */
  bool shut;               /* write side shut down */
  bool close_sent;
  bool input_done;         /* ignore what the peer sends from now on */
  bool awaiting_pong;
  bool opened;             /* counted as an open WebSocket */
  bool addr_counted;       /* counted in the server's per-address table */
  uint8_t reason;          /* arq_close_reason_t, set when closing starts */
  uint32_t tel_mask;       /* telemetry port: the event kinds wanted */
  uint64_t expires_ms;     /* telemetry port: wall ms when its credential expires; 0: never */
  unsigned inflight;       /* queue entries in the write in flight */
  size_t inflight_bytes;
  arq_outq_t outq;
  arq_http_req_t *req;     /* during the handshake only */
  arq_client_t *client;    /* the bus's client while open (bus port only) */
  struct arq_http_wait *waiter; /* ops port: an answer that comes later (from Redis), or NULL */
  arq_ws_decoder_t dec;
  arq_tls_t *tls;          /* owned; NULL on a plaintext port */
  uint64_t deadline;       /* handshake or close deadline (loop ms) */
  uint64_t ping_at;
  uint64_t pong_at;
  uint64_t write_at;       /* when the write in flight last made progress */
  size_t write_left;       /* its bytes not yet taken by the kernel then */
  arq_list_t node_all;
  arq_list_t node_open;
  arq_list_t node_deadline;
  arq_list_t node_ping;
  arq_list_t node_pong;
  arq_list_t node_write;
  arq_list_t node_flush;
  char remote[INET6_ADDRSTRLEN + 8];
  char addr[INET6_ADDRSTRLEN]; /* the remote address alone, the key of max_connections_per_ip */
};

/* Releases the per-address table of 'srv' (at the end, when it is empty). */
void arq_conn_free_addr_counts(arq_server_t *srv);

/* Accepts a pending connection on 'l'. Never fails the server: a connection
 * that cannot be taken is closed and logged. */
void arq_conn_accept(arq_listener_t *l);

/* Queues a reference to the frame 'buf' (borrowed; the queue takes its own
 * reference). Returns false when the connection is not open, or its queue is
 * full: a bus client is then closed as a slow consumer, a monitoring client
 * misses the frame (counted in telemetry_dropped). */
bool arq_conn_send(arq_conn_t *c, arq_rcbuf_t *buf);

/* Writes what is queued: a writev now, the rest asynchronously. */
void arq_conn_flush(arq_conn_t *c);

/* Starts the close handshake with 'code' and 'why' (sent as the reason);
 * 'reason' is what the metrics and the log record. No-op once closing. */
void arq_conn_close(arq_conn_t *c, uint16_t code, const char *why, arq_close_reason_t reason);

/* Answers an HTTP request with 'status' and 'body', then closes. */
void arq_conn_http_reply(arq_conn_t *c, int status, const char *content_type, const char *extra_headers,
                         const char *body, size_t body_len, arq_close_reason_t reason);

/* Releases the connection at once (uv_close); its memory goes in the close
 * callback. 'reason' is recorded unless a reason was already set. */
void arq_conn_destroy(arq_conn_t *c, arq_close_reason_t reason);

/* Timer work, called from the server's tick with the loop time 'now'. */
void arq_conn_handshake_expired(arq_conn_t *c);
void arq_conn_ping(arq_conn_t *c, uint64_t now);
void arq_conn_write_stalled(arq_conn_t *c);
/* True (and the write's clock restarted) when the write in flight has made
 * progress since it was last looked at. */
bool arq_conn_write_progressed(arq_conn_t *c, uint64_t now);

/* Forgets the bus client of 'c' without telling the bus (the bus closed it). */
static inline void arq_conn_forget_client(arq_conn_t *c) { c->client = NULL; }

/* An ops request answered later: 'c' is set to NULL if the connection goes
 * first, so that the answer knows to drop itself. */
typedef struct arq_http_wait {
  arq_conn_t *c;
} arq_http_wait_t;

/* Serves one request on the ops port (net/ops.c). */
void arq_ops_handle(arq_conn_t *c, const arq_http_req_t *req);

#endif
