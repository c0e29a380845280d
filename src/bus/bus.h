/* The message bus: clients, rooms and channels, routing, commands, history.
 *
 * The bus is an object passed explicitly (several event-loop threads could
 * one day each own one and exchange published messages). It does no I/O: the
 * network shell hands it what clients send, and it hands back frames to send
 * and connections to close through the callbacks in arq_bus_io_t. A message
 * for many recipients is validated once, encoded once into one frame, and
 * that frame is given by reference to every recipient.
 *
 * Callbacks may re-enter the bus (a send that closes a slow consumer makes the
 * shell call arq_bus_disconnect()); the bus defers such removals until it is
 * back at its outermost entry point, so routing never walks a changing list.
 */
#ifndef ARQ_BUS_BUS_H
#define ARQ_BUS_BUS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "auth/auth.h"
#include "bus/envelope.h"
#include "bus/history.h"
#include "util/hist.h"
#include "util/rcbuf.h"

typedef struct arq_bus arq_bus_t;
typedef struct arq_client arq_client_t;

/* What the telemetry stream reports ("eventType" of its envelopes). The bus
 * reports most of them; the network shell reports protocol violations,
 * slow consumers and the periodic stats. */
typedef enum {
  ARQ_TEL_CLIENT_CONNECTED = 0,
  ARQ_TEL_CLIENT_DISCONNECTED,
  ARQ_TEL_CHANNEL_CREATED,
  ARQ_TEL_CHANNEL_DELETED,
  ARQ_TEL_CLIENT_JOINED,
  ARQ_TEL_CLIENT_LEFT,
  ARQ_TEL_COMMAND_EXECUTED,
  ARQ_TEL_ERROR,
  ARQ_TEL_PROTOCOL_VIOLATION,
  ARQ_TEL_SLOW_CONSUMER,
  ARQ_TEL_STATS,
  ARQ_TEL_CLIENT_TELEMETRY, /* telemetry envelopes sent by bus clients, whatever their eventType */
  ARQ_TEL_AGENT_ACTIVITY,
  ARQ_TEL_NEVENTS
} arq_tel_event_t;

/* WebSocket close code of a connection whose credential expired without a
 * refresh (the 'authenticate' command). */
#define ARQ_CLOSE_TOKEN_EXPIRED 4002

/* What a client was refused (forbidden errors, counted by action). */
typedef enum {
  ARQ_DENY_COMMAND = 0, /* its roles may not run the command */
  ARQ_DENY_ROOM,        /* the room is protected, or outside its token's rooms */
  ARQ_DENY_PUBLISH,     /* guests may not publish */
  ARQ_DENY_AUTHENTICATE,/* an in-band credential for another client id */
  ARQ_DENY_CONNECT,     /* counted by the shell: an upgrade refused with 403 */
  ARQ_DENY_NACTIONS
} arq_deny_t;

/* Returns the metric label of 'a' ("command", "room", ...). */
const char *arq_deny_name(arq_deny_t a);

/* Returns the wire name of 'ev' ("client_connected", ...). */
const char *arq_tel_name(arq_tel_event_t ev);
/* Returns the event named by the 'n' bytes at 's', or -1. */
int arq_tel_parse(const char *s, size_t n);

/* A message for a channel that the bus hands to the shell in cluster mode
 * (arq_bus_io_t.append): the shell stores it, has every node deliver it
 * (arq_bus_deliver), and ends it with arq_bus_pub_done(). */
typedef struct arq_bus_pub {
  char room[ARQ_NAME_MAX + 1];
  char channel[ARQ_NAME_MAX + 1];
  char id[ARQ_ENV_MAX_ID + 1];
  char from[ARQ_NAME_MAX + 1]; /* the sending client, "" for the server's own messages */
  bool skip_sender;            /* the sender does not get it back (its echo is off) */
  arq_msg_type_t type;         /* event or telemetry */
  char *json;                  /* the envelope as delivered, without "position" (owned) */
  size_t len;
  bool ack;                    /* the sender asked for an acknowledgement */
  arq_client_t *client;        /* the sender, referenced until done; NULL for the server's own */
} arq_bus_pub_t;

/* What one node tells the others through the shell in cluster mode
 * (arq_bus_io_t.cast), and what it gets from them (arq_bus_receive_cast). */
typedef enum {
  ARQ_CAST_ROOM = 0,    /* a room-wide event: 'room', 'json' */
  ARQ_CAST_PRIVATE,     /* a private message: 'to' (comma-separated ids), 'json' */
  ARQ_CAST_NOTIFY,      /* a system notification for the members of 'room':'channel': 'json' */
  ARQ_CAST_NOTIFY_ROOM, /* the same for the members of every channel of 'room' */
  ARQ_CAST_DELETE,      /* channel 'room':'channel' was deleted */
  ARQ_CAST_KICK,        /* client 'client_id' connected at 'at' (wall ms): older connections with its id go */
  ARQ_CAST_NKINDS
} arq_cast_kind_t;

typedef struct arq_bus_cast {
  arq_cast_kind_t kind;
  const char *room, *channel; /* NULL or "" when not used */
  const char *client_id;      /* NULL or "" when not used */
  const char *to;             /* NULL or "" when not used */
  const char *json;           /* the envelope to deliver, or NULL */
  size_t len;
  uint64_t at;
} arq_bus_cast_t;

/* Returns the wire name of 'k' ("room", ...), or NULL; and the kind named 's', or -1. */
const char *arq_cast_name(arq_cast_kind_t k);
int arq_cast_parse(const char *s);

/* How the bus reaches connections. 'conn' is the shell's handle. */
typedef struct arq_bus_io {
  /* Queues 'frame' (borrowed; take a reference to keep it). Returns false
   * when the connection did not take it (closing, or just closed as slow). */
  bool (*send)(void *ud, void *conn, arq_rcbuf_t *frame);
  /* Reports the telemetry envelope 'env' (borrowed) of kind 'ev'; called only
   * for kinds in the mask set with arq_bus_set_telemetry_mask(). May be NULL. */
  void (*telemetry)(void *ud, arq_tel_event_t ev, json_t *env);
  /* Adds the shell's own figures (connections, bytes) to the "server" object
   * of a status report. May be NULL. */
  void (*describe)(void *ud, json_t *server);
  /* Starts closing 'conn' with WebSocket close 'code' and 'why'. The bus has
   * already disconnected the client on 'conn': the shell must forget it and
   * never pass it to the bus again. */
  void (*close)(void *ud, void *conn, uint16_t code, const char *why);
  /* Cluster mode only (NULL: the bus stores and delivers channel messages
   * itself). Takes 'p' (owned by the shell until arq_bus_pub_done). */
  void (*append)(void *ud, arq_bus_pub_t *p);
  /* Cluster mode: channel 'room':'channel' got its first member here ('on')
   * or lost its last one. May be NULL. */
  void (*interest)(void *ud, const char *room, const char *channel, bool on);
  /* Cluster mode: tells the other nodes 'm' (borrowed). May be NULL. */
  void (*cast)(void *ud, const arq_bus_cast_t *m);
  /* Reports that client 'client_id' (from 'remote') was refused 'action'
   * (arq_deny_name) because of 'why', for the log. May be NULL. */
  void (*denied)(void *ud, const char *client_id, const char *remote, const char *action, const char *why);
  void *ud;
} arq_bus_io_t;

typedef struct arq_bus_opts {
  const char *server_version;
  uint64_t heartbeat_interval_ms;  /* announced in the welcome */
  uint64_t max_message_size;       /* announced in the welcome */
  uint64_t max_envelope_size;      /* larger messages get payload_too_large */
  size_t history_size;             /* messages kept per channel */
  size_t history_default_limit;    /* history without 'limit' */
  size_t history_max_limit;        /* cap on 'limit' */
  unsigned max_malformed;          /* malformed messages in a row before a 1008 close; 0: never */
  uint64_t channel_ttl_ms;         /* how long an empty channel lives; 0: removed at once */
  const char *const *bootstrap;    /* "room:channel" names that always exist; NULL-terminated */
  const char *const *admins;       /* client ids allowed privileged commands; NULL or empty: all */
  const char *telemetry_channel;   /* "room:channel" where client telemetry goes */
  const char *dashboard_channel;   /* "room:channel" of agent_activity events */
  uint64_t seed;                   /* makes generated ids unique to this process */
  const char *node_id;             /* cluster mode: this node's name; NULL or "" in memory mode */
  const char *command_roles;       /* "command=role+role,..." (access.c); NULL: every command open to all */
  const char *protected_rooms;     /* "room=role+role,..."; NULL: none */
  arq_auth_t *auth;                /* checks in-band credentials (borrowed; it remembers tokens); NULL: off */
  /* Limits (docs/security.md); 0 turns each off. */
  uint64_t rate_messages;          /* messages per second per client (token bucket, one second's worth) */
  uint64_t rate_bytes;             /* bytes per second per client */
  unsigned rate_close_after;       /* rate_limited messages within one second before a 1008 close */
  size_t max_subscriptions;        /* channels one client may have joined */
  size_t max_channels_per_client;  /* channels a client created that still exist and only it joined */
  size_t max_channels;             /* channels on this node */
  size_t max_rooms;                /* rooms on this node */
} arq_bus_opts_t;

/* The reason of the close after too many rate_limited messages. */
#define ARQ_BUS_RATE_CLOSE_REASON "rate limit exceeded"

/* Fills 'o' with the defaults of the library: no bootstrap channels, no
 * admins and no limits (the server sets the limits from its settings). */
void arq_bus_opts_defaults(arq_bus_opts_t *o);

/* Returns a new bus (caller owns). 'o' and its strings are copied; 'io' is
 * copied; the bus takes ownership of 'history'. Returns NULL with a message in
 * 'err' when a bootstrap channel or admin id is not a valid name. */
arq_bus_t *arq_bus_new(const arq_bus_opts_t *o, const arq_bus_io_t *io, arq_history_t *history, char *err,
                       size_t errcap);
/* Releases the bus. Clients must have been disconnected first. */
void arq_bus_free(arq_bus_t *b);

/* What a client says about itself in the query string of its upgrade. */
typedef enum { ARQ_CLIENT_HUMAN = 0, ARQ_CLIENT_AI_AGENT, ARQ_CLIENT_DASHBOARD, ARQ_CLIENT_SERVICE, ARQ_CLIENT_NTYPES } arq_client_type_t;

typedef struct arq_client_params {
  char client_id[ARQ_NAME_MAX + 1];  /* "" when not given */
  arq_client_type_t type;
  char screen_name[129];
  char avatar[513];
  char personality[513];
  char room[ARQ_NAME_MAX + 1];       /* initial channel, "" when not given */
  char channel[ARQ_NAME_MAX + 1];
  bool echo;                         /* deliver the client's own events back to it */
  /* From the credential the shell checked (auth/auth.h), none without one: */
  unsigned roles;                    /* ARQ_ROLE_* bits; 0: the bus's default (admins) */
  const char *rooms;                 /* rooms the client is limited to (borrowed, copied); NULL: any */
  uint64_t expires_ms;               /* wall ms when the credential expires; 0: never */
} arq_client_params_t;

/* Returns the client type named 'name' ("ai-agent"), human when unknown. */
arq_client_type_t arq_client_type_parse(const char *name);

/* Parses the upgrade's query string ('n' bytes at 'q', without '?'; may be
 * empty) into 'p'. Unknown parameters are ignored. Returns 0, or ARQ_EINVAL
 * with one line naming the parameter in 'err' (answered with HTTP 400). */
int arq_bus_parse_params(const char *q, size_t n, arq_client_params_t *p, char *err, size_t errcap);

/* Adds a connected client: assigns its id if it gave none, closes an older
 * connection with the same id (close 4001, "replaced"), sends the welcome and
 * joins the initial channel. 'conn' is the shell's handle; 'remote' is copied.
 * Returns the client (owned by the bus until arq_bus_disconnect). */
arq_client_t *arq_bus_connect(arq_bus_t *b, void *conn, const arq_client_params_t *p, const char *remote);

/* Removes 'c': leaves its channels (telling them) and forgets its handle. The
 * bus never calls io for this client again. */
void arq_bus_disconnect(arq_bus_t *b, arq_client_t *c);

/* Handles one complete message from 'c' ('len' bytes at 'data'; 'binary' for
 * a binary frame). */
void arq_bus_receive(arq_bus_t *b, arq_client_t *c, const char *data, size_t len, bool binary);
/* The same, with the time its first byte arrived ('arrival_ns', monotonic,
 * util/time.h), for the routing latency histogram. */
void arq_bus_receive_at(arq_bus_t *b, arq_client_t *c, const char *data, size_t len, bool binary,
                        uint64_t arrival_ns);

/* Sets which telemetry kinds (bit 1 << ev) anyone listens to; the bus skips
 * building the others. */
void arq_bus_set_telemetry_mask(arq_bus_t *b, uint32_t mask);
/* Returns a new telemetry envelope (caller owns) with 'event_type' and
 * 'payload' (stolen), an id and a timestamp. */
json_t *arq_bus_tel_envelope(arq_bus_t *b, const char *event_type, json_t *payload);

/* Answers a history request made outside the bus (GET /history): 'room',
 * 'channel' (or "room:channel" in 'channel'), 'limit' (0: the default) and
 * 'since' (NULL: none). Calls 'done' exactly once with an HTTP status and a
 * JSON body (borrowed): 200 and the same object the history command returns,
 * or 400 and {"error": code, "message": ...}. */
void arq_bus_history(arq_bus_t *b, const char *room, const char *channel, long long limit, const char *since,
                     void (*done)(void *ud, int status, json_t *body), void *ud);

/* Ends a message handed to io.append: 'status' 0 when it was stored at
 * 'position' (the sender gets its acknowledgement if it asked), else the
 * sender gets a storage_unavailable error naming the message, which says
 * why: ARQ_EIO refused before it was sent (not stored, not delivered),
 * ARQ_ECLOSED the connection went before Redis confirmed it (not known),
 * ARQ_EPROTO Redis answered with an error (not stored). Frees 'p'. */
void arq_bus_pub_done(arq_bus_t *b, arq_bus_pub_t *p, int status, const char *position);

/* Delivers 'frame' (borrowed), a stored message of type 'type' for channel
 * 'room':'channel', to the channel's members on this node, except the client
 * 'skip' (an id; NULL or "" for none). Cluster mode. */
void arq_bus_deliver(arq_bus_t *b, const char *room, const char *channel, arq_rcbuf_t *frame, arq_msg_type_t type,
                     const char *skip);

/* Handles 'm' (borrowed), told by another node. Cluster mode. */
void arq_bus_receive_cast(arq_bus_t *b, const arq_bus_cast_t *m);

/* Returns this node's presence as the other nodes need it (caller owns):
 * {"node", "started_at", "clients": [{"client_id", "client_type",
 * "screen_name"?, "channels": ["room:channel", ...]}], "channels": [{"room",
 * "channel", "bootstrap", "created_at", "messages"}]}. */
json_t *arq_bus_snapshot(const arq_bus_t *b);
/* Changes whenever the snapshot would. */
uint64_t arq_bus_snapshot_version(const arq_bus_t *b);
/* Sets what the other live nodes last said of themselves: an array of
 * snapshots (stolen). list_channels, channel_info, status and private
 * messages then cover the whole bus. */
void arq_bus_set_peers(arq_bus_t *b, json_t *peers);

/* Tells the bus that every client is about to go (a shutdown): departures
 * are no longer announced to the channels, which would only queue a flood of
 * client_left notifications behind each remaining client's close. */
void arq_bus_quiesce(arq_bus_t *b);

/* Periodic work (removing channels empty for longer than their ttl); 'now'
 * is a monotonic clock in milliseconds. */
void arq_bus_tick(arq_bus_t *b, uint64_t now_ms);

/* Returns the history backend (borrowed). */
arq_history_t *arq_bus_history_backend(const arq_bus_t *b);

/* Returns the client's id (borrowed). */
const char *arq_client_id(const arq_client_t *c);

/* The limits the bus enforces; the label of arqonbus_limit_denials_total
 * (the network shell adds its own: connections per address, origin). */
typedef enum {
  ARQ_LIMIT_RATE = 0,      /* a message refused with rate_limited */
  ARQ_LIMIT_RATE_CLOSE,    /* a client closed with 1008 for going on */
  ARQ_LIMIT_SUBSCRIPTIONS, /* join_channel over max_subscriptions */
  ARQ_LIMIT_CHANNELS,      /* a channel not created: max_channels */
  ARQ_LIMIT_ROOMS,         /* a channel in a new room not created: max_rooms */
  ARQ_LIMIT_CONNECTIONS_PER_IP, /* (shell) an upgrade refused with 429 */
  ARQ_LIMIT_ORIGIN,        /* (shell) an upgrade refused with 403 */
  ARQ_LIMIT_HANDSHAKES_PER_IP, /* (shell) a connection dropped at accept: max_handshakes_per_ip */
  ARQ_LIMIT_CREATED,       /* a channel not created: max_channels_per_client of its own still exist */
  ARQ_LIMIT_NLIMITS
} arq_limit_t;

/* Returns the label value of 'l' ("rate", ...). */
const char *arq_limit_name(arq_limit_t l);

/* Counters for metrics and status. */
typedef struct arq_bus_stats {
  uint64_t clients;
  uint64_t rooms;
  uint64_t channels;
  uint64_t received[ARQ_MSG_NTYPES];  /* valid envelopes from clients, by type */
  uint64_t delivered[ARQ_MSG_NTYPES]; /* envelopes queued to clients, by type */
  uint64_t received_invalid;          /* messages that were not valid envelopes */
  uint64_t errors[ARQ_CODE_NCODES];   /* error envelopes sent, by code */
  uint64_t malformed_closes;
  uint64_t limit_denials[ARQ_LIMIT_NLIMITS]; /* by limit (the shell's two stay 0 here) */
  uint64_t history_messages;
  arq_hist_t routing;                 /* arrival to the last recipient's queue */
  arq_hist_t commands[16];            /* duration, by command (arq_bus_command_name) */
  uint64_t forbidden[ARQ_DENY_NACTIONS]; /* forbidden errors, by action */
  uint64_t expired_closes;            /* connections closed when their credential expired */
  uint64_t auth_inband[2];            /* credentials of the authenticate command: ok, refused */
} arq_bus_stats_t;

/* Replaces the verifier of in-band credentials ('auth' borrowed; NULL:
 * authentication off). */
void arq_bus_set_auth(arq_bus_t *b, arq_auth_t *auth);

/* True when a client with 'roles' and token rooms 'rooms' (NULL: no limit)
 * may join, publish to and read room 'room' (access.c). */
bool arq_bus_may_use_room(const arq_bus_t *b, unsigned roles, const char *rooms, const char *room);

/* Returns the name of command 'i', or NULL past the last one. */
const char *arq_bus_command_name(size_t i);

/* Fills 's' with the bus's current figures. */
void arq_bus_stats(const arq_bus_t *b, arq_bus_stats_t *s);

/* Returns the bus state as the status command and /status show it (caller
 * owns), with the first 100 clients. */
json_t *arq_bus_status(const arq_bus_t *b);
/* The same with clients 'offset' to 'offset' + 'limit' (in connection order). */
json_t *arq_bus_status_page(const arq_bus_t *b, size_t offset, size_t limit);
#define ARQ_STATUS_DEFAULT_LIMIT 100
#define ARQ_STATUS_MAX_LIMIT 1000

#endif
