/* The v1 envelope: parsing and validating what a client sends, building what
 * the server sends, and encoding it once into a shared WebSocket frame.
 *
 * docs/protocol.md is the contract; this module is its parser. No I/O: it
 * takes bytes and returns a validated view (arq_env_t) or an error with a
 * stable code and a message a person can act on.
 *
 * Versioning: an envelope without "version" is 1.0. "1.0" is strict: an
 * unknown field is an error. "1.y" with y > 0 comes from a newer client: the
 * fields this server knows are validated as in 1.0 and the others are kept and
 * forwarded unchanged. Any other major version gets unsupported_version.
 */
#ifndef ARQ_BUS_ENVELOPE_H
#define ARQ_BUS_ENVELOPE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bus/names.h"
#include "util/rcbuf.h"

#define ARQ_PROTOCOL_MAJOR 1
#define ARQ_ENV_MAX_DEPTH 32     /* nesting of objects and arrays, the envelope included */
#define ARQ_ENV_MAX_ID 128       /* id and correlation_id, bytes */
#define ARQ_ENV_MAX_TO 100       /* recipients of one private message */
#define ARQ_ENV_MAX_COMMAND 32   /* command name, bytes */
#define ARQ_ENV_MAX_EVENT_TYPE 64 /* eventType of telemetry, bytes */

typedef enum {
  ARQ_MSG_EVENT = 0,
  ARQ_MSG_SYSTEM,
  ARQ_MSG_COMMAND,
  ARQ_MSG_PRIVATE,
  ARQ_MSG_TELEMETRY,
  ARQ_MSG_ERROR,
  ARQ_MSG_NTYPES
} arq_msg_type_t;

/* Returns the wire name of 't' ("event", ...). */
const char *arq_msg_type_name(arq_msg_type_t t);

/* Stable error codes, sent as payload.code of error envelopes. */
typedef enum {
  ARQ_CODE_INVALID_JSON = 0,  /* not JSON, or not UTF-8 */
  ARQ_CODE_INVALID_ENVELOPE,  /* JSON, but not a valid envelope */
  ARQ_CODE_UNSUPPORTED_VERSION,
  ARQ_CODE_UNKNOWN_TYPE,
  ARQ_CODE_UNSUPPORTED_FRAME, /* a binary frame on the bus */
  ARQ_CODE_PAYLOAD_TOO_LARGE,
  ARQ_CODE_UNKNOWN_COMMAND,
  ARQ_CODE_INVALID_ARGUMENT,  /* a command argument is missing or wrong */
  ARQ_CODE_NOT_FOUND,
  ARQ_CODE_ALREADY_EXISTS,
  ARQ_CODE_FORBIDDEN,
  ARQ_CODE_INTERNAL,
  ARQ_CODE_STORAGE_UNAVAILABLE, /* Redis cannot take the message (strict mode, or the outage buffer is full) */
  ARQ_CODE_UNAUTHORIZED,      /* an in-band credential was refused */
  ARQ_CODE_RATE_LIMITED,      /* the client sends faster than its rate limit */
  ARQ_CODE_LIMIT_EXCEEDED,    /* a subscriptions, channels or rooms limit */
  ARQ_CODE_NCODES
} arq_code_t;

/* Returns the wire name of 'c' ("invalid_json", ...). */
const char *arq_code_name(arq_code_t c);
/* True for the codes that count as a malformed message (the streak that ends
 * in a 1008 close): the message could not be understood at all. */
bool arq_code_is_malformed(arq_code_t c);

/* A validated envelope. Strings are borrowed from 'root' (or the buffers
 * here) and live until arq_env_free(). */
typedef struct arq_env {
  json_t *root;                 /* owned */
  arq_msg_type_t type;
  unsigned minor;               /* version 1.<minor> */
  const char *version;          /* as the sender wrote it; NULL when absent */
  const char *id;               /* NULL when absent */
  const char *command;          /* NULL when absent */
  const char *event_type;       /* "eventType" of a telemetry envelope, NULL when absent */
  const char *correlation_id;   /* NULL when absent */
  const char *timestamp;        /* NULL when absent */
  json_t *to;                   /* array of client id strings, or NULL */
  json_t *payload;              /* object, or NULL */
  json_t *metadata;             /* object, or NULL */
  bool ack;                     /* "ack": true, the sender wants an acknowledgement */
  char room[ARQ_NAME_MAX + 1];  /* "" when absent; "room:channel" split */
  char channel[ARQ_NAME_MAX + 1];
} arq_env_t;

typedef struct arq_env_error {
  arq_code_t code;
  char message[256];
  char correlation_id[ARQ_ENV_MAX_ID + 1]; /* the offending message's id, or "" */
} arq_env_error_t;

/* Parses and validates the 'len' bytes at 'data' (a text message; UTF-8 was
 * checked by the transport, jansson checks it again). Returns 0 and fills
 * 'e' (release with arq_env_free), or ARQ_EINVAL and fills 'err'. */
int arq_env_parse(arq_env_t *e, const char *data, size_t len, arq_env_error_t *err);
/* Releases what 'e' holds. Safe on a zeroed or already freed envelope. */
void arq_env_free(arq_env_t *e);

/* Reads a room and a channel ('room', 'channel': JSON values, either may be
 * NULL) by the rules of the envelope's own fields ("room:channel" in one of
 * them included) into 'room_out' and 'channel_out' (ARQ_NAME_MAX + 1 bytes,
 * "" when absent). Returns 0, or ARQ_EINVAL with 'err' filled. For command
 * arguments given in a payload. */
int arq_env_target(json_t *room, json_t *channel, char *room_out, char *channel_out, arq_env_error_t *err);

/* True when 's' is a well-formed message id ("arq_" and 1-124 of A-Z a-z 0-9 _ -). */
bool arq_env_valid_id(const char *s);
/* True when 's' is an ISO-8601 UTC timestamp as the protocol allows. */
bool arq_env_valid_timestamp(const char *s);

/* Fields of an envelope the server builds; NULL or "" leaves a field out.
 * 'payload' is borrowed (the envelope takes its own reference). */
typedef struct arq_env_out {
  arq_msg_type_t type;
  unsigned minor;
  const char *version; /* written as is when set (a forwarded 1.y), else "1.<minor>" */
  const char *id;
  const char *room;
  const char *channel;
  const char *from;
  json_t *to;
  const char *command;
  const char *event_type;
  json_t *payload;
  json_t *metadata;
  const char *timestamp;
  const char *correlation_id;
  json_t *extra; /* unknown fields of a 1.y envelope, forwarded; may be NULL */
} arq_env_out_t;

/* Returns a new JSON object (caller owns) with the fields of 'o' in the
 * protocol's order. */
json_t *arq_env_build(const arq_env_out_t *o);

/* Collects the fields of 'e' that this server does not know (1.y only) into
 * a new object (caller owns), or returns NULL when there are none. */
json_t *arq_env_extra(const arq_env_t *e);

/* A growable byte buffer for encoding. */
typedef struct arq_buf {
  char *data;
  size_t len, cap;
} arq_buf_t;
void arq_buf_free(arq_buf_t *b);

/* Encodes 'obj' as compact JSON into one unmasked text frame (caller owns the
 * one reference). '*json_off' and '*json_len' locate the JSON text inside the
 * frame, for history. 'scratch' is reused between calls. */
arq_rcbuf_t *arq_env_frame(const json_t *obj, arq_buf_t *scratch, size_t *json_off, size_t *json_len);
/* The same with the member "position": 'position' (a short string; NULL or
 * "" for none) added at the end. */
arq_rcbuf_t *arq_env_frame_at(const json_t *obj, const char *position, arq_buf_t *scratch, size_t *json_off,
                              size_t *json_len);

/* Frames the JSON text of an envelope ('len' bytes at 'json', a compact
 * object) with "position": 'position' (NULL or "" for none) added as its last
 * member, into one unmasked text frame (caller owns the one reference). */
arq_rcbuf_t *arq_env_frame_text(const char *json, size_t len, const char *position, size_t *json_off,
                                size_t *json_len);
/* Encodes 'obj' as compact JSON into 'scratch' (reused between calls). */
void arq_env_dump(const json_t *obj, arq_buf_t *scratch);

/* True when 's' looks like a position: digits, or digits-digits (a Redis
 * stream id). */
bool arq_env_valid_position(const char *s);

#endif
