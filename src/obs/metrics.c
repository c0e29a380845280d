/* Counters and the Prometheus text exposition (see metrics.h). */
#include "obs/metrics.h"

#include <stdarg.h>
#include <stdio.h>

static const char *const close_reason_names[ARQ_CLOSE_REASON_COUNT] = {
    "normal", "shutdown", "protocol_error", "slow_consumer", "heartbeat_timeout",
    "handshake_failed", "handshake_timeout", "peer_gone", "io_error", "replaced", "malformed",
};
static const uint16_t protocol_codes[3] = {1002, 1007, 1009};
static const int handshake_statuses[6] = {400, 405, 426, 431, 503, 408};

const char *arq_close_reason_name(arq_close_reason_t reason) {
  return reason < ARQ_CLOSE_REASON_COUNT ? close_reason_names[reason] : "unknown";
}

void arq_metrics_protocol_error(arq_metrics_t *m, uint16_t code) {
  for (int i = 0; i < 3; i++)
    if (protocol_codes[i] == code)
      m->protocol_errors[i]++;
}

void arq_metrics_handshake_error(arq_metrics_t *m, int status) {
  for (int i = 0; i < 6; i++)
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

size_t arq_metrics_render(const arq_metrics_t *m, char *p, size_t cap) {
  out_t o = {p, cap, 0, 0};
  header(&o, "arqonbus_connections", "gauge", "Open WebSocket connections.");
  emit(&o, "arqonbus_connections %lld\n", (long long)m->connections);
  header(&o, "arqonbus_connections_opened_total", "counter", "WebSocket handshakes completed.");
  emit(&o, "arqonbus_connections_opened_total %llu\n", (unsigned long long)m->connections_opened);
  header(&o, "arqonbus_connections_closed_total", "counter", "Connections ended, by reason.");
  for (int i = 0; i < ARQ_CLOSE_REASON_COUNT; i++)
    emit(&o, "arqonbus_connections_closed_total{reason=\"%s\"} %llu\n", close_reason_names[i],
         (unsigned long long)m->connections_closed[i]);
  header(&o, "arqonbus_protocol_errors_total", "counter", "WebSocket protocol violations, by close code.");
  for (int i = 0; i < 3; i++)
    emit(&o, "arqonbus_protocol_errors_total{code=\"%u\"} %llu\n", protocol_codes[i],
         (unsigned long long)m->protocol_errors[i]);
  header(&o, "arqonbus_handshake_errors_total", "counter", "Refused WebSocket handshakes, by HTTP status.");
  for (int i = 0; i < 6; i++)
    emit(&o, "arqonbus_handshake_errors_total{status=\"%d\"} %llu\n", handshake_statuses[i],
         (unsigned long long)m->handshake_errors[i]);
  header(&o, "arqonbus_slow_consumer_closes_total", "counter", "Clients closed because they could not keep up.");
  emit(&o, "arqonbus_slow_consumer_closes_total %llu\n", (unsigned long long)m->slow_consumer_closes);
  header(&o, "arqonbus_messages_received_total", "counter", "WebSocket data messages received from clients.");
  emit(&o, "arqonbus_messages_received_total %llu\n", (unsigned long long)m->messages_received);
  header(&o, "arqonbus_messages_delivered_total", "counter", "Envelopes queued to clients: events, private messages, replies, notifications, errors.");
  emit(&o, "arqonbus_messages_delivered_total %llu\n", (unsigned long long)m->messages_delivered);
  header(&o, "arqonbus_received_bytes_total", "counter", "Bytes read from WebSocket clients.");
  emit(&o, "arqonbus_received_bytes_total %llu\n", (unsigned long long)m->bytes_in);
  header(&o, "arqonbus_sent_bytes_total", "counter", "Bytes written to WebSocket clients.");
  emit(&o, "arqonbus_sent_bytes_total %llu\n", (unsigned long long)m->bytes_out);
  header(&o, "arqonbus_http_requests_total", "counter", "Requests served on the ops port.");
  emit(&o, "arqonbus_http_requests_total %llu\n", (unsigned long long)m->http_requests);
  header(&o, "arqonbus_start_time_seconds", "gauge", "Start time of the process since the Unix epoch.");
  emit(&o, "arqonbus_start_time_seconds %llu.%03llu\n", (unsigned long long)(m->start_time_ms / 1000),
       (unsigned long long)(m->start_time_ms % 1000));
  return o.overflow ? 0 : o.len;
}
