/* arqonbus: configuration, logging, limits, then the event loop. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <uv.h>

#include "config.h"
#include "net/server.h"
#include "store/cluster.h"
#include "obs/log.h"
#include "util/alloc.h"
#include "version.h"

extern char **environ;

/* Each connection is one descriptor; take what the hard limit allows. */
static void raise_fd_limit(const arq_config_t *cfg) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
  }
  if (rl.rlim_cur != RLIM_INFINITY && cfg->max_connections + 64 > rl.rlim_cur)
    arq_log(ARQ_LOG_WARN, "server", "max_connections is above the file descriptor limit",
            ARQ_LI("max_connections", cfg->max_connections), ARQ_LI("fd_limit", rl.rlim_cur));
}

int main(int argc, char **argv) {
  arq_config_t cfg;
  arq_config_action_t action;
  char err[512];
  int exit_code = 0;

  arq_config_defaults(&cfg);
  if (arq_config_load(&cfg, argc, argv, environ, &action, err, sizeof err) != 0) {
    fprintf(stderr, "arqonbus: %s\n", err);
    exit_code = 2;
    goto free_config;
  }
  if (action == ARQ_CONFIG_HELP) {
    arq_config_usage(stdout);
    goto free_config;
  }
  if (action == ARQ_CONFIG_VERSION) {
    printf("arqonbus %s (protocol %s, git %s, %s build)\n", ARQ_VERSION, ARQ_PROTOCOL_VERSION, ARQ_GIT_REVISION,
           ARQ_BUILD_TYPE);
    goto free_config;
  }
  arq_log_setup(cfg.log_level, cfg.log_format == ARQ_LOGFMT_JSON);
  signal(SIGPIPE, SIG_IGN); /* a vanished peer is an error code, not a signal */
  raise_fd_limit(&cfg);

  uv_loop_t loop;
  uv_loop_init(&loop);
  arq_server_t *srv = arq_malloc(sizeof(*srv));
  if (arq_server_start(srv, &loop, &cfg, err, sizeof err) != 0) {
    fprintf(stderr, "arqonbus: %s\n", err);
    exit_code = 2;
    arq_server_close(srv);
    uv_run(&loop, UV_RUN_DEFAULT);
    goto free_server;
  }
  arq_log(ARQ_LOG_INFO, "server", "listening", ARQ_LS("version", ARQ_VERSION), ARQ_LS("host", cfg.host),
          ARQ_LI("port", cfg.port), ARQ_LI("telemetry_port", cfg.telemetry_port),
          ARQ_LI("http_port", cfg.http_port), ARQ_LS("storage", cfg.redis_url[0] ? "redis" : "memory"),
          ARQ_LS("node", srv->cluster ? arq_cluster_node_id(srv->cluster) : ""));
  arq_server_log_security(srv);
  const char *ws = cfg.tls_cert[0] ? "wss" : "ws", *http = cfg.tls_cert[0] ? "https" : "http";
  printf("ArqonBus %s is running (%s).\n"
         "  WebSocket bus   %s://%s:%d\n"
         "  Telemetry       %s://%s:%d\n"
         "  HTTP ops        %s://%s:%d/health  /version  /metrics  /status  /history\n"
         "Connect with any WebSocket client, e.g.:  python3 -m websockets %s://%s:%d\n"
         "and send:  {\"type\":\"command\",\"command\":\"join_channel\",\"room\":\"science\",\"channel\":\"explore\"}\n"
         "           {\"type\":\"event\",\"room\":\"science\",\"channel\":\"explore\",\"payload\":{\"message\":\"hello\"}}\n"
         "Stop with Ctrl-C.\n",
         ARQ_VERSION, cfg.redis_url[0] ? "Redis mode: history in Redis Streams, shared with every node on the same Redis"
                                       : "in-memory mode", ws, cfg.host,
         cfg.port, ws, cfg.host, cfg.telemetry_port, http, cfg.http_host[0] ? cfg.http_host : cfg.host, cfg.http_port, ws, cfg.host, cfg.port);
  fflush(stdout);
  uv_run(&loop, UV_RUN_DEFAULT);
  arq_log(ARQ_LOG_INFO, "server", "stopped");

free_server:
  arq_server_free(srv);
  uv_loop_close(&loop);
  arq_free(srv);
free_config:
  arq_config_free(&cfg);
  return exit_code;
}
