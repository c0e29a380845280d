/* The bus: client lifecycle, receiving, routing (see bus.h).
 *
 * Every entry point from the shell runs between enter() and leave(). A
 * client that disconnects while the bus is inside (a send made the shell close
 * a slow consumer, say) is only marked gone and queued; leave() removes it
 * when the outermost entry point returns, so no loop ever walks an array that
 * changes under it.
 *
 * Routing an event: validate once, build the outgoing envelope once, encode
 * it once into a frame, store that frame in history, then hand the same frame
 * to every recipient. A room-wide event stamps each client it reaches with the
 * round number, so a client in several of the room's channels gets it once.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "bus/bus_int.h"
#include "util/alloc.h"
#include "util/err.h"
#include "util/time.h"
#include "wire/frame.h"
#include "wire/utf8.h"

static const char *const tel_names[ARQ_TEL_NEVENTS] = {
    "client_connected", "client_disconnected", "channel_created",  "channel_deleted", "client_joined",
    "client_left",      "command_executed",    "error",            "protocol_violation", "slow_consumer",
    "stats",            "client_telemetry",    "agent_activity",
};

const char *arq_tel_name(arq_tel_event_t ev) { return (unsigned)ev < ARQ_TEL_NEVENTS ? tel_names[ev] : "?"; }

int arq_tel_parse(const char *s, size_t n) {
  for (int i = 0; i < ARQ_TEL_NEVENTS; i++)
    if (strlen(tel_names[i]) == n && memcmp(tel_names[i], s, n) == 0)
      return i;
  return -1;
}

void arq_bus_opts_defaults(arq_bus_opts_t *o) {
  memset(o, 0, sizeof *o);
  o->server_version = "0";
  o->heartbeat_interval_ms = 25000;
  o->max_message_size = 1 << 20;
  o->max_envelope_size = 512 << 10;
  o->history_size = 500;
  o->history_default_limit = 50;
  o->history_max_limit = 500;
  o->max_malformed = 10;
  o->channel_ttl_ms = 300000;
  o->telemetry_channel = "integriguard:telemetry-stream";
  o->dashboard_channel = "integriguard:dashboard-events";
  o->command_roles = "create_channel=admin,delete_channel=admin,status=admin";
}

static char **copy_list(const char *const *l) {
  size_t n = 0;
  while (l && l[n])
    n++;
  char **out = arq_calloc(n + 1, sizeof *out);
  for (size_t i = 0; i < n; i++)
    out[i] = arq_strdup(l[i]);
  return out;
}

static void free_list(char **l) {
  for (size_t i = 0; l && l[i]; i++)
    arq_free(l[i]);
  arq_free(l);
}

arq_bus_t *arq_bus_new(const arq_bus_opts_t *o, const arq_bus_io_t *io, arq_history_t *history, char *err,
                       size_t errcap) {
  arq_bus_t *b = arq_calloc(1, sizeof *b);
  b->o = *o;
  b->o.server_version = arq_strdup(o->server_version ? o->server_version : "0");
  b->bootstrap = copy_list(o->bootstrap);
  b->admins = copy_list(o->admins);
  b->o.bootstrap = (const char *const *)b->bootstrap;
  b->o.admins = (const char *const *)b->admins;
  b->io = *io;
  b->history = history;
  b->started_at = arq_time_wall_ms();
  b->cmd_error = -1;
  snprintf(b->node_id, sizeof b->node_id, "%s", o->node_id ? o->node_id : "");
  b->o.node_id = NULL;
  arq_list_init(&b->dead);
  for (size_t i = 0; b->admins[i]; i++) {
    if (!arq_names_valid_client_id(b->admins[i], strlen(b->admins[i]))) {
      snprintf(err, errcap, "admin \"%.64s\" is not a valid client id", b->admins[i]);
      goto fail;
    }
  }
  if (arq_access_init(b, o, err, errcap) != 0)
    goto fail;
  b->o.command_roles = b->o.protected_rooms = NULL; /* parsed: not kept */
  for (size_t i = 0; b->bootstrap[i]; i++) {
    char r[ARQ_NAME_MAX + 1], c[ARQ_NAME_MAX + 1];
    bool created;
    if (arq_names_split(b->bootstrap[i], r, c) != 0 || !c[0]) {
      snprintf(err, errcap, "bootstrap channel \"%.64s\" is not a valid room:channel", b->bootstrap[i]);
      goto fail;
    }
    arq_router_ensure(b, r, c, &created)->bootstrap = true;
  }
  /* The telemetry and dashboard channels always exist, like bootstrap ones
   * (NULL or "": that feature publishes nothing on the bus). */
  const char *special[2] = {o->telemetry_channel, o->dashboard_channel};
  char *rooms[2] = {b->tel_room, b->dash_room}, *chans[2] = {b->tel_channel, b->dash_channel};
  for (int i = 0; i < 2; i++) {
    bool created;
    if (!special[i] || !special[i][0])
      continue;
    if (arq_names_split(special[i], rooms[i], chans[i]) != 0 || !chans[i][0]) {
      snprintf(err, errcap, "%s channel \"%.64s\" is not a valid room:channel", i ? "dashboard" : "telemetry",
               special[i]);
      goto fail;
    }
    arq_router_ensure(b, rooms[i], chans[i], &created)->bootstrap = true;
  }
  b->o.telemetry_channel = b->o.dashboard_channel = NULL; /* the copies above are what counts */
  return b;
fail:
  arq_bus_free(b);
  return NULL;
}

void arq_bus_client_ref(arq_client_t *c) { c->refs++; }

void arq_bus_client_unref(arq_client_t *c) {
  if (--c->refs > 0)
    return;
  arq_free(c->screen_name);
  arq_free(c->avatar);
  arq_free(c->personality);
  arq_free(c->rooms);
  arq_free(c->created);
  arq_free(c->subs);
  arq_free(c);
}

void arq_bus_free(arq_bus_t *b) {
  if (!b)
    return;
  b->tel_mask = 0; /* tearing down is not news */
  /* Channels first: removing one drops its members' subscriptions, which
   * needs the clients still alive. */
  arq_channel_t *ch, *tmp;
  HASH_ITER(hh, b->channels, ch, tmp) arq_router_remove(b, ch);
  arq_client_t *c, *ctmp;
  HASH_ITER(hh, b->clients, c, ctmp) {
    HASH_DEL(b->clients, c);
    arq_bus_client_unref(c);
  }
  if (b->history)
    b->history->ops->free(b->history);
  arq_peers_free(b);
  arq_access_free(b);
  free_list(b->bootstrap);
  free_list(b->admins);
  arq_free((char *)b->o.server_version);
  arq_buf_free(&b->scratch);
  arq_free(b);
}

/* ---- entry and exit ----------------------------------------------------- */

static void remove_client(arq_bus_t *b, arq_client_t *c);

static void enter(arq_bus_t *b) { b->depth++; }

static void leave(arq_bus_t *b) {
  if (--b->depth > 0)
    return;
  b->depth++; /* removals notify channels, which may close more clients */
  arq_list_t *n;
  while ((n = arq_list_head(&b->dead))) {
    arq_list_remove(n);
    remove_client(b, ARQ_CONTAINER_OF(n, arq_client_t, node_dead));
  }
  b->depth--;
}

/* ---- ids and sending ---------------------------------------------------- */

static uint64_t mix(uint64_t x) { /* splitmix64 */
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

void arq_bus_new_id(arq_bus_t *b, char *out) {
  /* Time first so ids sort roughly by creation; then this process; then a
   * counter, so two ids of one process never collide. */
  snprintf(out, 40, "arq_%011llx%06llx%07llx", (unsigned long long)(arq_time_wall_ms() & 0xfffffffffffULL),
           (unsigned long long)(mix(b->o.seed) & 0xffffff), (unsigned long long)(b->ids++ & 0xfffffff));
}

static bool deliver(arq_bus_t *b, arq_client_t *c, arq_rcbuf_t *frame, arq_msg_type_t type) {
  if (c->gone || !c->conn)
    return false;
  if (!b->io.send(b->io.ud, c->conn, frame))
    return false;
  c->msgs_out++;
  b->st.delivered[type]++;
  return true;
}

bool arq_bus_deliver_to(arq_bus_t *b, arq_client_t *c, arq_rcbuf_t *f, arq_msg_type_t type) {
  return deliver(b, c, f, type);
}

/* Encodes 'obj' once into a frame (one reference, caller owns) and releases
 * 'obj'. '*off' and '*len' locate the JSON text in the frame. */
static arq_rcbuf_t *encode(arq_bus_t *b, json_t *obj, size_t *off, size_t *len) {
  arq_rcbuf_t *f = arq_env_frame(obj, &b->scratch, off, len);
  json_decref(obj);
  return f;
}

/* Encodes 'obj' (stolen), a message with id 'id' for channel 'ch', with the
 * position history gives it ('pos', 24 bytes: "" when none), stores it and
 * returns the frame (one reference, caller owns): what is delivered is
 * exactly what history keeps. */
static arq_rcbuf_t *store(arq_bus_t *b, arq_channel_t *ch, const char *id, json_t *obj, char *pos) {
  pos[0] = '\0';
  const arq_history_ops_t *ops = b->history->ops;
  uint64_t p = ops->next_position ? ops->next_position(b->history, ch->room->name, ch->name) : 0;
  if (p)
    snprintf(pos, 24, "%llu", (unsigned long long)p);
  size_t off, len;
  arq_rcbuf_t *f = arq_env_frame_at(obj, pos, &b->scratch, &off, &len);
  json_decref(obj);
  ops->append(b->history, ch->room->name, ch->name, id, f, off, len);
  ch->messages++;
  return f;
}

void arq_bus_send_to(arq_bus_t *b, arq_client_t *c, json_t *obj, arq_msg_type_t type) {
  size_t off, len;
  arq_rcbuf_t *f = encode(b, obj, &off, &len);
  deliver(b, c, f, type);
  arq_rcbuf_unref(f);
}

static json_t *server_envelope(arq_bus_t *b, arq_msg_type_t type, const char *room, const char *channel,
                               const char *command, json_t *payload, const char *correlation_id) {
  char id[40], ts[32];
  arq_bus_new_id(b, id);
  arq_time_iso8601(arq_time_wall_ms(), ts, sizeof ts);
  arq_env_out_t o = {.type = type, .id = id, .room = room, .channel = channel, .command = command,
                     .payload = payload, .timestamp = ts, .correlation_id = correlation_id};
  json_t *obj = arq_env_build(&o);
  json_decref(payload);
  return obj;
}

/* The acknowledgement of message 'id' to its sender: stored in
 * 'room':'channel' at 'position' ("" or NULL: the message is not stored,
 * it was routed). */
static void send_ack(arq_bus_t *b, arq_client_t *c, const char *id, const char *room, const char *channel,
                     const char *position) {
  json_t *payload = json_pack("{s:s, s:s}", "event", "ack", "id", id);
  if (position && position[0])
    json_object_set_new(payload, "position", json_string(position));
  arq_bus_send_to(b, c,
                  server_envelope(b, ARQ_MSG_SYSTEM, room && room[0] ? room : NULL,
                                  channel && channel[0] ? channel : NULL, NULL, payload, id),
                  ARQ_MSG_SYSTEM);
}

/* ---- telemetry ---------------------------------------------------------- */

void arq_bus_set_telemetry_mask(arq_bus_t *b, uint32_t mask) { b->tel_mask = mask; }

/* A telemetry envelope, in a channel when 'room' is not NULL. */
static json_t *tel_envelope_in(arq_bus_t *b, const char *event_type, const char *room, const char *channel,
                               json_t *payload) {
  char id[40], ts[32];
  arq_bus_new_id(b, id);
  arq_time_iso8601(arq_time_wall_ms(), ts, sizeof ts);
  arq_env_out_t o = {.type = ARQ_MSG_TELEMETRY, .id = id, .event_type = event_type, .room = room,
                     .channel = channel, .payload = payload, .timestamp = ts};
  json_t *obj = arq_env_build(&o);
  json_decref(payload);
  return obj;
}

json_t *arq_bus_tel_envelope(arq_bus_t *b, const char *event_type, json_t *payload) {
  return tel_envelope_in(b, event_type, NULL, NULL, payload);
}

void arq_bus_tel(arq_bus_t *b, arq_tel_event_t ev, json_t *payload) {
  if (!arq_bus_tel_wanted(b, ev)) {
    json_decref(payload);
    return;
  }
  json_t *env = arq_bus_tel_envelope(b, arq_tel_name(ev), payload);
  b->io.telemetry(b->io.ud, ev, env);
  json_decref(env);
}

void arq_bus_tel_channel(arq_bus_t *b, arq_tel_event_t ev, const arq_channel_t *ch) {
  if (arq_bus_tel_wanted(b, ev))
    arq_bus_tel(b, ev, json_pack("{s:s, s:s, s:b}", "room", ch->room->name, "channel", ch->name, "bootstrap",
                                 ch->bootstrap));
}

void arq_bus_tel_member(arq_bus_t *b, arq_tel_event_t ev, const arq_client_t *c, const arq_channel_t *ch) {
  if (arq_bus_tel_wanted(b, ev))
    arq_bus_tel(b, ev, json_pack("{s:s, s:s, s:s, s:s, s:I}", "client_id", c->id, "client_type",
                                 arq_client_type_name(c->type), "room", ch->room->name, "channel", ch->name,
                                 "members", (json_int_t)ch->nmembers));
}

static bool is_agent(const arq_client_t *c) { return c->type == ARQ_CLIENT_AI_AGENT || c->type == ARQ_CLIENT_SERVICE; }

static void deliver_to_channel(arq_bus_t *b, arq_channel_t *ch, const arq_client_t *skip, arq_rcbuf_t *f,
                               arq_msg_type_t type);
static void publish(arq_bus_t *b, arq_channel_t *ch, arq_client_t *c, const char *id, json_t *obj,
                    arq_msg_type_t type, bool ack);

void arq_bus_agent_activity(arq_bus_t *b, const arq_client_t *c, const char *activity, json_t *fields) {
  if (!is_agent(c) || b->quiet || (!b->dash_room[0] && !arq_bus_tel_wanted(b, ARQ_TEL_AGENT_ACTIVITY))) {
    json_decref(fields);
    return;
  }
  json_t *payload = json_pack("{s:s, s:s, s:s}", "activity", activity, "client_id", c->id, "client_type",
                              arq_client_type_name(c->type));
  if (c->screen_name)
    json_object_set_new(payload, "screen_name", json_string(c->screen_name));
  if (fields) {
    json_object_update(payload, fields);
    json_decref(fields);
  }
  json_t *ordered = tel_envelope_in(b, "agent_activity", b->dash_room, b->dash_channel, payload);
  if (arq_bus_tel_wanted(b, ARQ_TEL_AGENT_ACTIVITY))
    b->io.telemetry(b->io.ud, ARQ_TEL_AGENT_ACTIVITY, ordered);
  if (!b->dash_room[0]) {
    json_decref(ordered);
    return;
  }
  bool created;
  arq_channel_t *ch = arq_router_ensure(b, b->dash_room, b->dash_channel, &created);
  char id[40];
  snprintf(id, sizeof id, "%s", json_string_value(json_object_get(ordered, "id")));
  publish(b, ch, NULL, id, ordered, ARQ_MSG_TELEMETRY, false);
}

void arq_bus_notify(arq_bus_t *b, arq_channel_t *ch, const arq_client_t *skip, const char *event, json_t *fields) {
  json_t *payload = json_object();
  json_object_set_new(payload, "event", json_string(event));
  json_object_update(payload, fields);
  json_decref(fields);
  json_t *obj = server_envelope(b, ARQ_MSG_SYSTEM, ch->room->name, ch->name, NULL, payload, NULL);
  size_t off, len;
  arq_rcbuf_t *f = encode(b, obj, &off, &len);
  for (size_t i = 0; i < ch->nmembers; i++)
    if (ch->members[i]->client != skip)
      deliver(b, ch->members[i]->client, f, ARQ_MSG_SYSTEM);
  arq_bus_cast(b, &(arq_bus_cast_t){.kind = ARQ_CAST_NOTIFY, .room = ch->room->name, .channel = ch->name,
                                    .json = (const char *)f->data + off, .len = len});
  arq_rcbuf_unref(f);
}

void arq_bus_notify_room(arq_bus_t *b, arq_room_t *r, arq_channel_t *about, const char *event, json_t *fields) {
  json_t *payload = json_object();
  json_object_set_new(payload, "event", json_string(event));
  json_object_update(payload, fields);
  json_decref(fields);
  json_t *obj = server_envelope(b, ARQ_MSG_SYSTEM, r->name, about->name, NULL, payload, NULL);
  size_t off, len;
  arq_rcbuf_t *f = encode(b, obj, &off, &len);
  arq_bus_deliver_room(b, r, NULL, f, ARQ_MSG_SYSTEM);
  arq_bus_cast(b, &(arq_bus_cast_t){.kind = ARQ_CAST_NOTIFY_ROOM, .room = r->name,
                                    .json = (const char *)f->data + off, .len = len});
  arq_rcbuf_unref(f);
}

void arq_bus_deliver_room(arq_bus_t *b, arq_room_t *r, const arq_client_t *skip, arq_rcbuf_t *f,
                          arq_msg_type_t type) {
  b->round++;
  arq_list_t *n, *tmp;
  arq_list_foreach_safe(n, tmp, &r->channels) {
    arq_channel_t *ch = ARQ_CONTAINER_OF(n, arq_channel_t, node_room);
    for (size_t i = 0; i < ch->nmembers; i++) {
      arq_client_t *m = ch->members[i]->client;
      if (m->mark == b->round || m == skip)
        continue;
      m->mark = b->round;
      deliver(b, m, f, type);
    }
  }
}

void arq_bus_reply(arq_bus_t *b, arq_client_t *c, const arq_env_t *req, const char *command, json_t *payload) {
  arq_bus_reply_to(b, c, req->id, command, payload);
}

void arq_bus_reply_to(arq_bus_t *b, arq_client_t *c, const char *correlation_id, const char *command,
                      json_t *payload) {
  json_t *obj = server_envelope(b, ARQ_MSG_SYSTEM, NULL, NULL, command, payload, correlation_id);
  arq_bus_send_to(b, c, obj, ARQ_MSG_SYSTEM);
}

void arq_bus_error(arq_bus_t *b, arq_client_t *c, const char *correlation_id, const char *command, arq_code_t code,
                   json_t *details, const char *fmt, ...) {
  char msg[320];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  arq_utf8_repair(msg); /* quotes of what a client sent may be cut mid-character */
  json_t *payload = json_pack("{s:s, s:s}", "code", arq_code_name(code), "message", msg);
  if (details) {
    json_object_update(payload, details);
    json_decref(details);
  }
  b->st.errors[code]++;
  if (b->cmd_error == -1)
    b->cmd_error = (int)code;
  if (arq_bus_tel_wanted(b, ARQ_TEL_ERROR)) {
    json_t *t = json_pack("{s:s, s:s, s:s}", "client_id", c->id, "code", arq_code_name(code), "message", msg);
    if (correlation_id && correlation_id[0])
      json_object_set_new(t, "correlation_id", json_string(correlation_id));
    if (command)
      json_object_set_new(t, "command", json_string(command));
    arq_bus_tel(b, ARQ_TEL_ERROR, t);
  }
  json_t *obj = server_envelope(b, ARQ_MSG_ERROR, NULL, NULL, command, payload, correlation_id);
  arq_bus_send_to(b, c, obj, ARQ_MSG_ERROR);
}

static const char *const limit_names[ARQ_LIMIT_NLIMITS] = {
    "rate", "rate_close", "subscriptions", "channels", "rooms", "connections_per_ip", "origin",
    "handshakes_per_ip", "channels_created",
};

const char *arq_limit_name(arq_limit_t l) { return (unsigned)l < ARQ_LIMIT_NLIMITS ? limit_names[l] : "?"; }

void arq_bus_limit_error(arq_bus_t *b, arq_client_t *c, const char *correlation_id, const char *command,
                         arq_limit_t limit, const char *room, const char *channel) {
  const char *setting = limit == ARQ_LIMIT_SUBSCRIPTIONS ? "max_subscriptions"
                        : limit == ARQ_LIMIT_CREATED     ? "max_channels_per_client"
                        : limit == ARQ_LIMIT_ROOMS       ? "max_rooms"
                                                         : "max_channels";
  size_t max = limit == ARQ_LIMIT_SUBSCRIPTIONS ? b->o.max_subscriptions
               : limit == ARQ_LIMIT_CREATED     ? b->o.max_channels_per_client
               : limit == ARQ_LIMIT_ROOMS       ? b->o.max_rooms
                                                : b->o.max_channels;
  if (limit == ARQ_LIMIT_CREATED && c->roles == ARQ_ROLE_GUEST) {
    arq_access_deny(b, c, correlation_id, command, ARQ_DENY_ROOM,
                    "guests join channels that exist; %s:%s does not", room, channel);
    return;
  }
  b->st.limit_denials[limit]++;
  arq_bus_error(b, c, correlation_id, command, ARQ_CODE_LIMIT_EXCEEDED,
                json_pack("{s:s, s:I, s:s, s:s}", "limit", setting, "max", (json_int_t)max, "room", room, "channel",
                          channel),
                limit == ARQ_LIMIT_SUBSCRIPTIONS
                    ? "you have joined %zu channels, the most a client may (%s): %s:%s is not joined"
                : limit == ARQ_LIMIT_CREATED
                    ? "%zu channels you created still exist, the most a client may (%s): %s:%s is not created"
                : limit == ARQ_LIMIT_ROOMS
                    ? "%zu rooms exist, the most this server holds (%s): %s:%s is not created"
                    : "%zu channels exist, the most this server holds (%s): %s:%s is not created",
                max, setting, room, channel);
}

/* ---- clients ------------------------------------------------------------ */

const char *arq_client_id(const arq_client_t *c) { return c->id; }

arq_history_t *arq_bus_history_backend(const arq_bus_t *b) { return b->history; }

static void set_opt_str(json_t *o, const char *k, const char *v) {
  if (v)
    json_object_set_new(o, k, json_string(v));
}

json_t *arq_bus_client_json(const arq_client_t *c, bool with_subs) {
  char con[32], act[32];
  arq_time_iso8601(c->connected_at, con, sizeof con);
  arq_time_iso8601(c->last_activity, act, sizeof act);
  json_t *o = json_pack("{s:s, s:s}", "client_id", c->id, "client_type", arq_client_type_name(c->type));
  set_opt_str(o, "screen_name", c->screen_name);
  set_opt_str(o, "avatar", c->avatar);
  set_opt_str(o, "personality", c->personality);
  json_object_set_new(o, "connected_at", json_string(con));
  json_object_set_new(o, "last_activity", json_string(act));
  json_object_set_new(o, "messages_sent", json_integer((json_int_t)c->msgs_in));
  json_object_set_new(o, "messages_received", json_integer((json_int_t)c->msgs_out));
  if (with_subs) {
    json_t *subs = json_array();
    for (size_t i = 0; i < c->nsubs; i++)
      json_array_append_new(subs, json_string(c->subs[i]->channel->key));
    json_object_set_new(o, "subscriptions", subs);
  }
  return o;
}

static void generate_client_id(arq_bus_t *b, char *out) {
  for (;;) {
    snprintf(out, ARQ_NAME_MAX + 1, "client-%012llx",
             (unsigned long long)(mix(b->o.seed ^ mix(b->ids++)) & 0xffffffffffffULL));
    arq_client_t *other = NULL;
    HASH_FIND_STR(b->clients, out, other);
    if (!other)
      return;
  }
}

json_t *arq_bus_member_fields(const arq_bus_t *b, const arq_client_t *c, const arq_channel_t *ch) {
  json_t *f = json_pack("{s:s, s:s, s:I}", "client_id", c->id, "client_type", arq_client_type_name(c->type), "members",
                        (json_int_t)arq_bus_members_total(b, ch));
  set_opt_str(f, "screen_name", c->screen_name);
  return f;
}

static void send_welcome(arq_bus_t *b, arq_client_t *c) {
  json_t *limits = json_pack("{s:I, s:I, s:I, s:I, s:I, s:I}", "max_message_size", (json_int_t)b->o.max_message_size,
                             "max_envelope_size", (json_int_t)b->o.max_envelope_size, "history_size",
                             (json_int_t)b->o.history_size, "history_max_limit", (json_int_t)b->o.history_max_limit,
                             "max_recipients", (json_int_t)ARQ_ENV_MAX_TO, "max_malformed",
                             (json_int_t)b->o.max_malformed);
  /* The limits a client can pace itself by; absent when off. */
  const struct {
    const char *key;
    uint64_t v;
  } opt[] = {{"rate_limit_messages", b->o.rate_messages},
             {"rate_limit_bytes", b->o.rate_bytes},
             {"max_subscriptions", b->o.max_subscriptions}};
  for (size_t i = 0; i < sizeof opt / sizeof opt[0]; i++)
    if (opt[i].v)
      json_object_set_new(limits, opt[i].key, json_integer((json_int_t)opt[i].v));
  json_t *payload = json_pack("{s:s, s:s, s:s, s:s, s:s, s:I, s:b, s:o}", "event", "welcome", "client_id", c->id,
                              "client_type", arq_client_type_name(c->type), "server_version", b->o.server_version,
                              "protocol_version", "1.0", "heartbeat_interval_ms",
                              (json_int_t)b->o.heartbeat_interval_ms, "echo", c->echo, "limits", limits);
  json_t *subs = json_array();
  for (size_t i = 0; i < c->nsubs; i++)
    json_array_append_new(subs, json_string(c->subs[i]->channel->key));
  json_object_set_new(payload, "subscriptions", subs);
  json_object_set_new(payload, "roles", arq_access_roles_json(c->roles));
  if (c->expires_ms) {
    char ts[32];
    arq_time_iso8601(c->expires_ms, ts, sizeof ts);
    json_object_set_new(payload, "expires_at", json_string(ts));
  }
  arq_bus_send_to(b, c, server_envelope(b, ARQ_MSG_SYSTEM, NULL, NULL, NULL, payload, NULL), ARQ_MSG_SYSTEM);
}

static void mark_gone(arq_bus_t *b, arq_client_t *c) {
  c->gone = true;
  c->conn = NULL;
  arq_client_t *cur = NULL;
  HASH_FIND_STR(b->clients, c->id, cur);
  if (cur == c)
    HASH_DEL(b->clients, c);
  b->nclients--;
}

arq_client_t *arq_bus_connect(arq_bus_t *b, void *conn, const arq_client_params_t *p, const char *remote) {
  enter(b);
  arq_client_t *c = arq_calloc(1, sizeof *c);
  c->refs = 1;
  c->conn = conn;
  c->type = p->type;
  c->echo = p->echo;
  arq_list_init(&c->node_dead);
  snprintf(c->remote, sizeof c->remote, "%s", remote ? remote : "");
  c->screen_name = p->screen_name[0] ? arq_strdup(p->screen_name) : NULL;
  c->avatar = p->avatar[0] ? arq_strdup(p->avatar) : NULL;
  c->personality = p->personality[0] ? arq_strdup(p->personality) : NULL;
  c->connected_at = c->last_activity = arq_time_wall_ms();
  arq_rate_init(&c->rate, arq_time_mono_ns());
  if (p->client_id[0]) {
    snprintf(c->id, sizeof c->id, "%s", p->client_id);
    arq_client_t *old = NULL;
    HASH_FIND_STR(b->clients, c->id, old);
    if (old) /* The newest connection wins: a client reconnecting before the server
              * noticed its old connection die must not be locked out. The old one
              * leaves its channels now, before the new one joins any. */
      arq_bus_replaced(b, old);
  } else {
    generate_client_id(b, c->id);
  }
  c->roles = p->roles ? p->roles : arq_access_default_roles(b, c->id);
  c->rooms = p->rooms ? arq_strdup(p->rooms) : NULL;
  c->expires_ms = p->expires_ms;
  HASH_ADD_STR(b->clients, id, c);
  b->nclients++;
  b->version++;
  if (p->client_id[0]) /* a connection with this id on another node is older: it goes */
    arq_bus_cast(b, &(arq_bus_cast_t){.kind = ARQ_CAST_KICK, .client_id = c->id, .at = c->connected_at});
  if (arq_bus_tel_wanted(b, ARQ_TEL_CLIENT_CONNECTED)) {
    json_t *t = arq_bus_client_json(c, false);
    json_object_set_new(t, "remote", json_string(c->remote));
    if (p->room[0])
      json_object_set_new(t, "initial_channel", json_sprintf("%s:%s", p->room, p->channel));
    arq_bus_tel(b, ARQ_TEL_CLIENT_CONNECTED, t);
  }
  arq_bus_agent_activity(b, c, "connected", NULL);
  if (p->room[0] && !arq_bus_may_use_room(b, c->roles, c->rooms, p->room)) {
    send_welcome(b, c);
    arq_access_deny(b, c, NULL, NULL, ARQ_DENY_ROOM,
                    "room \"%s\" is not open to this client: the initial channel %s:%s was not joined", p->room,
                    p->room, p->channel);
  } else if (p->room[0]) {
    snprintf(c->init_room, sizeof c->init_room, "%s", p->room);
    snprintf(c->init_channel, sizeof c->init_channel, "%s", p->channel);
    bool created;
    arq_limit_t denied;
    arq_channel_t *ch = NULL;
    if (c->roles == ARQ_ROLE_GUEST && !arq_router_find(b, p->room, p->channel) &&
        !arq_peers_channel(b, p->room, p->channel))
      denied = ARQ_LIMIT_CREATED; /* guests join what exists: answered as forbidden */
    else
      ch = arq_router_open_by(b, c, p->room, p->channel, &created, &denied);
    if (ch) {
      arq_router_join(b, c, ch);
      send_welcome(b, c);
      arq_bus_notify(b, ch, c, "client_joined", arq_bus_member_fields(b, c, ch));
    } else {
      /* Not joined: the welcome lists no subscription, the error says why,
       * and events without a room have nowhere to go. */
      c->init_room[0] = c->init_channel[0] = '\0';
      send_welcome(b, c);
      arq_bus_limit_error(b, c, NULL, NULL, denied, p->room, p->channel);
    }
  } else {
    send_welcome(b, c);
  }
  leave(b);
  return c;
}

void arq_bus_quiesce(arq_bus_t *b) { b->quiet = true; }

void arq_bus_replaced(arq_bus_t *b, arq_client_t *c) {
  void *conn = c->conn;
  mark_gone(b, c);
  remove_client(b, c);
  b->io.close(b->io.ud, conn, 4001, "replaced by a new connection with the same client_id");
}

void arq_bus_receive_cast(arq_bus_t *b, const arq_bus_cast_t *m) {
  enter(b);
  b->casting = true;
  arq_peers_receive(b, m);
  b->casting = false;
  leave(b);
}

static void remove_client(arq_bus_t *b, arq_client_t *c) {
  b->version++;
  if (arq_bus_tel_wanted(b, ARQ_TEL_CLIENT_DISCONNECTED)) {
    json_t *t = arq_bus_client_json(c, true);
    json_object_set_new(t, "remote", json_string(c->remote));
    arq_bus_tel(b, ARQ_TEL_CLIENT_DISCONNECTED, t);
  }
  arq_bus_agent_activity(b, c, "disconnected", NULL);
  arq_router_forget_creator(c);
  while (c->nsubs > 0) {
    /* The others hear of it first: leaving may remove the channel here
     * while members on other nodes remain. */
    arq_channel_t *ch = c->subs[c->nsubs - 1]->channel;
    size_t left = arq_bus_members_total(b, ch) - 1;
    if (!b->quiet && left > 0) {
      json_t *fields = arq_bus_member_fields(b, c, ch);
      json_object_set_new(fields, "members", json_integer((json_int_t)left));
      json_object_set_new(fields, "reason", json_string("disconnected"));
      arq_bus_notify(b, ch, c, "client_left", fields);
    }
    arq_router_leave(b, c, ch);
  }
  arq_bus_client_unref(c);
}

void arq_bus_disconnect(arq_bus_t *b, arq_client_t *c) {
  if (c->gone)
    return;
  mark_gone(b, c);
  if (b->depth > 0) {
    arq_list_push_back(&b->dead, &c->node_dead);
    return;
  }
  enter(b);
  remove_client(b, c);
  leave(b);
}

/* ---- receiving and routing ---------------------------------------------- */

/* Disconnects 'c' and has the shell close its connection with 'code' and 'why'. */
static void close_client(arq_bus_t *b, arq_client_t *c, uint16_t code, const char *why) {
  void *conn = c->conn;
  arq_bus_disconnect(b, c);
  b->io.close(b->io.ud, conn, code, why);
}

static void malformed(arq_bus_t *b, arq_client_t *c, const arq_env_error_t *err) {
  b->st.received_invalid++;
  arq_bus_error(b, c, err->correlation_id, NULL, err->code, NULL, "%s", err->message);
  if (b->o.max_malformed && ++c->malformed >= b->o.max_malformed && !c->gone) {
    b->st.malformed_closes++;
    close_client(b, c, 1008, "too many malformed messages");
  }
}

/* Answers a message the rate limit refused ('verdict', admitted again in
 * 'retry_ns') and closes a client that keeps going: rate_close_after refused
 * messages within one second. The answers are bounded in turn: at most
 * rate_close_after error envelopes a second reach a client that is not
 * closed, and a client that does not read them is a slow consumer. Only
 * refused messages are parsed here, for their id, so that cost is bounded
 * the same way. */
static void rate_limited(arq_bus_t *b, arq_client_t *c, const char *data, size_t len, bool binary,
                         arq_rate_verdict_t verdict, uint64_t retry_ns, uint64_t now_ns) {
  char id[ARQ_ENV_MAX_ID + 1] = "";
  b->st.limit_denials[ARQ_LIMIT_RATE]++;
  if (!binary && len <= b->o.max_envelope_size) {
    json_t *j = json_loadb(data, len, 0, NULL);
    const char *s = json_string_value(json_object_get(j, "id"));
    if (s && arq_env_valid_id(s))
      snprintf(id, sizeof id, "%s", s);
    json_decref(j);
  }
  uint64_t retry_ms = (retry_ns + 999999) / 1000000;
  bool bytes = verdict == ARQ_RATE_BYTES;
  arq_bus_error(b, c, id, NULL, ARQ_CODE_RATE_LIMITED,
                json_pack("{s:s, s:I, s:I}", "limit", bytes ? "rate_limit_bytes" : "rate_limit_messages", "max",
                          (json_int_t)(bytes ? b->o.rate_bytes : b->o.rate_messages), "retry_after_ms",
                          (json_int_t)retry_ms),
                "over the rate limit of %llu %s per second: the message was dropped; retry after %llu ms",
                (unsigned long long)(bytes ? b->o.rate_bytes : b->o.rate_messages), bytes ? "bytes" : "messages",
                (unsigned long long)retry_ms);
  if (c->rejected == 0 || now_ns >= c->rejected_since + UINT64_C(1000000000)) {
    c->rejected_since = now_ns;
    c->rejected = 0;
  }
  if (b->o.rate_close_after && ++c->rejected >= b->o.rate_close_after && !c->gone) {
    b->st.limit_denials[ARQ_LIMIT_RATE_CLOSE]++;
    close_client(b, c, 1008, ARQ_BUS_RATE_CLOSE_REASON);
  }
}

/* Builds the envelope as delivered: the sender's fields, plus the id and
 * timestamp it left out, and 'from' always the sender. */
static json_t *outgoing(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, char *id) {
  char ts[32];
  if (e->id)
    snprintf(id, 130, "%s", e->id);
  else
    arq_bus_new_id(b, id);
  if (!e->timestamp)
    arq_time_iso8601(arq_time_wall_ms(), ts, sizeof ts);
  json_t *extra = arq_env_extra(e);
  arq_env_out_t o = {.type = e->type, .minor = e->minor, .version = e->minor ? e->version : NULL, .id = id, .room = e->room, .channel = e->channel,
                     .from = c->id, .to = e->to, .event_type = e->event_type, .payload = e->payload, .metadata = e->metadata,
                     .timestamp = e->timestamp ? e->timestamp : ts, .correlation_id = e->correlation_id,
                     .extra = extra};
  json_t *obj = arq_env_build(&o);
  json_decref(extra);
  return obj;
}

static void deliver_to_channel(arq_bus_t *b, arq_channel_t *ch, const arq_client_t *skip, arq_rcbuf_t *f,
                               arq_msg_type_t type) {
  for (size_t i = 0; i < ch->nmembers; i++) {
    arq_client_t *m = ch->members[i]->client;
    if (m != skip)
      deliver(b, m, f, type);
  }
}

/* A message for channel 'ch' ('obj' stolen, id 'id') from 'c' (NULL: the
 * server's own): stored with its position, then handed to the members; or,
 * in cluster mode, handed to the shell, which stores it and has every node
 * deliver it. 'ack': the sender asked for an acknowledgement. */
static void publish(arq_bus_t *b, arq_channel_t *ch, arq_client_t *c, const char *id, json_t *obj,
                    arq_msg_type_t type, bool ack) {
  if (b->io.append) {
    arq_bus_pub_t *p = arq_calloc(1, sizeof *p);
    snprintf(p->room, sizeof p->room, "%s", ch->room->name);
    snprintf(p->channel, sizeof p->channel, "%s", ch->name);
    snprintf(p->id, sizeof p->id, "%s", id);
    p->type = type;
    p->ack = ack;
    if (c) {
      snprintf(p->from, sizeof p->from, "%s", c->id);
      p->skip_sender = !c->echo;
      p->client = c;
      arq_bus_client_ref(c);
    }
    arq_env_dump(obj, &b->scratch);
    json_decref(obj);
    p->json = arq_strndup(b->scratch.data, b->scratch.len);
    p->len = b->scratch.len;
    ch->messages++;
    b->io.append(b->io.ud, p);
    return;
  }
  char pos[24];
  arq_rcbuf_t *f = store(b, ch, id, obj, pos);
  deliver_to_channel(b, ch, c && !c->echo ? c : NULL, f, type);
  arq_rcbuf_unref(f);
  if (ack && c)
    send_ack(b, c, id, ch->room->name, ch->name, pos);
}

static void publish_to_channel(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const char *id, json_t *obj) {
  bool created;
  arq_limit_t denied;
  arq_channel_t *ch = arq_router_open_by(b, c, e->room, e->channel, &created, &denied);
  if (!ch) {
    json_decref(obj);
    arq_bus_limit_error(b, c, e->id, NULL, denied, e->room, e->channel);
    return;
  }
  publish(b, ch, c, id, obj, e->type, e->ack);
}

void arq_bus_pub_done(arq_bus_t *b, arq_bus_pub_t *p, int status, const char *position) {
  enter(b);
  arq_client_t *c = p->client;
  if (c && !c->gone) {
    if (status == 0 && p->ack)
      send_ack(b, c, p->id, p->room, p->channel, position);
    else if (status != 0)
      arq_bus_error(b, c, p->id, NULL, ARQ_CODE_STORAGE_UNAVAILABLE,
                    json_pack("{s:s, s:s, s:s}", "room", p->room, "channel", p->channel, "id", p->id), "%s",
                    status == ARQ_ECLOSED ? "the connection to storage was lost before it confirmed the message: it "
                                            "is not acknowledged and may not have been stored"
                    : status == ARQ_EPROTO ? "storage refused the message: it was not stored"
                                           : "storage is unavailable: the message was not stored or delivered");
  }
  if (c)
    arq_bus_client_unref(c);
  arq_free(p->json);
  arq_free(p);
  leave(b);
}

void arq_bus_deliver(arq_bus_t *b, const char *room, const char *channel, arq_rcbuf_t *frame, arq_msg_type_t type,
                     const char *skip) {
  arq_channel_t *ch = arq_router_find(b, room, channel);
  if (!ch || ch->nmembers == 0)
    return;
  enter(b);
  arq_client_t *sc = NULL;
  if (skip && skip[0])
    HASH_FIND_STR(b->clients, skip, sc);
  deliver_to_channel(b, ch, sc, frame, type);
  leave(b);
}

static void route_event(arq_bus_t *b, arq_client_t *c, arq_env_t *e) {
  if (!e->room[0]) { /* the initial channel (arq_bus_receive checked there is one) */
    strcpy(e->room, c->init_room);
    strcpy(e->channel, c->init_channel);
  }
  if (!arq_access_room(b, c, e->id, NULL, e->room))
    return;
  char id[130];
  json_t *obj = outgoing(b, c, e, id);
  if (e->channel[0]) {
    publish_to_channel(b, c, e, id, obj);
  } else {
    size_t off, len;
    arq_rcbuf_t *f = encode(b, obj, &off, &len);
    arq_room_t *r = arq_router_find_room(b, e->room);
    if (r)
      arq_bus_deliver_room(b, r, c->echo ? NULL : c, f, ARQ_MSG_EVENT);
    arq_bus_cast(b, &(arq_bus_cast_t){.kind = ARQ_CAST_ROOM, .room = e->room, .json = (const char *)f->data + off,
                                      .len = len});
    arq_rcbuf_unref(f);
    if (e->ack)
      send_ack(b, c, id, e->room, NULL, NULL);
  }
}

/* Client telemetry goes to the telemetry channel (whatever room or channel
 * it names) and to the telemetry stream. */
static void route_telemetry(arq_bus_t *b, arq_client_t *c, arq_env_t *e) {
  if (b->tel_room[0] && !arq_access_room(b, c, e->id, NULL, b->tel_room))
    return; /* publishing there is publishing to that room */
  strcpy(e->room, b->tel_room);
  strcpy(e->channel, b->tel_channel);
  char id[130];
  json_t *obj = outgoing(b, c, e, id);
  if (arq_bus_tel_wanted(b, ARQ_TEL_CLIENT_TELEMETRY))
    b->io.telemetry(b->io.ud, ARQ_TEL_CLIENT_TELEMETRY, obj);
  if (b->tel_room[0]) {
    publish_to_channel(b, c, e, id, obj);
  } else {
    json_decref(obj);
    if (e->ack) /* routed to the telemetry port only: nothing is stored */
      send_ack(b, c, id, NULL, NULL, NULL);
  }
}

static void route_private(arq_bus_t *b, arq_client_t *c, arq_env_t *e) {
  size_t n = json_array_size(e->to);
  json_t *unknown = json_array();
  char id[130];
  size_t off, len;
  arq_rcbuf_t *f = encode(b, outgoing(b, c, e, id), &off, &len);
  b->round++;
  char *remote = arq_malloc(n * (ARQ_NAME_MAX + 1) + 1); /* recipients on other nodes, comma-separated */
  size_t rlen = 0;
  remote[0] = '\0';
  for (size_t i = 0; i < n; i++) {
    const char *to = json_string_value(json_array_get(e->to, i));
    arq_client_t *m = NULL;
    HASH_FIND_STR(b->clients, to, m);
    if (!m) {
      if (arq_peers_has_client(b, to))
        rlen += (size_t)sprintf(remote + rlen, "%s%s", rlen ? "," : "", to);
      else
        json_array_append_new(unknown, json_string(to));
      continue;
    }
    if (m->mark == b->round)
      continue;
    m->mark = b->round;
    deliver(b, m, f, ARQ_MSG_PRIVATE);
  }
  if (rlen)
    arq_bus_cast(b, &(arq_bus_cast_t){.kind = ARQ_CAST_PRIVATE, .to = remote, .json = (const char *)f->data + off,
                                      .len = len});
  arq_free(remote);
  arq_rcbuf_unref(f);
  if (e->ack)
    send_ack(b, c, id, NULL, NULL, NULL);
  if (json_array_size(unknown) > 0) {
    arq_bus_error(b, c, e->id, NULL, ARQ_CODE_NOT_FOUND, json_pack("{s:o}", "unknown", unknown),
                  "%zu of %zu recipients are not connected; the others got the message", json_array_size(unknown), n);
  } else {
    json_decref(unknown);
  }
}

void arq_bus_receive(arq_bus_t *b, arq_client_t *c, const char *data, size_t len, bool binary) {
  arq_bus_receive_at(b, c, data, len, binary, arq_time_mono_ns());
}

void arq_bus_receive_at(arq_bus_t *b, arq_client_t *c, const char *data, size_t len, bool binary,
                        uint64_t arrival_ns) {
  if (c->gone)
    return;
  enter(b);
  c->last_activity = arq_time_wall_ms();
  if (b->o.rate_messages | b->o.rate_bytes) {
    uint64_t retry;
    arq_rate_verdict_t v = arq_rate_admit(&c->rate, b->o.rate_messages, b->o.rate_bytes, len, arrival_ns, &retry);
    if (v != ARQ_RATE_OK) {
      rate_limited(b, c, data, len, binary, v, retry, arrival_ns);
      goto out;
    }
  }
  arq_env_error_t err = {0};
  arq_env_t e;
  if (binary) {
    err.code = ARQ_CODE_UNSUPPORTED_FRAME;
    snprintf(err.message, sizeof err.message, "binary frames are not accepted; send envelopes as text frames");
    malformed(b, c, &err);
    goto out;
  }
  if (len > b->o.max_envelope_size) {
    err.code = ARQ_CODE_PAYLOAD_TOO_LARGE;
    snprintf(err.message, sizeof err.message, "the message is %zu bytes; envelopes may be at most %llu bytes", len,
             (unsigned long long)b->o.max_envelope_size);
    malformed(b, c, &err);
    goto out;
  }
  if (arq_env_parse(&e, data, len, &err) != 0) {
    malformed(b, c, &err);
    goto out;
  }
  if (e.type == ARQ_MSG_EVENT && !e.room[0] && !c->init_room[0]) {
    err.code = ARQ_CODE_INVALID_ENVELOPE;
    snprintf(err.correlation_id, sizeof err.correlation_id, "%s", e.id ? e.id : "");
    snprintf(err.message, sizeof err.message,
             "an event needs \"room\" and \"channel\" (this connection has no initial channel)");
    arq_env_free(&e);
    malformed(b, c, &err);
    goto out;
  }
  c->malformed = 0;
  c->msgs_in++;
  char assigned[40];
  if (!e.id && e.type == ARQ_MSG_COMMAND) {
    /* Replies always carry a correlation_id; a request without an id gets
     * one, which its reply then names. */
    arq_bus_new_id(b, assigned);
    e.id = assigned;
  }
  b->st.received[e.type]++;
  if (c->roles == ARQ_ROLE_GUEST &&
      (e.type == ARQ_MSG_EVENT || e.type == ARQ_MSG_PRIVATE || e.type == ARQ_MSG_TELEMETRY)) {
    arq_access_deny(b, c, e.id, NULL, ARQ_DENY_PUBLISH, "guests may not send %s envelopes",
                    arq_msg_type_name(e.type));
    arq_env_free(&e);
    goto out;
  }
  switch (e.type) {
  case ARQ_MSG_EVENT:
    route_event(b, c, &e);
    break;
  case ARQ_MSG_PRIVATE:
    route_private(b, c, &e);
    break;
  case ARQ_MSG_COMMAND:
    arq_commands_run(b, c, &e);
    break;
  case ARQ_MSG_TELEMETRY:
    route_telemetry(b, c, &e);
    break;
  default:
    arq_bus_error(b, c, e.id, NULL, ARQ_CODE_FORBIDDEN, NULL, "clients may not send %s envelopes",
                  arq_msg_type_name(e.type));
    break;
  }
  if (e.type == ARQ_MSG_EVENT || e.type == ARQ_MSG_PRIVATE || e.type == ARQ_MSG_TELEMETRY) {
    uint64_t now = arq_time_mono_ns();
    arq_hist_observe(&b->st.routing, now > arrival_ns ? now - arrival_ns : 0);
    /* The dashboard channel is open to more clients than a protected room:
     * it does not name one. */
    bool named = e.room[0] && !arq_access_protected(b, e.room) && !c->rooms;
    if (is_agent(c) && !c->gone)
      arq_bus_agent_activity(b, c, "message_sent",
                             json_pack("{s:s, s:s*, s:s*}", "message_type", arq_msg_type_name(e.type), "room",
                                       named ? e.room : NULL, "channel", named && e.channel[0] ? e.channel : NULL));
  }
  arq_env_free(&e);
out:
  leave(b);
}

/* Closes the connections whose credential has expired (4002). */
static void close_expired(arq_bus_t *b) {
  uint64_t now = arq_time_wall_ms();
  arq_client_t *c, *tmp;
  HASH_ITER(hh, b->clients, c, tmp) {
    if (!c->expires_ms || now < c->expires_ms || c->gone)
      continue;
    void *conn = c->conn;
    b->st.expired_closes++;
    arq_bus_disconnect(b, c);
    b->io.close(b->io.ud, conn, ARQ_CLOSE_TOKEN_EXPIRED, "token expired");
  }
}

void arq_bus_tick(arq_bus_t *b, uint64_t now_ms) {
  enter(b);
  b->now_mono = now_ms;
  arq_router_sweep(b, now_ms);
  close_expired(b);
  leave(b);
}

/* ---- figures ------------------------------------------------------------ */

void arq_bus_stats(const arq_bus_t *b, arq_bus_stats_t *s) {
  *s = b->st;
  s->clients = b->nclients;
  s->rooms = HASH_COUNT(b->rooms);
  s->channels = HASH_COUNT(b->channels);
  s->history_messages = b->history->ops->total(b->history);
}

static int by_channel_key(const void *x, const void *y) {
  return strcmp((*(arq_channel_t *const *)x)->key, (*(arq_channel_t *const *)y)->key);
}

/* Rooms, each with its channels and their participant counts, sorted. */
static json_t *room_details(const arq_bus_t *b) {
  size_t n = HASH_COUNT(b->channels), k = 0;
  arq_channel_t **all = arq_calloc(n ? n : 1, sizeof *all);
  arq_channel_t *ch, *tmp;
  HASH_ITER(hh, b->channels, ch, tmp) all[k++] = ch;
  qsort(all, k, sizeof *all, by_channel_key);
  json_t *rooms = json_array(), *room = NULL, *channels = NULL;
  const arq_room_t *cur = NULL;
  for (size_t i = 0; i < k; i++) {
    if (all[i]->room != cur) {
      cur = all[i]->room;
      channels = json_array();
      room = json_pack("{s:s, s:o}", "room", cur->name, "channels", channels);
      json_array_append_new(rooms, room);
    }
    json_array_append_new(channels, json_pack("{s:s, s:I, s:b, s:I, s:I}", "channel", all[i]->name, "members",
                                              (json_int_t)all[i]->nmembers, "bootstrap", all[i]->bootstrap,
                                              "messages", (json_int_t)all[i]->messages, "history",
                                              (json_int_t)b->history->ops->count(b->history, cur->name,
                                                                                  all[i]->name)));
  }
  arq_free(all);
  return rooms;
}

/* Cluster mode: every node with its figures, and the whole bus's. */
static void add_cluster_status(const arq_bus_t *b, json_t *st) {
  char started[32];
  arq_time_iso8601(b->started_at, started, sizeof started);
  json_t *nodes = json_array();
  size_t clients = b->nclients;
  json_array_append_new(nodes, json_pack("{s:s, s:b, s:s, s:I, s:I}", "node", b->node_id, "self", 1, "started_at",
                                         started, "clients", (json_int_t)b->nclients, "channels",
                                         (json_int_t)HASH_COUNT(b->channels)));
  size_t i;
  json_t *p;
  json_array_foreach(b->peers, i, p) {
    size_t n = json_array_size(json_object_get(p, "clients"));
    clients += n;
    json_array_append_new(nodes, json_pack("{s:O, s:b, s:O, s:I, s:I}", "node", json_object_get(p, "node"), "self", 0,
                                           "started_at", json_object_get(p, "started_at"), "clients", (json_int_t)n,
                                           "channels", (json_int_t)json_array_size(json_object_get(p, "channels"))));
  }
  size_t channels = HASH_COUNT(b->channels);
  const arq_peer_chan_t *pc, *tmp;
  HASH_ITER(hh, b->peer_chans, pc, tmp) {
    if (!arq_router_find((arq_bus_t *)b, pc->room, pc->channel))
      channels++;
  }
  json_object_set_new(st, "nodes", nodes);
  json_object_set_new(st, "bus", json_pack("{s:I, s:I, s:I}", "nodes", (json_int_t)json_array_size(nodes), "clients",
                                           (json_int_t)clients, "channels", (json_int_t)channels));
}

json_t *arq_bus_status(const arq_bus_t *b) { return arq_bus_status_page(b, 0, ARQ_STATUS_DEFAULT_LIMIT); }

json_t *arq_bus_status_page(const arq_bus_t *b, size_t offset, size_t limit) {
  char started[32];
  arq_time_iso8601(b->started_at, started, sizeof started);
  arq_bus_stats_t s;
  arq_bus_stats(b, &s);
  uint64_t received = s.received_invalid, delivered = 0;
  for (int i = 0; i < ARQ_MSG_NTYPES; i++) {
    received += s.received[i];
    delivered += s.delivered[i];
  }
  if (limit > ARQ_STATUS_MAX_LIMIT)
    limit = ARQ_STATUS_MAX_LIMIT;
  json_t *by_type = json_object();
  for (int t = 0; t < ARQ_CLIENT_NTYPES; t++)
    json_object_set_new(by_type, arq_client_type_name((arq_client_type_t)t), json_integer(0));
  json_t *items = json_array();
  size_t i = 0;
  const arq_client_t *c, *tmp;
  HASH_ITER(hh, b->clients, c, tmp) { /* connection order: uthash keeps insertion order */
    const char *tn = arq_client_type_name(c->type);
    json_object_set_new(by_type, tn, json_integer(json_integer_value(json_object_get(by_type, tn)) + 1));
    if (i >= offset && i - offset < limit)
      json_array_append_new(items, arq_bus_client_json(c, true));
    i++;
  }
  json_t *server = json_pack("{s:s, s:s, s:s, s:s, s:I}", "name", "arqonbus", "version", b->o.server_version,
                             "protocol_version", "1.0", "started_at", started, "uptime_seconds",
                             (json_int_t)((arq_time_wall_ms() - b->started_at) / 1000));
  if (b->io.describe)
    b->io.describe(b->io.ud, server);
  json_t *st = json_pack("{s:o, s:{s:I, s:o, s:I, s:I, s:o}, s:I, s:I, s:o, s:{s:I, s:I}, s:{s:s, s:I, s:I}}", "server",
                   server, "clients", "total", (json_int_t)s.clients, "by_type", by_type, "offset",
                   (json_int_t)offset, "limit", (json_int_t)limit, "items", items, "rooms", (json_int_t)s.rooms,
                   "channels", (json_int_t)s.channels, "room_details", room_details(b), "messages", "received",
                   (json_int_t)received, "delivered", (json_int_t)delivered, "history", "backend",
                   b->node_id[0] ? "redis" : "memory",
                   "messages", (json_int_t)s.history_messages, "capacity_per_channel", (json_int_t)b->o.history_size);
  if (b->node_id[0])
    add_cluster_status(b, st);
  return st;
}

/* ---- history outside the bus -------------------------------------------- */

/* Lives until the backend answers, which a networked backend does later. */
typedef struct http_history {
  void (*done)(void *ud, int status, json_t *body);
  void *ud;
  char room[ARQ_NAME_MAX + 1], channel[ARQ_NAME_MAX + 1];
  char *since;
  size_t limit;
  size_t max_bytes;
} http_history_t;

static void http_history_done(void *ud, const arq_hist_result_t *res) {
  http_history_t *h = ud;
  json_t *body = res->status == 0
                     ? arq_commands_history_result(h->room, h->channel, h->limit, h->since, res, h->max_bytes)
                     : json_pack("{s:s, s:s}", "error", "internal_error", "message", "history is unavailable");
  h->done(h->ud, res->status == 0 ? 200 : 503, body);
  json_decref(body);
  arq_free(h->since);
  arq_free(h);
}

void arq_bus_history(arq_bus_t *b, const char *room, const char *channel, long long limit, const char *since,
                     void (*done)(void *ud, int status, json_t *body), void *ud) {
  char r[ARQ_NAME_MAX + 1] = "", c[ARQ_NAME_MAX + 1] = "";
  const char *problem = NULL;
  if (channel && strchr(channel, ':')) {
    if (arq_names_split(channel, r, c) != 0 || !c[0] || (room && room[0] && strcmp(room, r) != 0))
      problem = "channel must be a valid room:channel (and agree with room)";
  } else if (!room || !channel || !arq_names_valid_channel(room, strlen(room)) ||
             !arq_names_valid_channel(channel, strlen(channel))) {
    problem = "room and channel are required valid names (or channel=room:channel)";
  } else {
    snprintf(r, sizeof r, "%s", room);
    snprintf(c, sizeof c, "%s", channel);
  }
  if (!problem && limit < 0)
    problem = "limit must be a positive integer";
  if (!problem && since && !arq_env_valid_id(since) && !arq_env_valid_position(since))
    problem = "since must be a message's position or its id (arq_...)";
  if (problem) {
    json_t *body = json_pack("{s:s, s:s}", "error", "invalid_argument", "message", problem);
    done(ud, 400, body);
    json_decref(body);
    return;
  }
  size_t lim = limit == 0 ? b->o.history_default_limit : (size_t)limit;
  if (lim > b->o.history_max_limit)
    lim = b->o.history_max_limit;
  if (lim > b->o.history_size)
    lim = b->o.history_size ? b->o.history_size : 1;
  http_history_t *h = arq_calloc(1, sizeof *h);
  h->done = done;
  h->ud = ud;
  memcpy(h->room, r, sizeof r);
  memcpy(h->channel, c, sizeof c);
  h->since = since ? arq_strdup(since) : NULL;
  h->limit = lim;
  h->max_bytes = b->o.max_message_size;
  arq_hist_query_t q = {.room = h->room, .channel = h->channel, .limit = lim, .since = h->since};
  b->history->ops->query(b->history, &q, http_history_done, h);
}
