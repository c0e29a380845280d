/* Rooms, channels and memberships.
 *
 * A channel keeps an array of its members' subscriptions and each
 * subscription remembers its index, so joining and leaving are O(1) and
 * delivering walks one contiguous array. Rooms are groups of channels that
 * exist while they have a channel. A channel that loses its last member is
 * kept for the channel ttl (so that a client reconnecting within it still
 * finds its history), then removed by the sweep; bootstrap channels are never
 * removed.
 */
#include <stdio.h>
#include <string.h>

#include "bus/bus_int.h"
#include "util/alloc.h"
#include "util/time.h"

static void channel_key(char *key, const char *room, const char *channel) {
  snprintf(key, 2 * ARQ_NAME_MAX + 2, "%s:%s", room, channel);
}

arq_channel_t *arq_router_find(arq_bus_t *b, const char *room, const char *channel) {
  char key[2 * ARQ_NAME_MAX + 2];
  channel_key(key, room, channel);
  arq_channel_t *ch = NULL;
  HASH_FIND_STR(b->channels, key, ch);
  return ch;
}

arq_room_t *arq_router_find_room(arq_bus_t *b, const char *room) {
  arq_room_t *r = NULL;
  HASH_FIND_STR(b->rooms, room, r);
  return r;
}

arq_channel_t *arq_router_ensure(arq_bus_t *b, const char *room, const char *channel, bool *created) {
  arq_channel_t *ch = arq_router_find(b, room, channel);
  *created = ch == NULL;
  if (ch)
    return ch;
  arq_room_t *r = arq_router_find_room(b, room);
  if (!r) {
    r = arq_calloc(1, sizeof *r);
    snprintf(r->name, sizeof r->name, "%s", room);
    arq_list_init(&r->channels);
    HASH_ADD_STR(b->rooms, name, r);
  }
  ch = arq_calloc(1, sizeof *ch);
  channel_key(ch->key, room, channel);
  snprintf(ch->name, sizeof ch->name, "%s", channel);
  ch->room = r;
  ch->created_at = arq_time_wall_ms();
  ch->empty = true;
  ch->empty_since = b->now_mono;
  arq_list_push_back(&r->channels, &ch->node_room);
  r->nchannels++;
  HASH_ADD_STR(b->channels, key, ch);
  b->version++;
  arq_bus_tel_channel(b, ARQ_TEL_CHANNEL_CREATED, ch);
  return ch;
}

arq_channel_t *arq_router_open(arq_bus_t *b, const char *room, const char *channel, bool *created,
                               arq_limit_t *denied) {
  arq_channel_t *ch = arq_router_find(b, room, channel);
  if (!ch) {
    if (b->o.max_channels && HASH_COUNT(b->channels) >= b->o.max_channels) {
      *denied = ARQ_LIMIT_CHANNELS;
      return NULL;
    }
    if (b->o.max_rooms && HASH_COUNT(b->rooms) >= b->o.max_rooms && !arq_router_find_room(b, room)) {
      *denied = ARQ_LIMIT_ROOMS;
      return NULL;
    }
  }
  return arq_router_ensure(b, room, channel, created);
}

static void drop_sub(arq_sub_t *s) {
  arq_client_t *c = s->client;
  for (size_t i = 0; i < c->nsubs; i++) {
    if (c->subs[i] == s) {
      c->subs[i] = c->subs[--c->nsubs];
      break;
    }
  }
  arq_free(s);
}

arq_channel_t *arq_router_open_by(arq_bus_t *b, arq_client_t *by, const char *room, const char *channel,
                                  bool *created, arq_limit_t *denied) {
  *created = false;
  if (b->o.max_channels_per_client && by->ncreated >= b->o.max_channels_per_client &&
      !arq_router_find(b, room, channel)) {
    *denied = ARQ_LIMIT_CREATED;
    return NULL;
  }
  arq_channel_t *ch = arq_router_open(b, room, channel, created, denied);
  if (ch && *created) {
    if (by->ncreated == by->createdcap) {
      by->createdcap = by->createdcap ? 2 * by->createdcap : 4;
      by->created = arq_realloc(by->created, by->createdcap * sizeof *by->created);
    }
    by->created[by->ncreated++] = ch;
    ch->creator = by;
  }
  return ch;
}

/* Takes 'ch' off its creator's list (swap with the last). */
void arq_router_forget_created(arq_channel_t *ch) {
  arq_client_t *c = ch->creator;
  for (size_t i = 0; i < c->ncreated; i++) {
    if (c->created[i] == ch) {
      c->created[i] = c->created[--c->ncreated];
      break;
    }
  }
  ch->creator = NULL;
}

void arq_router_forget_creator(arq_client_t *c) {
  for (size_t i = 0; i < c->ncreated; i++)
    c->created[i]->creator = NULL;
  arq_free(c->created);
  c->created = NULL;
  c->ncreated = c->createdcap = 0;
}

void arq_router_remove(arq_bus_t *b, arq_channel_t *ch) {
  b->version++;
  if (ch->creator)
    arq_router_forget_created(ch);
  arq_bus_tel_channel(b, ARQ_TEL_CHANNEL_DELETED, ch);
  if (ch->nmembers > 0 && b->io.interest)
    b->io.interest(b->io.ud, ch->room->name, ch->name, false);
  for (size_t i = 0; i < ch->nmembers; i++)
    drop_sub(ch->members[i]);
  arq_free(ch->members);
  b->history->ops->drop(b->history, ch->room->name, ch->name);
  arq_room_t *r = ch->room;
  arq_list_remove(&ch->node_room);
  HASH_DEL(b->channels, ch);
  arq_free(ch);
  if (--r->nchannels == 0) {
    HASH_DEL(b->rooms, r);
    arq_free(r);
  }
}

arq_sub_t *arq_router_sub(const arq_client_t *c, const arq_channel_t *ch) {
  for (size_t i = 0; i < c->nsubs; i++)
    if (c->subs[i]->channel == ch)
      return c->subs[i];
  return NULL;
}

bool arq_router_join(arq_bus_t *b, arq_client_t *c, arq_channel_t *ch) {
  if (arq_router_sub(c, ch))
    return false;
  if (ch->creator && ch->creator != c) /* used by others: no longer its creator's alone */
    arq_router_forget_created(ch);
  arq_sub_t *s = arq_malloc(sizeof *s);
  s->client = c;
  s->channel = ch;
  if (ch->nmembers == ch->cap) {
    ch->cap = ch->cap ? 2 * ch->cap : 4;
    ch->members = arq_realloc(ch->members, ch->cap * sizeof *ch->members);
  }
  s->idx = ch->nmembers;
  ch->members[ch->nmembers++] = s;
  b->version++;
  if (ch->nmembers == 1 && b->io.interest)
    b->io.interest(b->io.ud, ch->room->name, ch->name, true);
  ch->empty = false;
  if (c->nsubs == c->subcap) {
    c->subcap = c->subcap ? 2 * c->subcap : 4;
    c->subs = arq_realloc(c->subs, c->subcap * sizeof *c->subs);
  }
  c->subs[c->nsubs++] = s;
  arq_bus_tel_member(b, ARQ_TEL_CLIENT_JOINED, c, ch);
  return true;
}

bool arq_router_leave(arq_bus_t *b, arq_client_t *c, arq_channel_t *ch) {
  arq_sub_t *s = arq_router_sub(c, ch);
  if (!s)
    return false;
  arq_sub_t *last = ch->members[--ch->nmembers];
  ch->members[s->idx] = last;
  last->idx = s->idx;
  drop_sub(s);
  b->version++;
  if (ch->nmembers == 0 && b->io.interest)
    b->io.interest(b->io.ud, ch->room->name, ch->name, false);
  arq_bus_tel_member(b, ARQ_TEL_CLIENT_LEFT, c, ch);
  if (ch->nmembers == 0 && !ch->bootstrap) {
    if (b->o.channel_ttl_ms == 0) {
      arq_router_remove(b, ch);
    } else {
      ch->empty = true;
      ch->empty_since = b->now_mono;
    }
  }
  return true;
}

void arq_router_sweep(arq_bus_t *b, uint64_t now_mono) {
  arq_channel_t *ch, *tmp;
  HASH_ITER(hh, b->channels, ch, tmp) {
    if (!ch->empty || ch->bootstrap)
      continue;
    if (ch->empty_since == 0)
      ch->empty_since = now_mono; /* emptied before the bus knew the time: the ttl starts now */
    if (now_mono >= ch->empty_since + b->o.channel_ttl_ms)
      arq_router_remove(b, ch);
  }
}
