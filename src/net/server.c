/* The server: listeners, the deadline tick, the end-of-iteration flush,
 * signals and the graceful shutdown (see server.h).
 *
 * Flushing once per loop iteration is what makes fan-out cheap: every
 * message routed while the loop processed this iteration's reads is queued
 * first, then each touched connection writes all of it with one writev.
 */
#include "net/server.h"

#include <openssl/rand.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "net/conn.h"
#include "net/telemetry.h"
#include "net/tls.h"
#include "store/cluster.h"
#include "obs/log.h"
#include "util/alloc.h"
#include "util/err.h"
#include "util/time.h"
#include "version.h"
#include "wire/frame.h"

#define TICK_MS 100

static const char *const port_names[ARQ_PORT_COUNT] = {"bus", "telemetry", "ops"};

static void on_idle(uv_idle_t *h) {} /* only keeps poll from blocking */

void arq_server_want_flush(arq_server_t *srv, arq_conn_t *c) {
  if (arq_list_linked(&c->node_flush))
    return;
  if (arq_list_empty(&srv->flush_pending))
    uv_idle_start(&srv->flush_idle, on_idle);
  arq_list_push_back(&srv->flush_pending, &c->node_flush);
}

static void flush_all(arq_server_t *srv) {
  arq_list_t *n;
  while ((n = arq_list_head(&srv->flush_pending)) != NULL)
    arq_conn_flush(ARQ_CONTAINER_OF(n, arq_conn_t, node_flush)); /* unlinks it */
  uv_idle_stop(&srv->flush_idle);
}

static void on_check(uv_check_t *h) { flush_all(h->data); }

/* The bus reaches connections through these two callbacks. */
static bool bus_send(void *ud, void *conn, arq_rcbuf_t *frame) { return arq_conn_send(conn, frame); }

static void bus_append(void *ud, arq_bus_pub_t *p) { arq_cluster_append(((arq_server_t *)ud)->cluster, p); }

static void bus_interest(void *ud, const char *room, const char *channel, bool on) {
  arq_cluster_interest(((arq_server_t *)ud)->cluster, room, channel, on);
}

static void bus_cast(void *ud, const arq_bus_cast_t *m) { arq_cluster_cast(((arq_server_t *)ud)->cluster, m); }

static void bus_telemetry(void *ud, arq_tel_event_t ev, json_t *env) { arq_telemetry_publish(ud, ev, env); }

/* The shell's figures in status reports. */
static void bus_describe(void *ud, json_t *server) {
  arq_server_t *srv = ud;
  json_object_set_new(server, "connections", json_integer((json_int_t)srv->metrics.connections));
  json_object_set_new(server, "telemetry_clients", json_integer((json_int_t)srv->ntelemetry));
  json_object_set_new(server, "bytes_in", json_integer((json_int_t)srv->metrics.bytes_in));
  json_object_set_new(server, "bytes_out", json_integer((json_int_t)srv->metrics.bytes_out));
  json_object_set_new(server, "slow_consumer_closes", json_integer((json_int_t)srv->metrics.slow_consumer_closes));
  json_object_set_new(server, "draining", json_boolean(srv->draining));
}

static void bus_close(void *ud, void *conn, uint16_t code, const char *why) {
  arq_conn_t *c = conn;
  arq_conn_forget_client(c);
  arq_conn_close(c, code, why,
                 code == 4001                                  ? ARQ_CLOSE_REPLACED
                 : code == ARQ_CLOSE_TOKEN_EXPIRED             ? ARQ_CLOSE_EXPIRED
                 : strcmp(why, ARQ_BUS_RATE_CLOSE_REASON) == 0 ? ARQ_CLOSE_RATE_LIMITED
                                                               : ARQ_CLOSE_MALFORMED);
}

static void bus_denied(void *ud, const char *client_id, const char *remote, const char *action, const char *why) {
  arq_log(ARQ_LOG_WARN, "auth", "forbidden", ARQ_LS("client_id", client_id), ARQ_LS("remote", remote),
          ARQ_LS("action", action), ARQ_LS("why", why));
}

/* Splits the comma-separated 'list' into a NULL-terminated array of strings
 * (caller frees the array and its strings with free_names). */
static char **split_names(const char *list) {
  size_t n = 1;
  for (const char *p = list; *p; p++)
    n += *p == ',';
  char **out = arq_calloc(n + 1, sizeof *out);
  size_t k = 0;
  const char *p = list;
  while (*p) {
    size_t len = strcspn(p, ",");
    out[k++] = arq_strndup(p, len);
    p += len + (p[len] == ',');
  }
  return out;
}

static void free_names(char **names) {
  for (size_t i = 0; names[i]; i++)
    arq_free(names[i]);
  arq_free(names);
}

static arq_bus_t *make_bus(arq_server_t *srv, char *err, size_t cap) {
  const arq_config_t *cfg = srv->cfg;
  arq_bus_opts_t o;
  arq_bus_opts_defaults(&o);
  o.server_version = ARQ_VERSION;
  o.heartbeat_interval_ms = cfg->heartbeat_interval_ms;
  o.max_message_size = cfg->max_message_size;
  o.max_envelope_size = cfg->max_envelope_size;
  o.history_size = cfg->history_size;
  o.history_max_limit = cfg->history_max_limit;
  o.max_malformed = (unsigned)cfg->max_malformed;
  o.channel_ttl_ms = cfg->channel_ttl_ms;
  o.rate_messages = cfg->rate_limit_messages;
  o.rate_bytes = cfg->rate_limit_bytes;
  o.rate_close_after = (unsigned)cfg->rate_limit_close_after;
  o.max_subscriptions = cfg->max_subscriptions;
  o.max_channels_per_client = cfg->max_channels_per_client;
  o.max_channels = cfg->max_channels;
  o.max_rooms = cfg->max_rooms;
  char **bootstrap = split_names(cfg->bootstrap_channels);
  char **admins = split_names(cfg->admins);
  o.bootstrap = (const char *const *)bootstrap;
  o.admins = (const char *const *)admins;
  if (RAND_bytes((unsigned char *)&o.seed, sizeof o.seed) != 1)
    o.seed = arq_time_wall_ms() ^ (uint64_t)getpid() << 32;
  o.telemetry_channel = cfg->telemetry_channel;
  o.dashboard_channel = cfg->dashboard_channel;
  o.command_roles = cfg->command_roles;
  o.protected_rooms = cfg->protected_rooms;
  o.auth = srv->auth;
  arq_bus_io_t io = {.send = bus_send, .close = bus_close, .telemetry = bus_telemetry, .describe = bus_describe,
                     .denied = bus_denied, .ud = srv};
  if (srv->cluster) {
    io.append = bus_append;
    io.interest = bus_interest;
    io.cast = bus_cast;
    o.node_id = arq_cluster_node_id(srv->cluster);
  }
  uint64_t first = arq_time_wall_ms() << 10; /* see arq_history_mem_new_at() */
  arq_history_t *history = srv->cluster ? arq_cluster_history(srv->cluster)
                                        : arq_history_mem_new_at(cfg->history_size, first);
  arq_bus_t *bus = arq_bus_new(&o, &io, history, err, cap);
  if (bus && srv->cluster)
    arq_cluster_attach(srv->cluster, bus);
  free_names(bootstrap);
  free_names(admins);
  return bus;
}

/* The periodic stats line: the telemetry snapshot, as log fields. */
static void log_stats(arq_server_t *srv) {
  json_t *s = arq_telemetry_snapshot(srv);
  arq_log(ARQ_LOG_INFO, "stats", "stats", ARQ_LI("connections", json_integer_value(json_object_get(s, "connections"))),
          ARQ_LI("clients", json_integer_value(json_object_get(s, "clients"))),
          ARQ_LI("rooms", json_integer_value(json_object_get(s, "rooms"))),
          ARQ_LI("channels", json_integer_value(json_object_get(s, "channels"))),
          ARQ_LI("messages_received", json_integer_value(json_object_get(s, "messages_received"))),
          ARQ_LI("messages_delivered", json_integer_value(json_object_get(s, "messages_delivered"))),
          ARQ_LI("history_messages", json_integer_value(json_object_get(s, "history_messages"))),
          ARQ_LI("bytes_in", json_integer_value(json_object_get(s, "bytes_in"))),
          ARQ_LI("bytes_out", json_integer_value(json_object_get(s, "bytes_out"))),
          ARQ_LI("telemetry_dropped", json_integer_value(json_object_get(s, "telemetry_dropped"))));
  json_decref(s);
}

/* Deadlines: each queue shares one timeout, so its head is the first due. */
static void on_tick(uv_timer_t *t) {
  arq_server_t *srv = t->data;
  const arq_config_t *cfg = srv->cfg;
  uint64_t now = uv_now(srv->loop);
  arq_list_t *n;
  while ((n = arq_list_head(&srv->handshaking)) != NULL) {
    arq_conn_t *c = ARQ_CONTAINER_OF(n, arq_conn_t, node_deadline);
    if (c->deadline > now)
      break;
    arq_conn_handshake_expired(c); /* moves it to 'closing' or closes it */
  }
  while ((n = arq_list_head(&srv->closing)) != NULL) {
    arq_conn_t *c = ARQ_CONTAINER_OF(n, arq_conn_t, node_deadline);
    if (c->deadline > now)
      break;
    arq_conn_destroy(c, (arq_close_reason_t)c->reason);
  }
  while ((n = arq_list_head(&srv->pong_wait)) != NULL) {
    arq_conn_t *c = ARQ_CONTAINER_OF(n, arq_conn_t, node_pong);
    if (c->pong_at + cfg->heartbeat_timeout_ms > now)
      break;
    arq_conn_ping(c, now); /* closes it: the pong is overdue */
  }
  while ((n = arq_list_head(&srv->ping_due)) != NULL) {
    arq_conn_t *c = ARQ_CONTAINER_OF(n, arq_conn_t, node_ping);
    if (c->ping_at + cfg->heartbeat_interval_ms > now)
      break;
    arq_conn_ping(c, now); /* moves it to the tail */
  }
  while ((n = arq_list_head(&srv->writing)) != NULL) {
    arq_conn_t *c = ARQ_CONTAINER_OF(n, arq_conn_t, node_write);
    if (c->write_at + cfg->write_timeout_ms > now)
      break;
    if (!arq_conn_write_progressed(c, now)) /* moves it to the tail */
      arq_conn_write_stalled(c);            /* unlinks it */
  }
  if (now >= srv->bus_tick_at + 1000) {
    srv->bus_tick_at = now;
    arq_bus_tick(srv->bus, now);
    if (srv->ntelemetry)
      arq_telemetry_expire(srv, arq_time_wall_ms());
    if (srv->cluster)
      arq_cluster_tick(srv->cluster, now);
  }
  if (cfg->telemetry_stats_interval_ms && now >= srv->tel_stats_at + cfg->telemetry_stats_interval_ms) {
    srv->tel_stats_at = now;
    arq_telemetry_stats(srv);
  }
  if (cfg->stats_log_interval_ms && now >= srv->stats_log_at + cfg->stats_log_interval_ms) {
    srv->stats_log_at = now;
    log_stats(srv);
  }
  flush_all(srv);
}

static void on_connection(uv_stream_t *s, int status) {
  arq_listener_t *l = (arq_listener_t *)s;
  if (status < 0) {
    arq_log(ARQ_LOG_WARN, "net", "accept error", ARQ_LS("port", port_names[l->kind]),
            ARQ_LS("error", uv_strerror(status)));
    return;
  }
  arq_conn_accept(l);
}

static int resolve(const char *host, int port, struct sockaddr_storage *ss) {
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)ss) == 0)
    return 0;
  if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss) == 0)
    return 0;
  return ARQ_EINVAL;
}

static int listen_on(arq_server_t *srv, arq_listener_t *l, arq_port_kind_t kind, int port, char *err, size_t cap) {
  struct sockaddr_storage ss;
  l->srv = srv;
  l->kind = kind;
  l->port = port;
  const char *host = kind == ARQ_PORT_OPS && srv->cfg->http_host[0] ? srv->cfg->http_host : srv->cfg->host;
  if (resolve(host, port, &ss) != 0) {
    snprintf(err, cap, "config: invalid value '%s' for host: not an IPv4 or IPv6 address", host);
    return ARQ_EINVAL;
  }
  uv_tcp_init(srv->loop, &l->tcp);
  l->active = true;
  int rc = uv_tcp_bind(&l->tcp, (struct sockaddr *)&ss, 0);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&l->tcp, 1024, on_connection);
  if (rc != 0) {
    const char *key = kind == ARQ_PORT_BUS ? "port" : kind == ARQ_PORT_TELEMETRY ? "telemetry_port" : "http_port";
    if (rc == UV_EADDRINUSE)
      snprintf(err, cap, "%s %d is already in use (%s:%d)", key, port, host, port);
    else
      snprintf(err, cap, "cannot listen on %s %d (%s:%d): %s", key, port, host, port, uv_strerror(rc));
    return rc == UV_EADDRINUSE ? ARQ_EADDRINUSE : ARQ_EIO;
  }
  return 0;
}

static void on_signal(uv_signal_t *s, int signum) {
  arq_server_t *srv = s->data;
  if (srv->draining) {
    arq_log(ARQ_LOG_WARN, "server", "second signal: closing everything now", ARQ_LI("signal", signum));
    arq_server_close(srv);
    return;
  }
  arq_log(ARQ_LOG_INFO, "server", "shutting down", ARQ_LS("signal", signum == SIGINT ? "SIGINT" : "SIGTERM"),
          ARQ_LI("connections", srv->nws), ARQ_LI("drain_timeout_ms", srv->cfg->drain_timeout_ms));
  arq_server_shutdown(srv);
}

/* SIGHUP: the certificate and key are read again into a new context, which
 * new connections use; open ones keep the context they started with (each
 * SSL holds a reference). A file that does not load changes nothing. */
/* SIGHUP also reads the credentials again (api_keys_file, jwt_key_file):
 * new connections are checked against the new ones, open connections keep
 * the identity they were admitted with. A file that no longer loads leaves
 * the previous credentials in force. */
static void reload_auth(arq_server_t *srv) {
  char text[512];
  const char *err = text;
  arq_auth_t *auth = NULL;
  if (!srv->auth)
    return;
  if (arq_config_auth(srv->cfg, &auth, text, sizeof text) != 0) {
    srv->metrics.auth_reloads[1]++;
    arq_log(ARQ_LOG_ERROR, "auth", "credentials reload failed; the previous ones stay in force", ARQ_LS("error", err));
    return;
  }
  arq_bus_set_auth(srv->bus, auth);
  arq_auth_free(srv->auth);
  srv->auth = auth;
  srv->metrics.auth_reloads[0]++;
  arq_log(ARQ_LOG_INFO, "auth", "credentials reloaded", ARQ_LI("api_keys", arq_auth_key_count(auth)));
}

static void on_sighup(uv_signal_t *s, int signum) {
  arq_server_t *srv = s->data;
  const arq_config_t *cfg = srv->cfg;
  char text[512], cert[512];
  const char *err = text;
  reload_auth(srv);
  if (!srv->tls_ctx) {
    arq_log(ARQ_LOG_INFO, "tls", "SIGHUP: no certificate to reload (TLS is off)");
    return;
  }
  SSL_CTX *ctx = arq_tls_ctx_new(cfg->tls_cert, cfg->tls_key, cfg->tls_min_version, text, sizeof text);
  if (!ctx) {
    srv->metrics.tls_reloads[1]++;
    arq_log(ARQ_LOG_ERROR, "tls", "certificate reload failed; the previous certificate stays in use",
            ARQ_LS("error", err));
    return;
  }
  SSL_CTX_free(srv->tls_ctx);
  srv->tls_ctx = ctx;
  srv->metrics.tls_reloads[0]++;
  arq_log(ARQ_LOG_INFO, "tls", "certificate reloaded", ARQ_LS("cert", cfg->tls_cert),
          ARQ_LS("subject", arq_tls_ctx_describe(ctx, cert, sizeof cert)));
}

int arq_server_start(arq_server_t *srv, uv_loop_t *loop, const arq_config_t *cfg, char *err, size_t cap) {
  memset(srv, 0, offsetof(arq_server_t, rbuf));
  srv->loop = loop;
  srv->cfg = cfg;
  srv->bus_tick_at = srv->tel_stats_at = srv->stats_log_at = uv_now(loop);
  srv->metrics.start_time_ms = arq_time_wall_ms();
  srv->max_pending = cfg->max_connections / 4 + 64;
  arq_list_init(&srv->conns);
  arq_list_init(&srv->bus_open);
  arq_list_init(&srv->telemetry_open);
  arq_list_init(&srv->handshaking);
  arq_list_init(&srv->closing);
  arq_list_init(&srv->ping_due);
  arq_list_init(&srv->pong_wait);
  arq_list_init(&srv->writing);
  arq_list_init(&srv->flush_pending);
  if (cfg->tls_cert[0]) {
    srv->tls_ctx = arq_tls_ctx_new(cfg->tls_cert, cfg->tls_key, cfg->tls_min_version, err, cap);
    if (!srv->tls_ctx)
      return ARQ_EINVAL;
    srv->metrics.tls = true;
    char cert[512];
    arq_log(ARQ_LOG_INFO, "tls", "TLS on all three ports", ARQ_LS("cert", cfg->tls_cert),
            ARQ_LS("subject", arq_tls_ctx_describe(srv->tls_ctx, cert, sizeof cert)),
            ARQ_LS("min_version", cfg->tls_min_version == ARQ_TLS_1_3 ? "1.3" : "1.2"));
  }
  if (cfg->redis_url[0]) {
    char node[ARQ_NAME_MAX + 1];
    if (cfg->node_id[0]) {
      snprintf(node, sizeof node, "%s", cfg->node_id);
    } else {
      unsigned char rnd[6];
      if (RAND_bytes(rnd, sizeof rnd) != 1)
        memcpy(rnd, &srv->metrics.start_time_ms, sizeof rnd);
      snprintf(node, sizeof node, "node-%02x%02x%02x%02x%02x%02x", rnd[0], rnd[1], rnd[2], rnd[3], rnd[4], rnd[5]);
    }
    arq_cluster_opts_t co = {.urls = cfg->redis_url, .timeout_ms = cfg->redis_timeout_ms,
                             .history_size = cfg->history_size, .max_age_ms = cfg->history_max_age_ms,
                             .strict = cfg->redis_strict, .buffer_messages = cfg->redis_buffer_messages,
                             .buffer_bytes = cfg->redis_buffer_bytes, .node_id = node,
                             .node_ttl_ms = cfg->node_ttl_ms};
    srv->cluster = arq_cluster_new(loop, &co);
  }
  if (arq_config_auth(cfg, &srv->auth, err, cap) != 0)
    return ARQ_EINVAL;
  srv->bus = make_bus(srv, err, cap); /* after the lists: arq_server_close() walks them on failure */
  if (!srv->bus)
    return ARQ_EINVAL;

  uv_timer_init(loop, &srv->tick);
  srv->tick.data = srv;
  uv_check_init(loop, &srv->flush_check);
  srv->flush_check.data = srv;
  uv_idle_init(loop, &srv->flush_idle);
  srv->flush_idle.data = srv;
  uv_timer_init(loop, &srv->drain_timer);
  srv->drain_timer.data = srv;
  uv_signal_init(loop, &srv->sigint);
  srv->sigint.data = srv;
  uv_signal_init(loop, &srv->sigterm);
  srv->sigterm.data = srv;
  uv_signal_init(loop, &srv->sighup);
  srv->sighup.data = srv;

  int ports[ARQ_PORT_COUNT] = {cfg->port, cfg->telemetry_port, cfg->http_port};
  for (int i = 0; i < ARQ_PORT_COUNT; i++) {
    int rc = listen_on(srv, &srv->listeners[i], (arq_port_kind_t)i, ports[i], err, cap);
    if (rc != 0)
      return rc;
  }
  uv_timer_start(&srv->tick, on_tick, TICK_MS, TICK_MS);
  uv_check_start(&srv->flush_check, on_check);
  uv_signal_start(&srv->sigint, on_signal, SIGINT);
  uv_signal_start(&srv->sigterm, on_signal, SIGTERM);
  uv_signal_start(&srv->sighup, on_sighup, SIGHUP);
  return 0;
}

void arq_server_log_security(const arq_server_t *srv) {
  const arq_config_t *cfg = srv->cfg;
  if (!srv->auth)
    arq_log(ARQ_LOG_WARN, "auth", "authentication is off (auth: none): any client that reaches the bus port may "
                                  "connect, with the admin role unless admins is set; see docs/security.md",
            ARQ_LI("port", cfg->port));
  else
    arq_log(ARQ_LOG_INFO, "auth", "authentication on", ARQ_LS("mode", cfg->auth == ARQ_AUTH_JWT ? "jwt" : "api_key"),
            ARQ_LI("api_keys", arq_auth_key_count(srv->auth)));
  const char *ops = cfg->http_host[0] ? cfg->http_host : cfg->host;
  bool loopback = strncmp(ops, "127.", 4) == 0 || strcmp(ops, "::1") == 0;
  if (!loopback && !cfg->ops_token[0])
    arq_log(ARQ_LOG_WARN, "auth", "the ops port is open beyond this machine without ops_token: /status and /history "
                                  "show clients and messages to anyone who reaches it",
            ARQ_LS("address", ops), ARQ_LI("http_port", cfg->http_port));
}

static void close_handle(uv_handle_t *h) {
  if (h->type != UV_UNKNOWN_HANDLE && !uv_is_closing(h))
    uv_close(h, NULL);
}

/* Closes the server's own handles; uv_run() returns once they and every
 * connection are closed. */
static void close_own_handles(arq_server_t *srv) {
  if (srv->stopped)
    return;
  srv->stopped = true;
  for (int i = 0; i < ARQ_PORT_COUNT; i++)
    if (srv->listeners[i].active)
      close_handle((uv_handle_t *)&srv->listeners[i].tcp);
  close_handle((uv_handle_t *)&srv->tick);
  close_handle((uv_handle_t *)&srv->flush_check);
  close_handle((uv_handle_t *)&srv->flush_idle);
  close_handle((uv_handle_t *)&srv->drain_timer);
  close_handle((uv_handle_t *)&srv->sigint);
  close_handle((uv_handle_t *)&srv->sigterm);
  close_handle((uv_handle_t *)&srv->sighup);
  /* Closing them gave the signals back their default action: one that came
   * now, while the process finishes exiting, would kill it and turn a clean
   * exit 0 into death by signal. There is nothing left for it to do. */
  signal(SIGINT, SIG_IGN);
  signal(SIGTERM, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  if (srv->cluster)
    arq_cluster_close(srv->cluster); /* its connections free themselves; the rest goes in arq_server_free */
}

void arq_server_conn_gone(arq_server_t *srv) {
  srv->nconns--;
  if (srv->draining && srv->nconns == 0)
    close_own_handles(srv);
}

static void on_drain_timeout(uv_timer_t *t) {
  arq_server_t *srv = t->data;
  arq_log(ARQ_LOG_WARN, "server", "drain timeout: closing the remaining connections",
          ARQ_LI("connections", srv->nconns));
  arq_server_close(srv);
}

void arq_server_shutdown(arq_server_t *srv) {
  if (srv->draining)
    return;
  srv->draining = true;
  arq_bus_quiesce(srv->bus);
  if (srv->cluster)
    arq_cluster_leave(srv->cluster);
  /* The ops port stays open while clients drain, so that load balancers and
   * operators see /health answer 503 shutting_down. */
  for (int i = 0; i < ARQ_PORT_COUNT; i++) {
    if (srv->listeners[i].active && i != ARQ_PORT_OPS) {
      close_handle((uv_handle_t *)&srv->listeners[i].tcp);
      srv->listeners[i].active = false;
    }
  }
  arq_list_t *pos, *tmp;
  arq_list_foreach_safe(pos, tmp, &srv->conns) {
    arq_conn_t *c = ARQ_CONTAINER_OF(pos, arq_conn_t, node_all);
    if (c->kind == ARQ_PORT_OPS)
      continue;
    if (c->state == ARQ_CONN_OPEN)
      arq_conn_close(c, ARQ_WS_CLOSE_GOING_AWAY, "server shutting down", ARQ_CLOSE_SHUTDOWN);
    else if (c->state == ARQ_CONN_HANDSHAKE)
      arq_conn_destroy(c, ARQ_CLOSE_SHUTDOWN);
  }
  if (srv->nconns == 0) {
    close_own_handles(srv);
    return;
  }
  uv_timer_start(&srv->drain_timer, on_drain_timeout, srv->cfg->drain_timeout_ms, 0);
}

void arq_server_close(arq_server_t *srv) {
  srv->draining = true;
  if (srv->bus)
    arq_bus_quiesce(srv->bus);
  arq_list_t *pos, *tmp;
  arq_list_foreach_safe(pos, tmp, &srv->conns) {
    arq_conn_t *c = ARQ_CONTAINER_OF(pos, arq_conn_t, node_all);
    arq_conn_destroy(c, ARQ_CLOSE_SHUTDOWN);
  }
  close_own_handles(srv);
}

void arq_server_free(arq_server_t *srv) {
  arq_conn_free_addr_counts(srv);
  arq_bus_free(srv->bus);
  srv->bus = NULL;
  arq_cluster_free(srv->cluster);
  srv->cluster = NULL;
  arq_auth_free(srv->auth);
  srv->auth = NULL;
  arq_buf_free(&srv->tel_scratch);
  SSL_CTX_free(srv->tls_ctx);
  srv->tls_ctx = NULL;
}
