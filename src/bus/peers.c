/* The other nodes of a cluster, as the bus sees them.
 *
 * Nodes tell each other two things through the shell (which carries them
 * over Redis): casts, the messages that are not stored in a channel's stream
 * (room-wide events, private messages, notifications, deletions, a client id
 * taken over), and snapshots, what each node has (its clients, their
 * channels, its channels), refreshed every second. The snapshots of the live
 * nodes are indexed here so that list_channels, channel_info, status and
 * private messages cover the whole bus. No I/O: the shell moves the bytes.
 */
#include <stdio.h>
#include <string.h>

#include "bus/bus_int.h"
#include "util/alloc.h"
#include "util/time.h"

static const char *const cast_names[ARQ_CAST_NKINDS] = {"room", "private", "notify", "notify_room", "delete", "kick"};

const char *arq_cast_name(arq_cast_kind_t k) { return (unsigned)k < ARQ_CAST_NKINDS ? cast_names[k] : NULL; }

int arq_cast_parse(const char *s) {
  for (int i = 0; i < ARQ_CAST_NKINDS; i++)
    if (strcmp(cast_names[i], s) == 0)
      return i;
  return -1;
}

void arq_bus_cast(arq_bus_t *b, const arq_bus_cast_t *m) {
  if (b->io.cast && !b->casting)
    b->io.cast(b->io.ud, m);
}

/* ---- snapshots ------------------------------------------------------------ */

json_t *arq_bus_snapshot(const arq_bus_t *b) {
  char started[32];
  arq_time_iso8601(b->started_at, started, sizeof started);
  json_t *clients = json_array();
  const arq_client_t *c, *ctmp;
  HASH_ITER(hh, b->clients, c, ctmp) {
    json_t *subs = json_array();
    for (size_t i = 0; i < c->nsubs; i++)
      json_array_append_new(subs, json_string(c->subs[i]->channel->key));
    json_t *cj = json_pack("{s:s, s:s, s:o}", "client_id", c->id, "client_type", arq_client_type_name(c->type),
                           "channels", subs);
    if (c->screen_name)
      json_object_set_new(cj, "screen_name", json_string(c->screen_name));
    json_array_append_new(clients, cj);
  }
  json_t *channels = json_array();
  const arq_channel_t *ch, *tmp;
  HASH_ITER(hh, b->channels, ch, tmp) {
    char created[32];
    arq_time_iso8601(ch->created_at, created, sizeof created);
    json_array_append_new(channels, json_pack("{s:s, s:s, s:b, s:s, s:I}", "room", ch->room->name, "channel",
                                              ch->name, "bootstrap", ch->bootstrap, "created_at", created,
                                              "messages", (json_int_t)ch->messages));
  }
  return json_pack("{s:s, s:s, s:o, s:o}", "node", b->node_id, "started_at", started, "clients", clients, "channels",
                   channels);
}

uint64_t arq_bus_snapshot_version(const arq_bus_t *b) { return b->version; }

void arq_peers_free(arq_bus_t *b) {
  arq_peer_chan_t *pc, *ptmp;
  HASH_ITER(hh, b->peer_chans, pc, ptmp) {
    HASH_DEL(b->peer_chans, pc);
    json_decref(pc->members);
    json_decref(pc->info);
    arq_free(pc);
  }
  arq_peer_client_t *cl, *ctmp;
  HASH_ITER(hh, b->peer_clients, cl, ctmp) {
    HASH_DEL(b->peer_clients, cl);
    arq_free(cl);
  }
  json_decref(b->peers);
  b->peers = NULL;
}

static arq_peer_chan_t *peer_chan(arq_bus_t *b, const char *key) {
  arq_peer_chan_t *pc = NULL;
  HASH_FIND_STR(b->peer_chans, key, pc);
  if (pc)
    return pc;
  pc = arq_calloc(1, sizeof *pc);
  snprintf(pc->key, sizeof pc->key, "%s", key);
  if (arq_names_split(key, pc->room, pc->channel) != 0 || !pc->channel[0]) {
    arq_free(pc);
    return NULL;
  }
  pc->members = json_array();
  HASH_ADD_STR(b->peer_chans, key, pc);
  return pc;
}

void arq_bus_set_peers(arq_bus_t *b, json_t *peers) {
  arq_peers_free(b);
  b->peers = json_is_array(peers) ? peers : json_array();
  if (b->peers != peers)
    json_decref(peers);
  size_t i;
  json_t *node;
  json_array_foreach(b->peers, i, node) {
    size_t k;
    json_t *v;
    json_array_foreach(json_object_get(node, "channels"), k, v) {
      const char *room = json_string_value(json_object_get(v, "room"));
      const char *channel = json_string_value(json_object_get(v, "channel"));
      if (!room || !channel)
        continue;
      char key[2 * ARQ_NAME_MAX + 2];
      snprintf(key, sizeof key, "%s:%s", room, channel);
      arq_peer_chan_t *pc = peer_chan(b, key);
      if (pc && !pc->info)
        pc->info = json_incref(v);
    }
    json_array_foreach(json_object_get(node, "clients"), k, v) {
      const char *id = json_string_value(json_object_get(v, "client_id"));
      if (!id || !arq_names_valid_client_id(id, strlen(id)))
        continue;
      arq_peer_client_t *pcl = NULL;
      HASH_FIND_STR(b->peer_clients, id, pcl);
      if (!pcl) {
        pcl = arq_calloc(1, sizeof *pcl);
        snprintf(pcl->id, sizeof pcl->id, "%s", id);
        HASH_ADD_STR(b->peer_clients, id, pcl);
      }
      size_t j;
      json_t *key;
      json_array_foreach(json_object_get(v, "channels"), j, key) {
        if (!json_is_string(key))
          continue;
        arq_peer_chan_t *pc = peer_chan(b, json_string_value(key));
        if (!pc)
          continue;
        json_t *m = json_pack("{s:s, s:O}", "client_id", id, "client_type",
                              json_object_get(v, "client_type") ? json_object_get(v, "client_type") : json_null());
        if (json_object_get(v, "screen_name"))
          json_object_set(m, "screen_name", json_object_get(v, "screen_name"));
        json_array_append_new(pc->members, m);
      }
    }
  }
}

const arq_peer_chan_t *arq_peers_channel(const arq_bus_t *b, const char *room, const char *channel) {
  char key[2 * ARQ_NAME_MAX + 2];
  snprintf(key, sizeof key, "%s:%s", room, channel);
  arq_peer_chan_t *pc = NULL;
  HASH_FIND_STR(b->peer_chans, key, pc);
  return pc;
}

size_t arq_bus_members_total(const arq_bus_t *b, const arq_channel_t *ch) {
  const arq_peer_chan_t *pc = arq_peers_channel(b, ch->room->name, ch->name);
  return ch->nmembers + (pc ? json_array_size(pc->members) : 0);
}

bool arq_peers_has_client(const arq_bus_t *b, const char *id) {
  arq_peer_client_t *pc = NULL;
  HASH_FIND_STR(b->peer_clients, id, pc);
  return pc != NULL;
}

/* ---- casts from other nodes ------------------------------------------------- */

static void deliver_text(arq_bus_t *b, const arq_bus_cast_t *m, arq_msg_type_t type) {
  size_t off, len;
  arq_rcbuf_t *f = arq_env_frame_text(m->json, m->len, NULL, &off, &len);
  if (m->kind == ARQ_CAST_PRIVATE) {
    b->round++;
    const char *p = m->to;
    while (*p) {
      size_t n = strcspn(p, ",");
      char id[ARQ_NAME_MAX + 1];
      if (n < sizeof id) {
        memcpy(id, p, n);
        id[n] = '\0';
        arq_client_t *c = NULL;
        HASH_FIND_STR(b->clients, id, c);
        if (c && c->mark != b->round) {
          c->mark = b->round;
          arq_bus_deliver_to(b, c, f, type);
        }
      }
      p += n + (p[n] == ',');
    }
  } else if (m->kind == ARQ_CAST_NOTIFY) {
    arq_channel_t *ch = arq_router_find(b, m->room, m->channel);
    if (ch) {
      for (size_t i = 0; i < ch->nmembers; i++)
        arq_bus_deliver_to(b, ch->members[i]->client, f, type);
    }
  } else {
    arq_room_t *r = arq_router_find_room(b, m->room);
    if (r)
      arq_bus_deliver_room(b, r, NULL, f, type);
  }
  arq_rcbuf_unref(f);
}

void arq_peers_receive(arq_bus_t *b, const arq_bus_cast_t *m) {
  switch (m->kind) {
  case ARQ_CAST_ROOM:
    if (m->json)
      deliver_text(b, m, ARQ_MSG_EVENT);
    break;
  case ARQ_CAST_PRIVATE:
    if (m->json && m->to)
      deliver_text(b, m, ARQ_MSG_PRIVATE);
    break;
  case ARQ_CAST_NOTIFY:
  case ARQ_CAST_NOTIFY_ROOM:
    if (m->json)
      deliver_text(b, m, ARQ_MSG_SYSTEM);
    break;
  case ARQ_CAST_DELETE: {
    arq_channel_t *ch = arq_router_find(b, m->room, m->channel);
    if (ch && !ch->bootstrap)
      arq_router_remove(b, ch); /* its members heard channel_deleted from the notify before */
    break;
  }
  case ARQ_CAST_KICK: {
    arq_client_t *c = NULL;
    HASH_FIND_STR(b->clients, m->client_id, c);
    if (c && !c->gone && c->connected_at <= m->at)
      arq_bus_replaced(b, c);
    break;
  }
  default:
    break;
  }
}
