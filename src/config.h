/* Server configuration: defaults, YAML file, ARQONBUS_* environment, flags.
 *
 * Every setting is one row of a table (config.c) that names its YAML key, its
 * environment variable (ARQONBUS_ + the key in upper case), its flag (--key
 * with '-' for '_'), its type, range and default. Precedence, lowest first:
 * defaults, the file, the environment, the flags. Anything unknown or out of
 * range stops the start with one message that names it.
 *
 * Value syntax: sizes take an optional unit (B, KiB, MiB, GiB; also k, M, G
 * read as the binary units), durations a unit of ms, s or m (a bare number is
 * seconds), lists are comma-separated (or a YAML list in the file).
 */
#ifndef ARQ_CONFIG_H
#define ARQ_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "auth/auth.h"

typedef enum { ARQ_LOGFMT_LOGFMT = 0, ARQ_LOGFMT_JSON = 1 } arq_logfmt_t;

/* TLS versions by their protocol numbers (OpenSSL's TLS1_2_VERSION, TLS1_3_VERSION). */
enum { ARQ_TLS_1_2 = 0x0303, ARQ_TLS_1_3 = 0x0304 };

typedef struct arq_config {
  char *host;                    /* address all listeners bind to */
  char *http_host;               /* address of the ops listener, "" for host */
  int port;                      /* WebSocket bus */
  int telemetry_port;            /* telemetry WebSocket server */
  int http_port;                 /* HTTP ops server */
  char *tls_cert;                /* PEM certificate chain, "" for plaintext */
  char *tls_key;                 /* PEM private key, set with tls_cert */
  int tls_min_version;           /* ARQ_TLS_1_2 or ARQ_TLS_1_3 */
  int log_level;                 /* ARQ_LOG_DEBUG .. ARQ_LOG_ERROR (obs/log.h) */
  arq_logfmt_t log_format;
  uint64_t max_message_size;     /* bytes, one WebSocket message */
  uint64_t max_header_size;      /* bytes, the HTTP request head */
  uint64_t handshake_timeout_ms; /* whole opening handshake */
  uint64_t heartbeat_interval_ms;/* server ping period, 0 disables */
  uint64_t heartbeat_timeout_ms; /* wait for the pong */
  uint64_t close_timeout_ms;     /* wait for the peer's close frame */
  uint64_t max_connections;      /* WebSocket connections, all ports */
  uint64_t max_connections_per_ip; /* bus WebSocket connections from one address */
  uint64_t max_handshakes_per_ip; /* connections from one address in their handshake, all ports */
  uint64_t rate_limit_messages;  /* per client, messages per second (bucket: one second's worth) */
  uint64_t rate_limit_bytes;     /* per client, bytes per second */
  uint64_t rate_limit_close_after; /* rate_limited messages within a second before a 1008 close */
  uint64_t max_subscriptions;    /* channels one client may have joined */
  uint64_t max_channels_per_client; /* channels a client created that still exist, used by it alone */
  uint64_t max_channels;         /* channels on this node */
  uint64_t max_rooms;            /* rooms on this node */
  char *allowed_origins;         /* comma-separated Origin values, "*", or "" (same origin only) */
  uint64_t max_outbound_queue;   /* bytes queued to one client */
  uint64_t write_timeout_ms;     /* a write that makes no progress */
  uint64_t drain_timeout_ms;     /* graceful shutdown */
  uint64_t max_envelope_size;    /* bytes, larger envelopes get payload_too_large */
  uint64_t max_malformed;        /* malformed envelopes in a row before a 1008 close */
  uint64_t history_size;         /* messages per channel */
  uint64_t history_max_limit;    /* cap of one history query */
  uint64_t channel_ttl_ms;       /* how long an empty channel lives */
  char *bootstrap_channels;      /* comma-separated room:channel names */
  char *admins;                  /* comma-separated client ids, "" for none */
  arq_auth_mode_t auth;          /* how clients authenticate */
  char *api_keys;                /* comma-separated key entries (auth/auth.h) */
  char *api_keys_file;           /* file of key entries, "" for none */
  arq_jwt_alg_t jwt_algorithm;
  char *jwt_secret;              /* HS256 secret, "" for none */
  char *jwt_key_file;            /* HS256 secret or PEM public key, "" for none */
  char *jwt_audience;            /* "" checks no aud */
  char *jwt_issuer;              /* "" checks no iss */
  uint64_t jwt_leeway_ms;
  char *command_roles;           /* comma-separated command=role+role */
  char *protected_rooms;         /* comma-separated room=role+role */
  char *ops_token;               /* "" requires none */
  char *telemetry_channel;       /* room:channel of client telemetry, "" for none */
  char *dashboard_channel;       /* room:channel of agent_activity, "" for none */
  uint64_t telemetry_stats_interval_ms; /* stats snapshots to telemetry clients, 0 off */
  uint64_t telemetry_queue;      /* bytes queued to one telemetry client before drops */
  uint64_t stats_log_interval_ms;/* the stats log line, 0 off */
  char *redis_url;               /* "" for memory only */
  uint64_t redis_timeout_ms;     /* an unanswered Redis request ends the connection */
  bool redis_strict;             /* refuse publishes Redis cannot take */
  uint64_t redis_buffer_messages;/* outage buffer bounds */
  uint64_t redis_buffer_bytes;
  uint64_t history_max_age_ms;   /* streams trimmed by age too; 0 off */
  char *node_id;                 /* "" picks one */
  uint64_t node_ttl_ms;          /* presence of a silent node */
  char *config_file;             /* the file read, NULL when none */
} arq_config_t;

/* Fills 'c' with the defaults. Free with arq_config_free(). */
void arq_config_defaults(arq_config_t *c);
/* Releases the strings 'c' owns. */
void arq_config_free(arq_config_t *c);

/* What arq_config_load() found besides settings. */
typedef enum { ARQ_CONFIG_RUN = 0, ARQ_CONFIG_HELP, ARQ_CONFIG_VERSION } arq_config_action_t;

/* Builds the configuration from defaults, the file named by --config or
 * ARQONBUS_CONFIG, the environment 'envp' (NULL-terminated "K=V" strings) and
 * the flags 'argv'. Returns 0 and sets '*action'; on an error returns
 * ARQ_EINVAL and writes one line naming the key, variable or flag and the
 * problem into 'err' ('errcap' bytes). */
int arq_config_load(arq_config_t *c, int argc, char **argv, char **envp, arq_config_action_t *action, char *err,
                    size_t errcap);

/* Builds the verifier of credentials 'c' configures (reading api_keys_file
 * or jwt_key_file) into '*out' (caller owns; NULL with auth none). Returns 0,
 * or ARQ_EINVAL with one line in 'err'. */
int arq_config_auth(const arq_config_t *c, arq_auth_t **out, char *err, size_t errcap);

/* Writes the --help text (every flag, its variable and default) to 'out'. */
void arq_config_usage(FILE *out);

#endif
