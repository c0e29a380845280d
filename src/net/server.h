/* The network shell: listeners, connections, timers and signals on libuv.
 *
 * arq_server_t is the whole running bus, passed explicitly to whatever needs
 * it (no globals), so that a later server can run several loops, each with a
 * share of the connections. It only moves bytes: frames come in through
 * wire/, messages go out as shared frames queued to each recipient.
 */
#ifndef ARQ_NET_SERVER_H
#define ARQ_NET_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "bus/bus.h"
#include "config.h"
#include "obs/metrics.h"
#include "util/list.h"
#include "util/rcbuf.h"

typedef struct arq_server arq_server_t;
typedef struct arq_conn arq_conn_t;

typedef enum { ARQ_PORT_BUS = 0, ARQ_PORT_TELEMETRY, ARQ_PORT_OPS, ARQ_PORT_COUNT } arq_port_kind_t;

typedef struct arq_listener {
  uv_tcp_t tcp;
  arq_server_t *srv;
  arq_port_kind_t kind;
  int port;
  bool active;
} arq_listener_t;

#define ARQ_READ_BUF_SIZE (64 * 1024)
#define ARQ_OPS_MAX_PENDING 256 /* ops requests being read at once */

struct arq_server {
  uv_loop_t *loop;
  const arq_config_t *cfg; /* borrowed; outlives the server */
  arq_bus_t *bus;          /* owned: rooms, channels, clients, history */
  struct arq_cluster *cluster; /* owned; NULL in memory-only mode */
  arq_auth_t *auth;        /* owned; NULL with auth none */
  uint64_t bus_tick_at;    /* loop time of the bus's last periodic work */
  uint64_t read_ns;        /* uv_hrtime() of the read being handled */
  arq_metrics_t metrics;
  arq_listener_t listeners[ARQ_PORT_COUNT];
  uv_timer_t tick;         /* deadlines: handshakes, closes, heartbeats, stalled writes */
  uv_check_t flush_check;  /* flushes every queue touched in this loop iteration */
  uv_idle_t flush_idle;    /* keeps the loop from blocking while a flush is pending */
  uv_signal_t sigint;
  uv_signal_t sigterm;
  uv_signal_t sighup;      /* reloads the TLS certificate */
  struct ssl_ctx_st *tls_ctx; /* owned; NULL without TLS. Connections hold their own references */
  uv_timer_t drain_timer;
  /* Connection sets. Each deadline queue holds connections that share one
   * timeout, in insertion order, so only its head can be due. */
  arq_list_t conns;        /* every live connection */
  arq_list_t bus_open;     /* bus connections past the handshake, not closing */
  arq_list_t telemetry_open; /* monitoring connections (net/telemetry.c), by node_open */
  size_t ntelemetry;
  uint32_t tel_mask;       /* telemetry kinds some monitoring client wants */
  uint64_t tel_stats_at;   /* loop time of the last stats snapshot */
  uint64_t stats_log_at;   /* loop time of the last stats log line */
  arq_buf_t tel_scratch;   /* encoding buffer of the telemetry stream */
  arq_list_t handshaking;  /* deadline: handshake_timeout */
  arq_list_t closing;      /* deadline: close_timeout */
  arq_list_t ping_due;     /* by time of the last ping */
  arq_list_t pong_wait;    /* by time of the unanswered ping */
  arq_list_t writing;      /* by time the write in flight started */
  arq_list_t flush_pending;
  uint64_t next_conn_id;
  size_t nconns;           /* live TCP connections, all ports */
  size_t npending;         /* of them, bus and telemetry ones still in the handshake */
  size_t npending_ops;     /* ops requests still being read */
  size_t nws;              /* WebSocket connections past the handshake */
  size_t max_pending;
  struct arq_addr_count *per_addr; /* bus WebSocket connections by remote address (net/conn.c) */
  bool draining;
  bool stopped;
  uint8_t rbuf[ARQ_READ_BUF_SIZE]; /* the one read buffer, shared by every connection */
};

/* Initialises 'srv' on 'loop' with 'cfg' (borrowed), creates its bus and
 * starts listening on the three ports. Returns 0, or a negative ARQ_E* code
 * with one line naming the port and the problem in 'err'. On failure call
 * arq_server_close() and run the loop once to release what was opened; after
 * the loop has ended, release the rest with arq_server_free(). */
int arq_server_start(arq_server_t *srv, uv_loop_t *loop, const arq_config_t *cfg, char *err, size_t errcap);

/* Logs how the server is secured: the authentication mode (a warning when
 * off), and a warning when the ops port is reachable from other machines
 * without a token. */
void arq_server_log_security(const arq_server_t *srv);

/* Starts a graceful shutdown: stop accepting, close every client with 1001,
 * flush, and release every handle so that uv_run() returns. */
void arq_server_shutdown(arq_server_t *srv);

/* Closes every handle at once (after a failed start or at the drain deadline). */
void arq_server_close(arq_server_t *srv);

/* Releases what the server owns besides its handles (the bus). Call after
 * uv_run() has returned. */
void arq_server_free(arq_server_t *srv);

/* Marks 'c' for a flush at the end of this loop iteration. */
void arq_server_want_flush(arq_server_t *srv, arq_conn_t *c);

/* Called by a connection when it has been released. */
void arq_server_conn_gone(arq_server_t *srv);

#endif
