/* Counters and the Prometheus text exposition (see metrics.h). */
#include "obs/metrics.h"

#include "store/cluster.h"

#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static const char *const close_reason_names[ARQ_CLOSE_REASON_COUNT] = {
    "normal",           "shutdown",          "protocol_error", "slow_consumer", "heartbeat_timeout",
    "handshake_failed", "handshake_timeout", "peer_gone",      "io_error",      "replaced",
    "malformed",        "token_expired",     "rate_limited",
};
static const uint16_t protocol_codes[3] = {1002, 1007, 1009};
static const int handshake_statuses[9] = {400, 405, 426, 431, 503, 408, 401, 403, 429};
static const char *const auth_results[3] = {"ok", "missing", "refused"};

const char *arq_close_reason_name(arq_close_reason_t reason) {
  return reason < ARQ_CLOSE_REASON_COUNT ? close_reason_names[reason] : "unknown";
}

void arq_metrics_protocol_error(arq_metrics_t *m, uint16_t code) {
  for (int i = 0; i < 3; i++)
    if (protocol_codes[i] == code)
      m->protocol_errors[i]++;
}

void arq_metrics_handshake_error(arq_metrics_t *m, int status) {
  for (int i = 0; i < 9; i++)
    if (handshake_statuses[i] == status)
      m->handshake_errors[i]++;
}

typedef struct out {
  char *p;
  size_t cap, len;
  int overflow;
} out_t;

__attribute__((format(printf, 2, 3))) static void emit(out_t *o, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(o->p + o->len, o->cap - o->len, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= o->cap - o->len) {
    o->overflow = 1;
    o->len = o->cap - 1;
    return;
  }
  o->len += (size_t)n;
}

static void header(out_t *o, const char *name, const char *type, const char *help) {
  emit(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A family of one unlabelled sample. */
static void series(out_t *o, const char *name, const char *type, const char *help, uint64_t value) {
  header(o, name, type, help);
  emit(o, "%s %llu\n", name, (unsigned long long)value);
}

void arq_process_read(arq_process_t *p) {
  *p = (arq_process_t){0};
  FILE *f = fopen("/proc/self/statm", "r");
  unsigned long size = 0, resident = 0;
  if (f) {
    if (fscanf(f, "%lu %lu", &size, &resident) == 2)
      p->resident_bytes = (uint64_t)resident * (uint64_t)sysconf(_SC_PAGESIZE);
    fclose(f);
  }
  DIR *d = opendir("/proc/self/fd");
  if (d) {
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
      if (e->d_name[0] != '.')
        p->open_fds++;
    closedir(d);
    p->open_fds--; /* the directory stream's own descriptor */
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
    p->max_fds = rl.rlim_cur;
}

/* A histogram family member: cumulative buckets, sum and count. 'labels' is
 * "" or 'name="value",' (with the trailing comma). */
static void histogram(out_t *o, const char *name, const char *labels, const arq_hist_t *h) {
  uint64_t cum = 0;
  for (int i = 0; i < ARQ_HIST_NBOUNDS; i++) {
    cum += h->buckets[i];
    emit(o, "%s_bucket{%sle=\"%g\"} %llu\n", name, labels, arq_hist_bounds[i], (unsigned long long)cum);
  }
  emit(o, "%s_bucket{%sle=\"+Inf\"} %llu\n", name, labels, (unsigned long long)h->count);
  size_t n = strlen(labels);
  if (n) /* drop the trailing comma for the plain series */
    emit(o, "%s_sum{%.*s} %.9f\n%s_count{%.*s} %llu\n", name, (int)n - 1, labels, (double)h->sum_ns / 1e9, name,
         (int)n - 1, labels, (unsigned long long)h->count);
  else
    emit(o, "%s_sum %.9f\n%s_count %llu\n", name, (double)h->sum_ns / 1e9, name, (unsigned long long)h->count);
}

size_t arq_metrics_render(const arq_metrics_t *m, const arq_bus_stats_t *bus, const arq_process_t *p,
                          const arq_storage_state_t *storage, uint64_t telemetry_clients, char *out, size_t cap) {
  out_t o = {out, cap, 0, 0};
  header(&o, "arqonbus_connections", "gauge", "Open WebSocket connections.");
  emit(&o, "arqonbus_connections %lld\n", (long long)m->connections);
  series(&o, "arqonbus_connections_opened_total", "counter", "WebSocket handshakes completed.", m->connections_opened);
  header(&o, "arqonbus_connections_closed_total", "counter", "Connections ended, by reason.");
  for (int i = 0; i < ARQ_CLOSE_REASON_COUNT; i++)
    emit(&o, "arqonbus_connections_closed_total{reason=\"%s\"} %llu\n", close_reason_names[i],
         (unsigned long long)m->connections_closed[i]);
  header(&o, "arqonbus_protocol_errors_total", "counter", "WebSocket protocol violations, by close code.");
  for (int i = 0; i < 3; i++)
    emit(&o, "arqonbus_protocol_errors_total{code=\"%u\"} %llu\n", protocol_codes[i],
         (unsigned long long)m->protocol_errors[i]);
  header(&o, "arqonbus_handshake_errors_total", "counter", "Refused WebSocket handshakes, by HTTP status.");
  for (int i = 0; i < 9; i++)
    emit(&o, "arqonbus_handshake_errors_total{status=\"%d\"} %llu\n", handshake_statuses[i],
         (unsigned long long)m->handshake_errors[i]);
  header(&o, "arqonbus_auth_total", "counter",
         "Credentials checked at bus and telemetry upgrades, by result (missing and refused get 401).");
  for (int i = 0; i < 3; i++)
    emit(&o, "arqonbus_auth_total{result=\"%s\"} %llu\n", auth_results[i],
         (unsigned long long)(m->auth[i] + (i == ARQ_AUTH_OK        ? bus->auth_inband[0]
                                            : i == ARQ_AUTH_REFUSED ? bus->auth_inband[1]
                                                                    : 0)));
  header(&o, "arqonbus_auth_reloads_total", "counter", "Credentials read again on SIGHUP, by result.");
  emit(&o, "arqonbus_auth_reloads_total{result=\"ok\"} %llu\narqonbus_auth_reloads_total{result=\"failed\"} %llu\n",
       (unsigned long long)m->auth_reloads[0], (unsigned long long)m->auth_reloads[1]);
  header(&o, "arqonbus_forbidden_total", "counter",
         "Actions refused with forbidden, by action (connect: upgrades refused with 403).");
  for (int i = 0; i < ARQ_DENY_NACTIONS; i++)
    emit(&o, "arqonbus_forbidden_total{action=\"%s\"} %llu\n", arq_deny_name((arq_deny_t)i),
         (unsigned long long)(bus->forbidden[i] + (i == ARQ_DENY_CONNECT ? m->forbidden_connect : 0)));
  series(&o, "arqonbus_slow_consumer_closes_total", "counter", "Clients closed because they could not keep up.",
         m->slow_consumer_closes);
  if (m->tls) {
    series(&o, "arqonbus_tls_handshake_errors_total", "counter",
           "TLS handshakes that failed (old versions, plaintext on a TLS port, bad records), all ports.",
           m->tls_handshake_errors);
    header(&o, "arqonbus_tls_reloads_total", "counter", "Certificate reloads on SIGHUP, by result.");
    emit(&o, "arqonbus_tls_reloads_total{result=\"ok\"} %llu\n", (unsigned long long)m->tls_reloads[0]);
    emit(&o, "arqonbus_tls_reloads_total{result=\"failed\"} %llu\n", (unsigned long long)m->tls_reloads[1]);
  }
  header(&o, "arqonbus_messages_received_total", "counter",
         "Messages received from bus clients, by envelope type (invalid: not a valid envelope).");
  for (int t = 0; t < ARQ_MSG_NTYPES; t++)
    emit(&o, "arqonbus_messages_received_total{type=\"%s\"} %llu\n", arq_msg_type_name((arq_msg_type_t)t),
         (unsigned long long)bus->received[t]);
  emit(&o, "arqonbus_messages_received_total{type=\"invalid\"} %llu\n", (unsigned long long)bus->received_invalid);
  header(&o, "arqonbus_messages_delivered_total", "counter",
         "Envelopes queued to bus clients, by type (events, private messages, replies, notifications, errors).");
  for (int t = 0; t < ARQ_MSG_NTYPES; t++)
    emit(&o, "arqonbus_messages_delivered_total{type=\"%s\"} %llu\n", arq_msg_type_name((arq_msg_type_t)t),
         (unsigned long long)bus->delivered[t]);
  header(&o, "arqonbus_errors_total", "counter", "Error envelopes sent to clients, by code.");
  for (int c = 0; c < ARQ_CODE_NCODES; c++)
    emit(&o, "arqonbus_errors_total{code=\"%s\"} %llu\n", arq_code_name((arq_code_t)c),
         (unsigned long long)bus->errors[c]);
  series(&o, "arqonbus_malformed_closes_total", "counter",
         "Clients closed after too many malformed envelopes in a row.", bus->malformed_closes);
  header(&o, "arqonbus_limit_denials_total", "counter",
         "Requests refused by a limit, by limit (rate, rate_close, subscriptions, channels, rooms, "
         "connections_per_ip, origin).");
  for (int l = 0; l < ARQ_LIMIT_NLIMITS; l++)
    emit(&o, "arqonbus_limit_denials_total{limit=\"%s\"} %llu\n", arq_limit_name((arq_limit_t)l),
         (unsigned long long)(bus->limit_denials[l] + m->limit_denials[l]));
  header(&o, "arqonbus_routing_latency_seconds", "histogram",
         "Time from a message's arrival to its last recipient's queue (events, private, telemetry).");
  histogram(&o, "arqonbus_routing_latency_seconds", "", &bus->routing);
  header(&o, "arqonbus_command_duration_seconds", "histogram", "Time to run a command, by command.");
  for (size_t i = 0; arq_bus_command_name(i); i++) {
    char labels[64];
    snprintf(labels, sizeof labels, "command=\"%s\",", arq_bus_command_name(i));
    histogram(&o, "arqonbus_command_duration_seconds", labels, &bus->commands[i]);
  }
  series(&o, "arqonbus_clients", "gauge", "Clients connected to the bus.", bus->clients);
  series(&o, "arqonbus_rooms", "gauge", "Rooms that exist.", bus->rooms);
  series(&o, "arqonbus_channels", "gauge", "Channels that exist.", bus->channels);
  series(&o, "arqonbus_history_messages", "gauge", "Messages held in history, all channels.", bus->history_messages);
  header(&o, "arqonbus_storage_up", "gauge", "Whether the history backend is available (1) or degraded (0).");
  emit(&o, "arqonbus_storage_up{backend=\"%s\"} %d\n", storage->backend, storage->up ? 1 : 0);
  if (storage->redis) {
    const arq_cluster_stats_t *r = storage->redis;
    series(&o, "arqonbus_redis_connects_total", "counter", "Connections to Redis established.", r->redis.connects);
    series(&o, "arqonbus_redis_disconnects_total", "counter", "Connections to Redis lost.", r->redis.disconnects);
    series(&o, "arqonbus_redis_errors_total", "counter", "Redis commands that could not be sent, and error replies to connection setup (refused stream writes count in arqonbus_redis_stream_writes_total).",
           r->redis.errors);
    series(&o, "arqonbus_redis_timeouts_total", "counter", "Redis connections dropped for not answering in time.",
           r->redis.timeouts);
    header(&o, "arqonbus_redis_stream_writes_total", "counter",
           "Messages appended to their Redis stream, by result (failed: error reply or connection lost).");
    emit(&o, "arqonbus_redis_stream_writes_total{result=\"written\"} %llu\n", (unsigned long long)r->written);
    emit(&o, "arqonbus_redis_stream_writes_total{result=\"failed\"} %llu\n", (unsigned long long)r->failed);
    series(&o, "arqonbus_redis_held_total", "counter",
           "Messages delivered on this node and held in memory while Redis was unreachable.", r->held);
    series(&o, "arqonbus_redis_written_back_total", "counter", "Held messages later written to their stream.",
           r->written_back);
    series(&o, "arqonbus_redis_refused_total", "counter",
           "Publishes refused with storage_unavailable (strict mode, or the outage buffer full).", r->refused);
    series(&o, "arqonbus_redis_held_messages", "gauge", "Messages held in memory for the write-back now.",
           r->held_now);
    series(&o, "arqonbus_redis_held_bytes", "gauge", "Bytes of messages held for the write-back now.",
           r->held_bytes);
    series(&o, "arqonbus_redis_stream_reads_total", "counter",
           "Stream entries this node read to deliver (from every node's publishers).", r->read);
    series(&o, "arqonbus_redis_read_gaps_total", "counter",
           "Times this node fell so far behind a stream that entries were trimmed before it delivered them.",
           r->read_gaps);
    series(&o, "arqonbus_cluster_casts_total", "counter",
           "Messages for the other nodes (room-wide, private, notifications) sent through arqon:bus.", r->casts);
    series(&o, "arqonbus_cluster_casts_lost_total", "counter",
           "Messages for the other nodes not sent because Redis was unreachable.", r->casts_lost);
  }
  series(&o, "arqonbus_telemetry_clients", "gauge", "Monitoring clients on the telemetry port.", telemetry_clients);
  series(&o, "arqonbus_telemetry_events_total", "counter", "Telemetry events published to monitoring clients.",
         m->telemetry_events);
  series(&o, "arqonbus_telemetry_dropped_total", "counter",
         "Telemetry envelopes dropped because a monitoring client's queue was full.", m->telemetry_dropped);
  series(&o, "arqonbus_received_bytes_total", "counter", "Bytes read from WebSocket clients.", m->bytes_in);
  series(&o, "arqonbus_sent_bytes_total", "counter", "Bytes written to WebSocket clients.", m->bytes_out);
  series(&o, "arqonbus_http_requests_total", "counter", "Requests served on the ops port.", m->http_requests);
  header(&o, "arqonbus_start_time_seconds", "gauge", "Start time of the process since the Unix epoch.");
  emit(&o, "arqonbus_start_time_seconds %llu.%03llu\n", (unsigned long long)(m->start_time_ms / 1000),
       (unsigned long long)(m->start_time_ms % 1000));
  series(&o, "arqonbus_process_resident_memory_bytes", "gauge", "Resident memory of the process.", p->resident_bytes);
  series(&o, "arqonbus_process_open_fds", "gauge", "Open file descriptors of the process.", p->open_fds);
  series(&o, "arqonbus_process_max_fds", "gauge", "File descriptor limit of the process.", p->max_fds);
  return o.overflow ? 0 : o.len;
}
