/* The server's counters and their Prometheus text exposition.
 *
 * Plain integers in one struct, bumped on the loop thread: the cheapest thing
 * that can be counted on the hot path. Labelled families are small fixed
 * arrays indexed by an enum. arq_metrics_render() writes the text format
 * (version 0.0.4) that GET /metrics serves.
 */
#ifndef ARQ_OBS_METRICS_H
#define ARQ_OBS_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "bus/bus.h"

struct arq_cluster_stats;

/* Why a connection ended; the label of arqonbus_connections_closed_total. */
typedef enum {
  ARQ_CLOSE_NORMAL = 0,        /* close handshake the client started */
  ARQ_CLOSE_SHUTDOWN,          /* the server is stopping (1001) */
  ARQ_CLOSE_PROTOCOL_ERROR,    /* 1002, 1007 or 1009 */
  ARQ_CLOSE_SLOW_CONSUMER,     /* 1008 slow_consumer */
  ARQ_CLOSE_HEARTBEAT_TIMEOUT, /* no pong in time */
  ARQ_CLOSE_HANDSHAKE_FAILED,  /* HTTP error answered to the upgrade */
  ARQ_CLOSE_HANDSHAKE_TIMEOUT, /* upgrade not complete in time */
  ARQ_CLOSE_PEER_GONE,         /* TCP ended without a close handshake */
  ARQ_CLOSE_IO_ERROR,          /* read or write failed */
  ARQ_CLOSE_REPLACED,          /* 4001: a newer connection took the client id */
  ARQ_CLOSE_MALFORMED,         /* 1008: too many malformed envelopes in a row */
  ARQ_CLOSE_EXPIRED,           /* 4002: the credential expired without a refresh */
  ARQ_CLOSE_RATE_LIMITED,      /* 1008: kept sending over the rate limit */
  ARQ_CLOSE_REASON_COUNT
} arq_close_reason_t;

typedef struct arq_metrics {
  uint64_t start_time_ms;              /* wall clock at start */
  int64_t connections;                 /* open WebSocket connections (gauge) */
  uint64_t connections_opened;         /* WebSocket handshakes completed */
  uint64_t connections_closed[ARQ_CLOSE_REASON_COUNT];
  uint64_t protocol_errors[3];         /* by close code 1002, 1007, 1009 */
  uint64_t handshake_errors[9];        /* by status 400, 405, 426, 431, 503, 408, 401, 403, 429 */
  uint64_t auth[3];                    /* bus and telemetry upgrades, by arq_auth_result_t */
  uint64_t forbidden_connect;          /* upgrades refused with 403 */
  uint64_t auth_reloads[2];            /* credentials read again on SIGHUP: ok, failed */
  uint64_t limit_denials[ARQ_LIMIT_NLIMITS]; /* the shell's: connections per address, origin */
  uint64_t slow_consumer_closes;
  bool tls;                            /* TLS is on: its families are exposed */
  uint64_t tls_handshake_errors;       /* TLS handshakes that failed (any port) */
  uint64_t tls_reloads[2];             /* SIGHUP reloads of the certificate: ok, failed */
  uint64_t bytes_in;
  uint64_t bytes_out;
  uint64_t http_requests;              /* ops port */
  uint64_t telemetry_events;           /* telemetry events published */
  uint64_t telemetry_sent;             /* telemetry envelopes queued to monitoring clients */
  uint64_t telemetry_dropped;          /* ... dropped because a client's queue was full */
} arq_metrics_t;

typedef enum { ARQ_AUTH_OK = 0, ARQ_AUTH_MISSING, ARQ_AUTH_REFUSED } arq_auth_result_t;

/* Counts a protocol violation by its close 'code' (1002, 1007 or 1009). */
void arq_metrics_protocol_error(arq_metrics_t *m, uint16_t code);
/* Counts a refused handshake by its HTTP 'status'. */
void arq_metrics_handshake_error(arq_metrics_t *m, int status);
/* Returns the label value of 'reason' ("slow_consumer"). */
const char *arq_close_reason_name(arq_close_reason_t reason);

/* Figures of the process, read when /metrics is served. */
typedef struct arq_process {
  uint64_t resident_bytes;
  uint64_t open_fds;
  uint64_t max_fds;
} arq_process_t;

/* Fills 'p' from /proc (zeros where unavailable). */
void arq_process_read(arq_process_t *p);

/* The storage backend's state for the exposition. */
typedef struct arq_storage_state {
  const char *backend;                /* "memory" or "redis" */
  bool up;
  const struct arq_cluster_stats *redis; /* NULL in memory-only mode */
} arq_storage_state_t;

/* Writes the exposition of 'm', the bus figures 'bus', the process figures
 * 'p', the storage state and the telemetry client count into 'out' ('cap'
 * bytes). Returns the length, or 0 when 'cap' is too small. */
size_t arq_metrics_render(const arq_metrics_t *m, const arq_bus_stats_t *bus, const arq_process_t *p,
                          const arq_storage_state_t *storage, uint64_t telemetry_clients, char *out, size_t cap);

#endif
