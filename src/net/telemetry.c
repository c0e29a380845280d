/* The telemetry stream (see telemetry.h). */
#include "net/telemetry.h"

#include <stdio.h>
#include <string.h>

#include "bus/names.h"
#include "net/conn.h"
#include "obs/log.h"
#include "util/err.h"

#define ALL_EVENTS ((1u << ARQ_TEL_NEVENTS) - 1)

int arq_telemetry_parse_query(const char *q, size_t n, uint32_t *mask, char *err, size_t errcap) {
  *mask = ALL_EVENTS;
  const char *end = q + n;
  while (q < end) {
    const char *amp = memchr(q, '&', (size_t)(end - q));
    const char *pe = amp ? amp : end;
    const char *eq = memchr(q, '=', (size_t)(pe - q));
    bool is_events = eq && eq - q == 6 && memcmp(q, "events", 6) == 0;
    if (is_events) {
      char value[1024];
      long vn = arq_names_unescape(eq + 1, (size_t)(pe - eq - 1), value, sizeof value);
      if (vn <= 0) {
        snprintf(err, errcap, "query parameter events must be a comma-separated list of event types");
        return ARQ_EINVAL;
      }
      *mask = 0;
      char *save = NULL;
      for (char *item = strtok_r(value, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        int ev = arq_tel_parse(item, strlen(item));
        if (ev < 0) {
          for (char *c = item; *c; c++) /* the one-line body of a 400 */
            if ((unsigned char)*c < 0x20 || *c == 0x7f)
              *c = '?';
          snprintf(err, errcap, "query parameter events: unknown event type \"%.64s\"", item);
          return ARQ_EINVAL;
        }
        *mask |= 1u << ev;
      }
      if (*mask == 0) { /* "events=," names nothing: a monitor that could never hear anything */
        snprintf(err, errcap, "query parameter events must name at least one event type");
        return ARQ_EINVAL;
      }
    }
    q = amp ? amp + 1 : end;
  }
  return 0;
}

static void update_mask(arq_server_t *srv) {
  uint32_t mask = 0;
  arq_list_t *n, *tmp;
  arq_list_foreach_safe(n, tmp, &srv->telemetry_open) mask |= ARQ_CONTAINER_OF(n, arq_conn_t, node_open)->tel_mask;
  srv->tel_mask = mask;
  arq_bus_set_telemetry_mask(srv->bus, mask);
}

void arq_telemetry_expire(arq_server_t *srv, uint64_t now_wall_ms) {
  arq_list_t *n, *tmp;
  arq_list_foreach_safe(n, tmp, &srv->telemetry_open) {
    arq_conn_t *c = ARQ_CONTAINER_OF(n, arq_conn_t, node_open);
    if (c->expires_ms && now_wall_ms >= c->expires_ms)
      arq_conn_close(c, ARQ_CLOSE_TOKEN_EXPIRED, "token expired", ARQ_CLOSE_EXPIRED); /* unlinks it */
  }
}

void arq_telemetry_attach(arq_server_t *srv, arq_conn_t *c, uint32_t mask) {
  c->tel_mask = mask;
  arq_list_push_back(&srv->telemetry_open, &c->node_open);
  srv->ntelemetry++;
  update_mask(srv);
  json_t *events = json_array();
  for (int i = 0; i < ARQ_TEL_NEVENTS; i++)
    if (mask & (1u << i))
      json_array_append_new(events, json_string(arq_tel_name((arq_tel_event_t)i)));
  json_t *payload = json_pack("{s:s, s:o, s:I, s:I}", "event", "welcome", "events", events, "stats_interval_ms",
                              (json_int_t)srv->cfg->telemetry_stats_interval_ms, "queue_limit",
                              (json_int_t)srv->cfg->telemetry_queue);
  /* A system envelope, as on the bus port: the stream proper is telemetry. */
  json_t *env = arq_bus_tel_envelope(srv->bus, "welcome", payload);
  json_object_set_new(env, "type", json_string("system"));
  json_object_del(env, "eventType");
  size_t off, len;
  arq_rcbuf_t *f = arq_env_frame(env, &srv->tel_scratch, &off, &len);
  json_decref(env);
  arq_conn_send(c, f);
  arq_rcbuf_unref(f);
}

void arq_telemetry_detach(arq_server_t *srv, arq_conn_t *c) {
  if (!arq_list_linked(&c->node_open))
    return;
  arq_list_remove(&c->node_open);
  srv->ntelemetry--;
  update_mask(srv);
}

void arq_telemetry_publish(arq_server_t *srv, arq_tel_event_t ev, json_t *env) {
  if (!(srv->tel_mask & (1u << ev)))
    return;
  size_t off, len;
  arq_rcbuf_t *f = arq_env_frame(env, &srv->tel_scratch, &off, &len);
  srv->metrics.telemetry_events++;
  arq_list_t *n, *tmp;
  arq_list_foreach_safe(n, tmp, &srv->telemetry_open) {
    arq_conn_t *c = ARQ_CONTAINER_OF(n, arq_conn_t, node_open);
    if (!(c->tel_mask & (1u << ev)))
      continue;
    if (arq_conn_send(c, f)) /* a full queue drops the event (counted by the connection) */
      srv->metrics.telemetry_sent++;
  }
  arq_rcbuf_unref(f);
}

void arq_telemetry_report(arq_server_t *srv, arq_tel_event_t ev, json_t *payload) {
  if (!(srv->tel_mask & (1u << ev)) || !srv->bus) {
    json_decref(payload);
    return;
  }
  json_t *env = arq_bus_tel_envelope(srv->bus, arq_tel_name(ev), payload);
  arq_telemetry_publish(srv, ev, env);
  json_decref(env);
}

json_t *arq_telemetry_snapshot(arq_server_t *srv) {
  arq_bus_stats_t s;
  arq_bus_stats(srv->bus, &s);
  uint64_t received = s.received_invalid, delivered = 0;
  for (int i = 0; i < ARQ_MSG_NTYPES; i++) {
    received += s.received[i];
    delivered += s.delivered[i];
  }
  return json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "connections",
                   (json_int_t)srv->metrics.connections, "clients", (json_int_t)s.clients, "telemetry_clients",
                   (json_int_t)srv->ntelemetry, "rooms", (json_int_t)s.rooms, "channels", (json_int_t)s.channels,
                   "messages_received", (json_int_t)received, "messages_delivered", (json_int_t)delivered,
                   "history_messages", (json_int_t)s.history_messages, "bytes_in", (json_int_t)srv->metrics.bytes_in,
                   "bytes_out", (json_int_t)srv->metrics.bytes_out, "telemetry_dropped",
                   (json_int_t)srv->metrics.telemetry_dropped);
}

void arq_telemetry_stats(arq_server_t *srv) {
  if (srv->tel_mask & (1u << ARQ_TEL_STATS))
    arq_telemetry_report(srv, ARQ_TEL_STATS, arq_telemetry_snapshot(srv));
}
