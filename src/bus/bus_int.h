/* Internals shared by the bus's source files (bus.c, router.c, commands.c).
 * Not for other modules: they use bus.h.
 */
#ifndef ARQ_BUS_BUS_INT_H
#define ARQ_BUS_BUS_INT_H

#include <uthash.h>

#include "bus/bus.h"
#include "bus/ratelimit.h"
#include "util/list.h"

typedef struct arq_room arq_room_t;
typedef struct arq_channel arq_channel_t;

/* One subscription: a client in a channel. Owned by the client; 'idx' is its
 * place in the channel's member array, which makes leaving O(1). */
typedef struct arq_sub {
  arq_client_t *client;
  arq_channel_t *channel;
  size_t idx;
} arq_sub_t;

struct arq_channel {
  char key[2 * ARQ_NAME_MAX + 2]; /* "room:channel", the hash key */
  char name[ARQ_NAME_MAX + 1];
  arq_room_t *room;
  arq_sub_t **members;
  size_t nmembers, cap;
  bool bootstrap;
  uint64_t created_at;   /* wall ms */
  bool empty;            /* no members (its ttl runs) */
  arq_client_t *creator; /* the client whose request created it, while connected; NULL otherwise */
  uint64_t empty_since;  /* bus time when it became empty; 0: before the first tick */
  uint64_t messages;     /* events routed to it */
  arq_list_t node_room;  /* in room->channels */
  UT_hash_handle hh;     /* in bus->channels */
};

struct arq_room {
  char name[ARQ_NAME_MAX + 1];
  arq_list_t channels;
  size_t nchannels;
  UT_hash_handle hh;
};

struct arq_client {
  char id[ARQ_NAME_MAX + 1];
  arq_client_type_t type;
  char *screen_name, *avatar, *personality; /* NULL when not given */
  char remote[56];
  void *conn;            /* NULL once disconnected */
  unsigned refs;         /* the bus's own while connected, plus pending async work */
  bool gone;
  bool echo;
  unsigned malformed;    /* malformed messages in a row */
  arq_rate_t rate;       /* rate limit buckets */
  uint64_t rejected_since; /* start (mono ns) of the second whose rate_limited messages are counted */
  unsigned rejected;     /* rate_limited messages since then */
  uint64_t connected_at, last_activity; /* wall ms */
  uint64_t msgs_in, msgs_out;
  uint64_t mark;         /* last routing round that reached this client */
  char init_room[ARQ_NAME_MAX + 1], init_channel[ARQ_NAME_MAX + 1];
  arq_channel_t **created; /* channels its requests created that still exist (max_subscriptions) */
  size_t ncreated, createdcap;
  unsigned roles;        /* ARQ_ROLE_* */
  char *rooms;           /* rooms its credential limits it to, comma-separated; NULL: any */
  uint64_t expires_ms;   /* wall ms when its credential expires; 0: never */
  arq_sub_t **subs;
  size_t nsubs, subcap;
  arq_list_t node_dead;
  UT_hash_handle hh;     /* in bus->clients, by id */
};

/* What the other nodes have (cluster mode): their channels with their
 * members, and their clients' ids. Rebuilt from their snapshots. */
typedef struct arq_peer_chan {
  char key[2 * ARQ_NAME_MAX + 2];
  char room[ARQ_NAME_MAX + 1], channel[ARQ_NAME_MAX + 1];
  json_t *members;     /* member objects (client_id, client_type, screen_name?) */
  json_t *info;        /* the channel object of the first snapshot naming it, or NULL */
  UT_hash_handle hh;
} arq_peer_chan_t;

/* A room of protected_rooms and the roles that may use it. */
typedef struct arq_protected {
  char room[ARQ_NAME_MAX + 1];
  unsigned roles;
} arq_protected_t;

typedef struct arq_peer_client {
  char id[ARQ_NAME_MAX + 1];
  UT_hash_handle hh;
} arq_peer_client_t;

struct arq_bus {
  arq_bus_opts_t o;
  char **bootstrap, **admins; /* owned copies, NULL-terminated */
  arq_bus_io_t io;
  arq_history_t *history;
  arq_client_t *clients;
  arq_room_t *rooms;
  arq_channel_t *channels;
  size_t nclients;
  unsigned depth;        /* nesting of entry points */
  bool quiet;            /* shutting down: departures are not announced */
  uint32_t tel_mask;     /* telemetry kinds someone listens to */
  int cmd_error;         /* while a command runs: the code of its error, or -1 */
  char tel_room[ARQ_NAME_MAX + 1], tel_channel[ARQ_NAME_MAX + 1];
  char dash_room[ARQ_NAME_MAX + 1], dash_channel[ARQ_NAME_MAX + 1];
  arq_list_t dead;       /* clients disconnected while depth > 0 */
  uint64_t round;        /* routing rounds, for arq_client.mark */
  uint64_t ids;          /* generated ids so far */
  uint64_t now_mono;     /* last tick */
  uint64_t started_at;   /* wall ms */
  arq_buf_t scratch;
  arq_bus_stats_t st;
  char node_id[ARQ_NAME_MAX + 1]; /* "" in memory mode */
  json_t *peers;                  /* the other nodes' snapshots (array), or NULL */
  arq_peer_chan_t *peer_chans;
  arq_peer_client_t *peer_clients;
  uint64_t version;               /* of this node's snapshot */
  bool casting;                   /* handling another node's cast: do not cast back */
  unsigned cmd_roles[16];         /* roles allowed to run command i */
  arq_protected_t *protected_rooms;
  size_t nprotected;
  uint64_t next_expiry_check;     /* wall ms */
};

/* ---- router.c: rooms, channels, memberships ----------------------------- */

arq_channel_t *arq_router_find(arq_bus_t *b, const char *room, const char *channel);
arq_room_t *arq_router_find_room(arq_bus_t *b, const char *room);
/* Returns the channel, creating it (and its room) when missing; '*created'
 * tells which. */
arq_channel_t *arq_router_ensure(arq_bus_t *b, const char *room, const char *channel, bool *created);
/* The same for a client's request: a channel that would take the node over
 * max_channels, or a new room over max_rooms, is not created; then returns
 * NULL with the limit in '*denied'. */
arq_channel_t *arq_router_open(arq_bus_t *b, const char *room, const char *channel, bool *created,
                               arq_limit_t *denied);
/* The same on behalf of client 'by': it may also not have created more than
 * max_channels_per_client channels that still exist (ARQ_LIMIT_CREATED); a channel
 * it creates is counted as its own until it is removed, another client
 * joins it, or 'by' leaves. */
arq_channel_t *arq_router_open_by(arq_bus_t *b, arq_client_t *by, const char *room, const char *channel,
                                  bool *created, arq_limit_t *denied);
/* Takes 'ch' off its creator's own channels (another client joined it, or
 * it is removed). */
void arq_router_forget_created(arq_channel_t *ch);
/* Forgets the channels 'c' created (it is leaving the bus). */
void arq_router_forget_creator(arq_client_t *c);
/* Removes the channel and every membership in it; the caller tells members. */
void arq_router_remove(arq_bus_t *b, arq_channel_t *ch);
/* Returns the client's subscription to 'ch', or NULL. */
arq_sub_t *arq_router_sub(const arq_client_t *c, const arq_channel_t *ch);
/* Subscribes 'c' to 'ch'. Returns false when it already was. */
bool arq_router_join(arq_bus_t *b, arq_client_t *c, arq_channel_t *ch);
/* Unsubscribes 'c' from 'ch'. Returns false when it was not subscribed. An
 * emptied channel starts its ttl (or goes at once with ttl 0). */
bool arq_router_leave(arq_bus_t *b, arq_client_t *c, arq_channel_t *ch);
/* Removes channels whose ttl has run out. */
void arq_router_sweep(arq_bus_t *b, uint64_t now_mono);

/* ---- bus.c: helpers the commands use ------------------------------------ */

/* Writes a new message id into 'out' (at least 40 bytes). */
void arq_bus_new_id(arq_bus_t *b, char *out);
/* Encodes 'obj' once and queues it to 'c'; counts it under 'type'. Steals 'obj'. */
void arq_bus_send_to(arq_bus_t *b, arq_client_t *c, json_t *obj, arq_msg_type_t type);
/* Sends a system notification (payload.event = 'event', plus 'fields',
 * stolen) to every member of 'ch' except 'skip' (may be NULL). */
void arq_bus_notify(arq_bus_t *b, arq_channel_t *ch, const arq_client_t *skip, const char *event, json_t *fields);
/* Sends a system notification about channel 'about' to every member of any
 * channel of room 'r', once each. Steals 'fields'. */
void arq_bus_notify_room(arq_bus_t *b, arq_room_t *r, arq_channel_t *about, const char *event, json_t *fields);
/* Sends the reply to a command: a system envelope with 'command' and the
 * request's id as correlation_id; steals 'payload'. */
void arq_bus_reply(arq_bus_t *b, arq_client_t *c, const arq_env_t *req, const char *command, json_t *payload);
/* The same, naming the request by its id 'correlation_id'. */
void arq_bus_reply_to(arq_bus_t *b, arq_client_t *c, const char *correlation_id, const char *command,
                      json_t *payload);
/* Keeps 'c' alive across asynchronous work (a gone client is then only
 * marked gone); arq_bus_client_unref releases it. */
void arq_bus_client_ref(arq_client_t *c);
void arq_bus_client_unref(arq_client_t *c);
/* Sends an error envelope to 'c' for the request 'correlation_id' (may be
 * NULL or ""), about 'command' (may be NULL); 'details' (stolen, may be NULL)
 * is merged into the payload. */
void arq_bus_error(arq_bus_t *b, arq_client_t *c, const char *correlation_id, const char *command, arq_code_t code,
                   json_t *details, const char *fmt, ...) __attribute__((format(printf, 7, 8)));
/* Sends 'c' a limit_exceeded error for 'limit' (a subscriptions, channels or
 * rooms limit) about 'room':'channel', answering 'correlation_id' and
 * 'command' (both may be NULL), and counts the denial. */
void arq_bus_limit_error(arq_bus_t *b, arq_client_t *c, const char *correlation_id, const char *command,
                         arq_limit_t limit, const char *room, const char *channel);
/* Returns the fields that describe 'c' in a notification about channel 'ch'
 * (caller owns): client_id, client_type, screen_name, members (on every node). */
json_t *arq_bus_member_fields(const arq_bus_t *b, const arq_client_t *c, const arq_channel_t *ch);
/* Returns the JSON description of a client for replies and status. */
json_t *arq_bus_client_json(const arq_client_t *c, bool with_subs);
const char *arq_client_type_name(arq_client_type_t t);

/* True when someone listens to telemetry of kind 'ev'. */
static inline bool arq_bus_tel_wanted(const arq_bus_t *b, arq_tel_event_t ev) {
  return b->io.telemetry && (b->tel_mask & (1u << ev));
}
/* Reports telemetry 'ev' with 'payload' (stolen) if anyone listens. */
void arq_bus_tel(arq_bus_t *b, arq_tel_event_t ev, json_t *payload);
/* Reports a change of channel 'ch' ('ev': created, deleted). */
void arq_bus_tel_channel(arq_bus_t *b, arq_tel_event_t ev, const arq_channel_t *ch);
/* Reports that 'c' joined or left 'ch' ('ev'). */
void arq_bus_tel_member(arq_bus_t *b, arq_tel_event_t ev, const arq_client_t *c, const arq_channel_t *ch);
/* Publishes agent_activity 'activity' of 'c' (only ai-agent and service
 * clients) with 'fields' (stolen, may be NULL). */
void arq_bus_agent_activity(arq_bus_t *b, const arq_client_t *c, const char *activity, json_t *fields);

/* ---- peers.c: the other nodes (cluster mode) ------------------------------ */

/* Tells the other nodes 'm' (nothing in memory mode or while handling theirs). */
void arq_bus_cast(arq_bus_t *b, const arq_bus_cast_t *m);
/* Returns what the other nodes have of channel 'room':'channel', or NULL. */
const arq_peer_chan_t *arq_peers_channel(const arq_bus_t *b, const char *room, const char *channel);
/* Members of 'ch' on every node. */
size_t arq_bus_members_total(const arq_bus_t *b, const arq_channel_t *ch);
/* True when client 'id' is connected to another node. */
bool arq_peers_has_client(const arq_bus_t *b, const char *id);
/* Handles a cast from another node (arq_bus_receive_cast, inside the bus). */
void arq_peers_receive(arq_bus_t *b, const arq_bus_cast_t *m);
/* Queues 'f' to 'c' and counts it; false when 'c' did not take it. */
bool arq_bus_deliver_to(arq_bus_t *b, arq_client_t *c, arq_rcbuf_t *f, arq_msg_type_t type);
/* Releases the peers index. */
void arq_peers_free(arq_bus_t *b);
/* Closes the local client 'c' that another node's newer connection replaced. */
void arq_bus_replaced(arq_bus_t *b, arq_client_t *c);
/* Delivers 'f' to the members of every channel of room 'r', once each, except 'skip'. */
void arq_bus_deliver_room(arq_bus_t *b, arq_room_t *r, const arq_client_t *skip, arq_rcbuf_t *f, arq_msg_type_t type);

/* ---- access.c: authorization ------------------------------------------------ */

/* Reads o->command_roles and o->protected_rooms. Returns 0, or ARQ_EINVAL
 * with a message in 'err'. */
int arq_access_init(arq_bus_t *b, const arq_bus_opts_t *o, char *err, size_t errcap);
void arq_access_free(arq_bus_t *b);
/* Roles of a client that presented no credential: admin (and user) when
 * 'admins' is empty or lists 'client_id', else user. */
unsigned arq_access_default_roles(const arq_bus_t *b, const char *client_id);
/* The names of 'roles' as a JSON array (caller owns). */
json_t *arq_access_roles_json(unsigned roles);
/* Roles allowed to run command 'cmd' (its index). */
unsigned arq_access_command_roles(const arq_bus_t *b, size_t cmd);
/* True when 'room' is in protected_rooms. */
bool arq_access_protected(const arq_bus_t *b, const char *room);
/* Sends 'c' a forbidden error for 'action' (counted, reported to io.denied). */
void arq_access_deny(arq_bus_t *b, arq_client_t *c, const char *correlation_id, const char *command,
                     arq_deny_t action, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* True when 'c' may use 'room'; otherwise denies (forbidden) and returns false. */
bool arq_access_room(arq_bus_t *b, arq_client_t *c, const char *correlation_id, const char *command,
                     const char *room);

/* ---- commands.c --------------------------------------------------------- */

/* Builds the reply payload of a history query (caller owns). */
json_t *arq_commands_history_result(const char *room, const char *channel, size_t limit, const char *since,
                                    const arq_hist_result_t *res, size_t max_bytes);

/* Runs the command envelope 'e' from 'c' and replies. */
void arq_commands_run(arq_bus_t *b, arq_client_t *c, const arq_env_t *e);

#endif
