/* The HTTP ops port: /health, /version, /metrics.
 *
 * One request per connection (answered with Connection: close), parsed by the
 * same HTTP head parser as the WebSocket upgrade. GET only; unknown
 * paths 404, other methods 405.
 */
#include <stdio.h>
#include <string.h>

#include "net/conn.h"
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
  if (srv->draining)
    n = snprintf(body, sizeof body, "{\"status\":\"shutting_down\",\"reason\":\"the server is draining\"}\n");
  else
    n = snprintf(body, sizeof body, "{\"status\":\"ok\",\"uptime_seconds\":%llu,\"connections\":%lld}\n",
                 (unsigned long long)up, (long long)srv->metrics.connections);
  reply_json(c, srv->draining ? 503 : 200, body, (size_t)n);
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
  size_t cap = 16384;
  char *body = arq_malloc(cap);
  size_t n = arq_metrics_render(&c->srv->metrics, body, cap);
  arq_conn_http_reply(c, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, body, n, ARQ_CLOSE_NORMAL);
  arq_free(body);
}

void arq_ops_handle(arq_conn_t *c, const arq_http_req_t *req) {
  c->srv->metrics.http_requests++;
  if (strcmp(req->method, "GET") != 0) {
    static const char msg[] = "{\"error\":\"method_not_allowed\"}\n";
    arq_conn_http_reply(c, 405, "application/json", "Allow: GET\r\n", msg, sizeof msg - 1,
                        ARQ_CLOSE_NORMAL);
    return;
  }
  if (path_is(req, "/health"))
    serve_health(c);
  else if (path_is(req, "/version"))
    serve_version(c);
  else if (path_is(req, "/metrics"))
    serve_metrics(c);
  else {
    static const char msg[] = "{\"error\":\"not_found\"}\n";
    reply_json(c, 404, msg, sizeof msg - 1);
  }
}
