/* The built-in commands.
 *
 * Each command is a row of 'commands': its name, its handler, whether it may
 * name any room (else the room must be open to the client, access.c), its
 * help text. Which roles may run it is configuration (command_roles).
 * A handler A handler reads its arguments from the
 * envelope (room and channel, at the top level or in the payload, in either
 * the split or the "room:channel" form) and its payload, and answers with
 * exactly one reply or one error, both carrying the request's id as
 * correlation_id.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bus/bus_int.h"
#include "util/alloc.h"
#include "util/err.h"
#include "util/time.h"

typedef struct cmd cmd_t;
typedef void (*handler_t)(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd);

struct cmd {
  const char *name;
  handler_t run;
  bool any_room;
  const char *args;
  const char *help;
};

/* ---- arguments ---------------------------------------------------------- */

typedef struct target {
  char room[ARQ_NAME_MAX + 1];
  char channel[ARQ_NAME_MAX + 1];
} target_t;

/* Finds the room and channel a command names. 'need_channel': a channel is
 * required (else a room alone is fine, or nothing). Replies with the error and
 * returns false when they are missing or invalid. */
static bool target(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd, target_t *t,
                   bool need_channel) {
  strcpy(t->room, e->room);
  strcpy(t->channel, e->channel);
  json_t *p = e->payload;
  if (!t->room[0] && p && (json_object_get(p, "room") || json_object_get(p, "channel"))) {
    /* The same rules as the envelope's own fields. */
    arq_env_error_t err;
    if (arq_env_target(json_object_get(p, "room"), json_object_get(p, "channel"), t->room, t->channel, &err) != 0) {
      arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_INVALID_ARGUMENT, NULL, "%s", err.message);
      return false;
    }
  }
  if (need_channel && !t->channel[0]) {
    arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_INVALID_ARGUMENT, NULL,
                  "%s needs \"room\" and \"channel\" (or \"channel\": \"room:channel\")", cmd->name);
    return false;
  }
  return !t->room[0] || cmd->any_room || arq_access_room(b, c, e->id, cmd->name, t->room);
}

static json_t *where(const target_t *t) { return json_pack("{s:s, s:s}", "room", t->room, "channel", t->channel); }

static arq_channel_t *existing(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd,
                               const target_t *t) {
  arq_channel_t *ch = arq_router_find(b, t->room, t->channel);
  if (!ch)
    arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_NOT_FOUND, where(t), "no channel %s:%s", t->room, t->channel);
  return ch;
}

/* Finds the existing channel a command names (a channel is required);
 * replies with the error and returns NULL when there is none. */
static arq_channel_t *named_channel(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd, target_t *t) {
  if (!target(b, c, e, cmd, t, true))
    return NULL;
  return existing(b, c, e, cmd, t);
}

static json_t *channel_summary(arq_bus_t *b, const arq_channel_t *ch) {
  char created[32];
  arq_time_iso8601(ch->created_at, created, sizeof created);
  return json_pack("{s:s, s:s, s:I, s:b, s:s, s:I, s:I}", "room", ch->room->name, "channel", ch->name, "members",
                   (json_int_t)arq_bus_members_total(b, ch), "bootstrap", ch->bootstrap, "created_at", created,
                   "messages", (json_int_t)ch->messages, "history",
                   (json_int_t)b->history->ops->count(b->history, ch->room->name, ch->name));
}

/* The summary of a channel that exists on other nodes only. */
static json_t *peer_summary(arq_bus_t *b, const arq_peer_chan_t *pc) {
  json_t *info = pc->info;
  return json_pack("{s:s, s:s, s:I, s:b, s:s, s:I, s:I}", "room", pc->room, "channel", pc->channel, "members",
                   (json_int_t)json_array_size(pc->members), "bootstrap", json_is_true(json_object_get(info, "bootstrap")),
                   "created_at",
                   json_string_value(json_object_get(info, "created_at")) ? json_string_value(json_object_get(info, "created_at"))
                                                                          : "1970-01-01T00:00:00.000Z",
                   "messages", json_integer_value(json_object_get(info, "messages")), "history",
                   (json_int_t)b->history->ops->count(b->history, pc->room, pc->channel));
}

/* ---- handlers ----------------------------------------------------------- */

/* Work far beyond routing one message costs the client more of its message
 * rate, so that no client can keep the loop busy while within its rate: a
 * listing one message per LISTING_PER_MESSAGE channels it walks, a token
 * check (about half a millisecond for RS256/ES256) AUTHENTICATE_COST. */
#define LISTING_PER_MESSAGE 10
#define AUTHENTICATE_COST 100

static void charge(arq_bus_t *b, arq_client_t *c, size_t messages) {
  if (b->o.rate_messages && messages)
    arq_rate_charge(&c->rate, b->o.rate_messages, messages, arq_time_mono_ns());
}

static void cmd_status(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd) {
  json_int_t offset = 0, limit = ARQ_STATUS_DEFAULT_LIMIT;
  json_t *o = e->payload ? json_object_get(e->payload, "offset") : NULL;
  json_t *l = e->payload ? json_object_get(e->payload, "limit") : NULL;
  if ((o && (!json_is_integer(o) || json_integer_value(o) < 0)) ||
      (l && (!json_is_integer(l) || json_integer_value(l) < 1))) {
    arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_INVALID_ARGUMENT, NULL,
                  "\"offset\" must be an integer >= 0 and \"limit\" an integer >= 1 (at most %d)",
                  ARQ_STATUS_MAX_LIMIT);
    return;
  }
  if (o)
    offset = json_integer_value(o);
  if (l)
    limit = json_integer_value(l);
  json_t *s = arq_bus_status_page(b, (size_t)offset, (size_t)limit);
  json_object_set_new(s, "you", arq_bus_client_json(c, true));
  arq_bus_reply(b, c, e, cmd->name, s);
  charge(b, c, (HASH_COUNT(b->channels) + (size_t)limit) / LISTING_PER_MESSAGE);
}

static void cmd_ping(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd) {
  char ts[32];
  arq_time_iso8601(arq_time_wall_ms(), ts, sizeof ts);
  json_t *p = json_pack("{s:s}", "server_time", ts);
  if (e->payload && json_object_get(e->payload, "data"))
    json_object_set(p, "data", json_object_get(e->payload, "data"));
  arq_bus_reply(b, c, e, "pong", p);
}

static void cmd_create(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd) {
  target_t t;
  if (!target(b, c, e, cmd, &t, true))
    return;
  if (arq_router_find(b, t.room, t.channel) || arq_peers_channel(b, t.room, t.channel)) {
    arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_ALREADY_EXISTS, where(&t), "channel %s:%s already exists",
                  t.room, t.channel);
    return;
  }
  bool created;
  arq_limit_t denied;
  arq_channel_t *ch = arq_router_open(b, t.room, t.channel, &created, &denied);
  if (!ch) {
    arq_bus_limit_error(b, c, e->id, cmd->name, denied, t.room, t.channel);
    return;
  }
  /* Members of the room's other channels hear of it (once each): the new
   * channel has no members yet. */
  arq_bus_notify_room(b, ch->room, ch, "channel_created", json_pack("{s:s}", "by", c->id));
  arq_bus_reply(b, c, e, cmd->name, channel_summary(b, ch));
}

static void cmd_delete(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd) {
  target_t t;
  if (!target(b, c, e, cmd, &t, true))
    return;
  bool created;
  const arq_peer_chan_t *pc = arq_peers_channel(b, t.room, t.channel);
  arq_channel_t *ch = pc ? arq_router_ensure(b, t.room, t.channel, &created) : existing(b, c, e, cmd, &t);
  if (!ch)
    return;
  if (pc && json_is_true(json_object_get(pc->info, "bootstrap")))
    ch->bootstrap = true;
  if (ch->bootstrap) {
    arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_FORBIDDEN, where(&t),
                  "%s:%s is a bootstrap channel and cannot be deleted", t.room, t.channel);
    return;
  }
  size_t members = arq_bus_members_total(b, ch);
  arq_bus_notify(b, ch, NULL, "channel_deleted", json_pack("{s:s, s:s}", "by", c->id, "reason", "deleted"));
  arq_bus_cast(b, &(arq_bus_cast_t){.kind = ARQ_CAST_DELETE, .room = t.room, .channel = t.channel});
  arq_router_remove(b, ch);
  json_t *r = where(&t);
  json_object_set_new(r, "deleted", json_true());
  json_object_set_new(r, "removed_members", json_integer((json_int_t)members));
  arq_bus_reply(b, c, e, cmd->name, r);
}

static void cmd_join(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd) {
  target_t t;
  if (!target(b, c, e, cmd, &t, true))
    return;
  bool created;
  arq_limit_t denied;
  arq_channel_t *ch = arq_router_find(b, t.room, t.channel);
  if (b->o.max_subscriptions && c->nsubs >= b->o.max_subscriptions && !(ch && arq_router_sub(c, ch))) {
    arq_bus_limit_error(b, c, e->id, cmd->name, ARQ_LIMIT_SUBSCRIPTIONS, t.room, t.channel);
    return;
  }
  if (!ch && c->roles == ARQ_ROLE_GUEST && !arq_peers_channel(b, t.room, t.channel)) {
    arq_access_deny(b, c, e->id, cmd->name, ARQ_DENY_ROOM, "guests join channels that exist; %s:%s does not",
                    t.room, t.channel);
    return;
  }
  ch = arq_router_open_by(b, c, t.room, t.channel, &created, &denied);
  if (!ch) {
    arq_bus_limit_error(b, c, e->id, cmd->name, denied, t.room, t.channel);
    return;
  }
  bool joined = arq_router_join(b, c, ch);
  if (joined)
    arq_bus_notify(b, ch, c, "client_joined", arq_bus_member_fields(b, c, ch));
  json_t *r = channel_summary(b, ch);
  json_object_set_new(r, "joined", json_boolean(joined));
  json_object_set_new(r, "created", json_boolean(created && !arq_peers_channel(b, t.room, t.channel)));
  arq_bus_reply(b, c, e, cmd->name, r);
}

/* Takes 'c' out of 'ch', telling the other members why ('reason'). Returns
 * how many members remain on every node. 'ch' may be gone afterwards. */
static size_t leave_channel(arq_bus_t *b, arq_client_t *c, arq_channel_t *ch, const char *reason) {
  /* The others hear of it first: leaving may remove the channel here while
   * members on other nodes remain. */
  size_t left = arq_bus_members_total(b, ch) - 1;
  if (left > 0) {
    json_t *fields = arq_bus_member_fields(b, c, ch);
    json_object_set_new(fields, "members", json_integer((json_int_t)left));
    json_object_set_new(fields, "reason", json_string(reason));
    arq_bus_notify(b, ch, c, "client_left", fields);
  }
  arq_router_leave(b, c, ch);
  return left;
}

static void cmd_leave(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd) {
  target_t t;
  arq_channel_t *ch = named_channel(b, c, e, cmd, &t);
  if (!ch)
    return;
  if (!arq_router_sub(c, ch)) {
    arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_NOT_FOUND, where(&t), "you are not a member of %s:%s", t.room,
                  t.channel);
    return;
  }
  size_t left = leave_channel(b, c, ch, "left"); /* may remove the channel: 'ch' is not used after */
  json_t *r = where(&t);
  json_object_set_new(r, "left", json_true());
  json_object_set_new(r, "members", json_integer((json_int_t)left));
  arq_bus_reply(b, c, e, cmd->name, r);
}

/* One row of list_channels: a channel of this node, or one that exists on
 * other nodes only. */
typedef struct listed {
  const char *key;
  arq_channel_t *ch;
  const arq_peer_chan_t *pc;
} listed_t;

static int by_listed_key(const void *a, const void *b) {
  return strcmp(((const listed_t *)a)->key, ((const listed_t *)b)->key);
}

static void cmd_list(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd) {
  target_t t;
  if (!target(b, c, e, cmd, &t, false))
    return;
  size_t n = HASH_COUNT(b->channels) + HASH_COUNT(b->peer_chans), k = 0;
  listed_t *all = arq_calloc(n ? n : 1, sizeof *all);
  arq_channel_t *ch, *tmp;
  /* Channels of rooms this client may not use are not listed. */
  HASH_ITER(hh, b->channels, ch, tmp) {
    if ((!t.room[0] || strcmp(ch->room->name, t.room) == 0) &&
        arq_bus_may_use_room(b, c->roles, c->rooms, ch->room->name))
      all[k++] = (listed_t){.key = ch->key, .ch = ch};
  }
  const arq_peer_chan_t *pc, *ptmp;
  HASH_ITER(hh, b->peer_chans, pc, ptmp) {
    if ((!t.room[0] || strcmp(pc->room, t.room) == 0) && !arq_router_find(b, pc->room, pc->channel) &&
        arq_bus_may_use_room(b, c->roles, c->rooms, pc->room))
      all[k++] = (listed_t){.key = pc->key, .pc = pc};
  }
  qsort(all, k, sizeof *all, by_listed_key);
  json_t *list = json_array();
  for (size_t i = 0; i < k; i++)
    json_array_append_new(list, all[i].ch ? channel_summary(b, all[i].ch) : peer_summary(b, all[i].pc));
  arq_free(all);
  json_t *r = json_pack("{s:o, s:I}", "channels", list, "count", (json_int_t)k);
  if (t.room[0])
    json_object_set_new(r, "room", json_string(t.room));
  arq_bus_reply(b, c, e, cmd->name, r);
  charge(b, c, n / LISTING_PER_MESSAGE);
}

static void cmd_info(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd) {
  target_t t;
  if (!target(b, c, e, cmd, &t, true))
    return;
  const arq_peer_chan_t *pc = arq_peers_channel(b, t.room, t.channel);
  arq_channel_t *ch = pc ? arq_router_find(b, t.room, t.channel) : existing(b, c, e, cmd, &t);
  if (!ch && !pc)
    return;
  json_t *r = ch ? channel_summary(b, ch) : peer_summary(b, pc);
  json_t *members = json_array();
  if (pc)
    json_array_extend(members, pc->members);
  for (size_t i = 0; ch && i < ch->nmembers; i++) {
    const arq_client_t *m = ch->members[i]->client;
    json_t *mj = json_pack("{s:s, s:s}", "client_id", m->id, "client_type", arq_client_type_name(m->type));
    if (m->screen_name)
      json_object_set_new(mj, "screen_name", json_string(m->screen_name));
    json_array_append_new(members, mj);
  }
  json_object_set_new(r, "member_list", members);
  json_object_set_new(r, "history_capacity", json_integer((json_int_t)b->o.history_size));
  arq_bus_reply(b, c, e, cmd->name, r);
}

/* A history request in flight. A networked backend answers after the
 * request's envelope is gone, so what the reply needs is copied here and the
 * client is kept alive by a reference (it may have left meanwhile). */
typedef struct history_call {
  arq_bus_t *b;
  arq_client_t *c;
  char id[ARQ_ENV_MAX_ID + 1];
  char since[ARQ_ENV_MAX_ID + 1];
  const char *name;
  target_t t;
  size_t limit;
} history_call_t;

json_t *arq_commands_history_result(const char *room, const char *channel, size_t limit, const char *since,
                                    const arq_hist_result_t *res, size_t max_bytes) {
  /* One reply holds at most 'max_bytes' of messages (at least one): a
   * history of large messages is read in several requests, and no request
   * makes the loop parse hundreds of megabytes. After 'since' the oldest are
   * kept (ask again from the last one); without it the newest are. */
  size_t first = 0, end = res->count, total = 0;
  bool cut = false;
  if (since) {
    for (size_t i = 0; i < res->count; i++) {
      total += res->items[i]->len;
      if (i > 0 && total > max_bytes) {
        end = i;
        cut = true;
        break;
      }
    }
  } else {
    for (size_t i = res->count; i-- > 0;) {
      total += res->items[i]->len;
      if (i + 1 < res->count && total > max_bytes) {
        first = i + 1;
        cut = true;
        break;
      }
    }
  }
  json_t *msgs = json_array();
  for (size_t i = first; i < end; i++) {
    const arq_hist_item_t *it = res->items[i];
    json_t *m = json_loadb((const char *)it->frame->data + it->off, it->len, JSON_ALLOW_NUL, NULL);
    if (m)
      json_array_append_new(msgs, m);
  }
  json_t *r = json_pack("{s:s, s:s, s:o, s:I, s:I, s:b}", "room", room, "channel", channel, "messages", msgs, "count",
                        (json_int_t)(end - first), "limit", (json_int_t)limit, "more", res->more || cut);
  if (since) {
    json_object_set_new(r, "since", json_string(since));
    json_object_set_new(r, "gap", json_boolean(!res->since_found));
  }
  return r;
}

static void history_done(void *ud, const arq_hist_result_t *res) {
  history_call_t *h = ud;
  if (!h->c->gone && res->status != 0)
    arq_bus_error(h->b, h->c, h->id, h->name, ARQ_CODE_INTERNAL, NULL, "history is unavailable");
  else if (!h->c->gone)
    arq_bus_reply_to(h->b, h->c, h->id, h->name,
                     arq_commands_history_result(h->t.room, h->t.channel, h->limit, h->since[0] ? h->since : NULL,
                                                 res, h->b->o.max_message_size));
  arq_bus_client_unref(h->c);
  arq_free(h);
}

static void cmd_history(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd) {
  history_call_t h = {.b = b, .c = c, .name = cmd->name, .limit = b->o.history_default_limit};
  if (!target(b, c, e, cmd, &h.t, true))
    return;
  json_t *p = e->payload;
  json_t *lim = p ? json_object_get(p, "limit") : NULL;
  json_t *since = p ? json_object_get(p, "since") : NULL;
  if (lim) {
    if (!json_is_integer(lim) || json_integer_value(lim) < 1) {
      arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_INVALID_ARGUMENT, NULL,
                    "\"limit\" must be a positive integer (at most %zu)", b->o.history_max_limit);
      return;
    }
    json_int_t v = json_integer_value(lim);
    h.limit = (uint64_t)v > b->o.history_max_limit ? b->o.history_max_limit : (size_t)v;
  }
  if (since && (!json_is_string(since) || (!arq_env_valid_id(json_string_value(since)) &&
                                           !arq_env_valid_position(json_string_value(since))))) {
    arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_INVALID_ARGUMENT, NULL,
                  "\"since\" must be a message's position or its id (\"arq_...\")");
    return;
  }
  if (h.limit > b->o.history_max_limit)
    h.limit = b->o.history_max_limit;
  if (h.limit > b->o.history_size)
    h.limit = b->o.history_size ? b->o.history_size : 1;
  history_call_t *call = arq_malloc(sizeof *call);
  *call = h;
  snprintf(call->id, sizeof call->id, "%s", e->id ? e->id : "");
  snprintf(call->since, sizeof call->since, "%s", since ? json_string_value(since) : "");
  arq_bus_client_ref(c);
  arq_hist_query_t q = {.room = call->t.room, .channel = call->t.channel, .limit = call->limit,
                        .since = call->since[0] ? call->since : NULL};
  b->history->ops->query(b->history, &q, history_done, call);
}

/* A fresh credential for this connection: the same client id, maybe other
 * roles, rooms and expiry. Channels it no longer opens are left. */
static void cmd_authenticate(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd) {
  json_t *tok = e->payload ? json_object_get(e->payload, "token") : NULL;
  if (!b->o.auth || arq_auth_mode(b->o.auth) == ARQ_AUTH_NONE) {
    arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_INVALID_ARGUMENT, NULL, "authentication is off on this server");
    return;
  }
  if (!json_is_string(tok)) {
    arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_INVALID_ARGUMENT, NULL,
                  "authenticate needs \"token\": the new API key or token");
    return;
  }
  arq_identity_t id;
  char why[200];
  uint64_t now = arq_time_wall_ms();
  charge(b, c, AUTHENTICATE_COST);
  int rc = arq_auth_verify(b->o.auth, json_string_value(tok), json_string_length(tok), now, &id, why, sizeof why);
  if (rc == 0 && id.expires_ms && id.expires_ms <= now) {
    /* Within the leeway, but the connection would be closed at once. */
    arq_identity_clear(&id);
    snprintf(why, sizeof why, "the token has expired");
    rc = ARQ_EACCES;
  }
  if (rc != 0) {
    b->st.auth_inband[1]++;
    arq_bus_error(b, c, e->id, cmd->name, ARQ_CODE_UNAUTHORIZED, NULL, "%s; the current credential still holds",
                  why);
    return;
  }
  b->st.auth_inband[0]++;
  if (strcmp(id.client_id, c->id) != 0) {
    arq_access_deny(b, c, e->id, cmd->name, ARQ_DENY_AUTHENTICATE,
                    "the credential is for client \"%s\", not for this connection's \"%s\"", id.client_id, c->id);
    arq_identity_clear(&id);
    return;
  }
  c->roles = id.roles;
  arq_free(c->rooms);
  c->rooms = id.rooms;
  id.rooms = NULL;
  c->expires_ms = id.expires_ms;
  json_t *left = json_array();
  for (size_t i = c->nsubs; i-- > 0;) {
    arq_channel_t *ch = c->subs[i]->channel;
    if (arq_bus_may_use_room(b, c->roles, c->rooms, ch->room->name))
      continue;
    json_array_append_new(left, json_string(ch->key));
    leave_channel(b, c, ch, "access_revoked");
  }
  json_t *r = json_pack("{s:s, s:o, s:o}", "client_id", c->id, "roles", arq_access_roles_json(c->roles), "left", left);
  if (c->expires_ms) {
    char ts[32];
    arq_time_iso8601(c->expires_ms, ts, sizeof ts);
    json_object_set_new(r, "expires_at", json_string(ts));
  }
  arq_bus_reply(b, c, e, cmd->name, r);
}

static void cmd_help(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd);

static const cmd_t commands[] = {
    {"status", cmd_status, false, "[offset], [limit]",
     "server figures, rooms and channels, clients (paged: offset, limit), and your own connection"},
    {"create_channel", cmd_create, false, "room, channel", "create a channel (by default admins only: command_roles)"},
    {"delete_channel", cmd_delete, false, "room, channel",
     "delete a channel: its members are told and removed, its history dropped (by default admins only)"},
    {"join_channel", cmd_join, false, "room, channel", "subscribe to a channel, creating it if needed"},
    {"leave_channel", cmd_leave, true, "room, channel", "unsubscribe from a channel"},
    {"list_channels", cmd_list, false, "[room]", "list channels, optionally of one room"},
    {"channel_info", cmd_info, false, "room, channel", "a channel's members, message count and history size"},
    {"ping", cmd_ping, false, "[data]", "answered by pong with the server time (and your data)"},
    {"history", cmd_history, false, "room, channel, [limit], [since]",
     "the last 'limit' messages (default 50), or those after the message id 'since'"},
    {"help", cmd_help, false, "", "this list"},
    {"authenticate", cmd_authenticate, false, "token",
     "present a fresh API key or token for this connection before the current one expires"},
};

#define NCOMMANDS (sizeof commands / sizeof commands[0])
_Static_assert(NCOMMANDS <= sizeof(((arq_bus_stats_t *)0)->commands) / sizeof(arq_hist_t),
               "arq_bus_stats_t.commands is too small");

static void cmd_help(arq_bus_t *b, arq_client_t *c, const arq_env_t *e, const cmd_t *cmd) {
  json_t *list = json_array();
  for (size_t i = 0; i < NCOMMANDS; i++)
    json_array_append_new(list, json_pack("{s:s, s:s, s:s, s:b, s:o}", "name", commands[i].name, "arguments",
                                          commands[i].args, "description", commands[i].help, "privileged",
                                          arq_access_command_roles(b, i) != ARQ_ROLES_ALL, "roles",
                                          arq_access_roles_json(arq_access_command_roles(b, i))));
  arq_bus_reply(b, c, e, cmd->name, json_pack("{s:o}", "commands", list));
}

const char *arq_bus_command_name(size_t i) { return i < NCOMMANDS ? commands[i].name : NULL; }

void arq_commands_run(arq_bus_t *b, arq_client_t *c, const arq_env_t *e) {
  for (size_t i = 0; i < NCOMMANDS; i++) {
    const cmd_t *cmd = &commands[i];
    if (strcmp(cmd->name, e->command) != 0)
      continue;
    uint64_t t0 = arq_time_mono_ns();
    b->cmd_error = -1;
    if (!(c->roles & arq_access_command_roles(b, i)))
      arq_access_deny(b, c, e->id, cmd->name, ARQ_DENY_COMMAND, "%s is not open to your roles", cmd->name);
    else
      cmd->run(b, c, e, cmd);
    uint64_t ns = arq_time_mono_ns() - t0;
    arq_hist_observe(&b->st.commands[i], ns);
    const char *result = b->cmd_error < 0 ? "ok" : arq_code_name((arq_code_t)b->cmd_error);
    b->cmd_error = -1;
    if (arq_bus_tel_wanted(b, ARQ_TEL_COMMAND_EXECUTED))
      arq_bus_tel(b, ARQ_TEL_COMMAND_EXECUTED,
                  json_pack("{s:s, s:s, s:f, s:s}", "command", cmd->name, "client_id", c->id, "duration_ms",
                            (double)ns / 1e6, "result", result));
    if (!c->gone)
      arq_bus_agent_activity(b, c, "command_run", json_pack("{s:s, s:s}", "command", cmd->name, "result", result));
    return;
  }
  arq_bus_error(b, c, e->id, e->command, ARQ_CODE_UNKNOWN_COMMAND, NULL,
                "unknown command \"%.32s\"; send {\"type\":\"command\",\"command\":\"help\"} for the list", e->command);
}
