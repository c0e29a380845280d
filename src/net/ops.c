/* The HTTP ops port: /health, /version, /metrics, /status, /history.
 *
 * One request per connection (answered with Connection: close), parsed by the
 * same HTTP head parser as the WebSocket upgrade. GET only; unknown
 * paths 404, other methods 405.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <openssl/crypto.h>

#include "bus/names.h"
#include "net/conn.h"
#include "store/cluster.h"
#include "obs/log.h"
#include "util/alloc.h"
#include "util/time.h"
#include "version.h"

static bool path_is(const arq_http_req_t *req, const char *path) {
  return req->path.n == strlen(path) && memcmp(req->path.p, path, req->path.n) == 0;
}

static void reply_json(arq_conn_t *c, int status, const char *body, size_t n) {
  arq_conn_http_reply(c, status, "application/json", NULL, body, n, ARQ_CLOSE_NORMAL);
}

static void serve_health(arq_conn_t *c) {
  arq_server_t *srv = c->srv;
  char body[256];
  uint64_t up = (arq_time_wall_ms() - srv->metrics.start_time_ms) / 1000;
  int n;
  bool degraded = srv->cluster && !arq_cluster_up(srv->cluster);
  if (srv->draining) {
    n = snprintf(body, sizeof body, "{\"status\":\"shutting_down\",\"reason\":\"the server is draining\"}\n");
  } else if (degraded) {
    /* Live routing goes on; what is degraded is storage. */
    json_t *j = json_pack("{s:s, s:s, s:s, s:I, s:I}", "status", "degraded", "reason", "redis unreachable",
                          "detail", arq_cluster_error(srv->cluster), "uptime_seconds", (json_int_t)up, "connections",
                          (json_int_t)srv->metrics.connections);
    char *text = json_dumps(j, JSON_COMPACT);
    n = snprintf(body, sizeof body, "%s\n", text);
    free(text);
    json_decref(j);
  } else {
    n = snprintf(body, sizeof body,
                 "{\"status\":\"ok\",\"uptime_seconds\":%llu,\"connections\":%lld,\"storage\":\"%s\"}\n",
                 (unsigned long long)up, (long long)srv->metrics.connections, srv->cluster ? "redis" : "memory");
  }
  if (n < 0 || (size_t)n >= sizeof body)
    n = (int)sizeof body - 1;
  reply_json(c, srv->draining || degraded ? 503 : 200, body, (size_t)n);
}

static void serve_version(arq_conn_t *c) {
  char body[512];
  int n = snprintf(body, sizeof body,
                   "{\"name\":\"arqonbus\",\"version\":\"%s\",\"protocol_version\":\"%s\","
                   "\"build\":{\"git\":\"%s\",\"type\":\"%s\",\"compiler\":\"%s\",\"date\":\"%s\","
                   "\"libuv\":\"%s\"}}\n",
                   ARQ_VERSION, ARQ_PROTOCOL_VERSION, ARQ_GIT_REVISION, ARQ_BUILD_TYPE, __VERSION__, __DATE__,
                   uv_version_string());
  reply_json(c, 200, body, (size_t)n);
}

static void serve_metrics(arq_conn_t *c) {
  arq_server_t *srv = c->srv;
  arq_bus_stats_t bus;
  arq_bus_stats(srv->bus, &bus);
  arq_process_t proc;
  arq_process_read(&proc);
  size_t cap = 256 * 1024;
  char *body = arq_malloc(cap);
  arq_cluster_stats_t cs;
  if (srv->cluster)
    arq_cluster_stats(srv->cluster, &cs);
  arq_storage_state_t storage = {.backend = srv->cluster ? "redis" : "memory",
                                 .up = !srv->cluster || arq_cluster_up(srv->cluster),
                                 .redis = srv->cluster ? &cs : NULL};
  size_t n = arq_metrics_render(&srv->metrics, &bus, &proc, &storage, srv->ntelemetry, body, cap);
  arq_conn_http_reply(c, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, body, n, ARQ_CLOSE_NORMAL);
  arq_free(body);
}

static void reply_json_value(arq_conn_t *c, int status, const json_t *v) {
  char *text = json_dumps(v, JSON_COMPACT);
  size_t n = strlen(text);
  arq_conn_http_reply(c, status, "application/json", NULL, text, n, ARQ_CLOSE_NORMAL);
  free(text);
}

static void reply_error(arq_conn_t *c, int status, const char *code, const char *message) {
  json_t *e = json_pack("{s:s, s:s}", "error", code, "message", message);
  reply_json_value(c, status, e);
  json_decref(e);
}

/* Finds query parameter 'name' of 'req' and decodes it into 'out'. Returns 1
 * when found, 0 when absent, -1 when badly encoded or too long. */
static int query_param(const arq_http_req_t *req, const char *name, char *out, size_t cap) {
  const char *q = req->query.p, *end = q + req->query.n;
  size_t nl = strlen(name);
  while (q && q < end) {
    const char *amp = memchr(q, '&', (size_t)(end - q));
    const char *pe = amp ? amp : end;
    const char *eq = memchr(q, '=', (size_t)(pe - q));
    const char *ke = eq ? eq : pe;
    if ((size_t)(ke - q) == nl && memcmp(q, name, nl) == 0) {
      if (!eq) {
        out[0] = '\0';
        return 1;
      }
      return arq_names_unescape(eq + 1, (size_t)(pe - eq - 1), out, cap) < 0 ? -1 : 1;
    }
    q = amp ? amp + 1 : end;
  }
  return 0;
}

/* Reads a non-negative integer parameter; returns false (and answers 400)
 * when it is present but not one. */
static bool int_param(arq_conn_t *c, const arq_http_req_t *req, const char *name, long long *v) {
  char text[32];
  int rc = query_param(req, name, text, sizeof text);
  if (rc == 0)
    return true;
  char *end = NULL;
  long long x = rc > 0 && text[0] ? strtoll(text, &end, 10) : -1;
  if (rc < 0 || !end || *end || x < 0) {
    char msg[96];
    snprintf(msg, sizeof msg, "%s must be a non-negative integer", name);
    reply_error(c, 400, "invalid_argument", msg);
    return false;
  }
  *v = x;
  return true;
}

static void serve_status(arq_conn_t *c, const arq_http_req_t *req) {
  long long offset = 0, limit = ARQ_STATUS_DEFAULT_LIMIT;
  if (!int_param(c, req, "offset", &offset) || !int_param(c, req, "limit", &limit))
    return;
  if (limit < 1) {
    reply_error(c, 400, "invalid_argument", "limit must be at least 1");
    return;
  }
  json_t *s = arq_bus_status_page(c->srv->bus, (size_t)offset, (size_t)limit);
  reply_json_value(c, 200, s);
  json_decref(s);
}

/* Redis answers after the request's connection may have gone. */
static void history_answer(void *ud, int status, json_t *body) {
  arq_http_wait_t *w = ud;
  if (w->c) {
    w->c->waiter = NULL;
    reply_json_value(w->c, status, body);
  }
  arq_free(w);
}

static void serve_history(arq_conn_t *c, const arq_http_req_t *req) {
  char room[2 * ARQ_NAME_MAX + 2], channel[2 * ARQ_NAME_MAX + 2], since[ARQ_ENV_MAX_ID + 1];
  long long limit = 0;
  int rr = query_param(req, "room", room, sizeof room);
  int rc = query_param(req, "channel", channel, sizeof channel);
  int rs = query_param(req, "since", since, sizeof since);
  if (rr < 0 || rc < 0 || rs < 0 || (rs > 0 && !since[0])) {
    reply_error(c, 400, "invalid_argument", "a query parameter is badly encoded or too long");
    return;
  }
  if (!int_param(c, req, "limit", &limit))
    return;
  char probe[32];
  if (limit == 0 && query_param(req, "limit", probe, sizeof probe) != 0) { /* limit=0 given explicitly */
    reply_error(c, 400, "invalid_argument", "limit must be at least 1");
    return;
  }
  arq_http_wait_t *w = arq_malloc(sizeof *w);
  w->c = c;
  c->waiter = w;
  arq_bus_history(c->srv->bus, rr ? room : NULL, rc ? channel : NULL, limit, rs > 0 && since[0] ? since : NULL,
                  history_answer, w);
}

/* With ops_token set, every endpoint but /health needs it as a bearer
 * token; compared in constant time (for its length). */
static bool ops_authorized(const arq_conn_t *c, const arq_http_req_t *req) {
  const char *want = c->srv->cfg->ops_token;
  size_t wn = strlen(want);
  if (wn == 0)
    return true;
  arq_slice_t h = arq_http_req_header(req, "Authorization");
  if (!h.p || h.n != 7 + wn || strncasecmp(h.p, "Bearer ", 7) != 0)
    return false;
  return CRYPTO_memcmp(h.p + 7, want, wn) == 0;
}

void arq_ops_handle(arq_conn_t *c, const arq_http_req_t *req) {
  c->srv->metrics.http_requests++;
  if (strcmp(req->method, "GET") != 0) {
    static const char msg[] = "{\"error\":\"method_not_allowed\"}\n";
    arq_conn_http_reply(c, 405, "application/json", "Allow: GET\r\n", msg, sizeof msg - 1,
                        ARQ_CLOSE_NORMAL);
    return;
  }
  if (!path_is(req, "/health") && !ops_authorized(c, req)) {
    static const char msg[] = "{\"error\":\"unauthorized\",\"message\":\"send Authorization: Bearer <ops_token>\"}\n";
    arq_conn_http_reply(c, 401, "application/json", "WWW-Authenticate: Bearer realm=\"arqonbus-ops\"\r\n", msg,
                        sizeof msg - 1, ARQ_CLOSE_NORMAL);
    return;
  }
  if (path_is(req, "/health"))
    serve_health(c);
  else if (path_is(req, "/version"))
    serve_version(c);
  else if (path_is(req, "/metrics"))
    serve_metrics(c);
  else if (path_is(req, "/status"))
    serve_status(c, req);
  else if (path_is(req, "/history"))
    serve_history(c, req);
  else {
    static const char msg[] = "{\"error\":\"not_found\"}\n";
    reply_json(c, 404, msg, sizeof msg - 1);
  }
}
