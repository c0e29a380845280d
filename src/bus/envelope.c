/* Envelope parsing, validation and encoding (see envelope.h).
 *
 * Parsing is one pass of jansson over the message after a cheap scan that
 * refuses deep nesting before jansson recurses into it. Validation then walks
 * the top-level keys once. Encoding builds the object in the protocol's field
 * order and dumps it straight into a scratch buffer that becomes one frame.
 */
#include "bus/envelope.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "util/alloc.h"
#include "util/err.h"
#include "wire/frame.h"
#include "wire/utf8.h"

static const char *const type_names[ARQ_MSG_NTYPES] = {"event", "system", "command", "private", "telemetry", "error"};

static const char *const code_names[ARQ_CODE_NCODES] = {
    "invalid_json",      "invalid_envelope", "unsupported_version", "unknown_type",
    "unsupported_frame", "payload_too_large", "unknown_command",    "invalid_argument",
    "not_found",         "already_exists",    "forbidden",          "internal_error",
    "storage_unavailable", "unauthorized",     "rate_limited",      "limit_exceeded",
};

const char *arq_msg_type_name(arq_msg_type_t t) { return (unsigned)t < ARQ_MSG_NTYPES ? type_names[t] : "?"; }

const char *arq_code_name(arq_code_t c) { return (unsigned)c < ARQ_CODE_NCODES ? code_names[c] : "?"; }

bool arq_code_is_malformed(arq_code_t c) {
  switch (c) {
  case ARQ_CODE_INVALID_JSON:
  case ARQ_CODE_INVALID_ENVELOPE:
  case ARQ_CODE_UNSUPPORTED_VERSION:
  case ARQ_CODE_UNKNOWN_TYPE:
  case ARQ_CODE_UNSUPPORTED_FRAME:
  case ARQ_CODE_PAYLOAD_TOO_LARGE:
    return true;
  default:
    return false;
  }
}

static int fail(arq_env_error_t *err, arq_code_t code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(arq_env_error_t *err, arq_code_t code, const char *fmt, ...) {
  err->code = code;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err->message, sizeof err->message, fmt, ap);
  va_end(ap);
  arq_utf8_repair(err->message); /* quotes of client text may be cut mid-character */
  return ARQ_EINVAL;
}

/* ---- field checks ------------------------------------------------------- */

static bool idchar(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

bool arq_env_valid_id(const char *s) {
  if (strncmp(s, "arq_", 4) != 0)
    return false;
  size_t n = strlen(s);
  if (n < 5 || n > ARQ_ENV_MAX_ID)
    return false;
  for (size_t i = 4; i < n; i++)
    if (!idchar((unsigned char)s[i]))
      return false;
  return true;
}

static bool digits(const char *s, int n, int *v) {
  *v = 0;
  for (int i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9')
      return false;
    *v = *v * 10 + (s[i] - '0');
  }
  return true;
}

bool arq_env_valid_position(const char *s) {
  int digits_a = 0, digits_b = 0, dashes = 0;
  for (; *s; s++) {
    if (*s >= '0' && *s <= '9')
      *(dashes ? &digits_b : &digits_a) += 1;
    else if (*s == '-' && !dashes)
      dashes++;
    else
      return false;
  }
  return digits_a >= 1 && digits_a <= 20 && (dashes ? digits_b >= 1 && digits_b <= 20 : true);
}

/* YYYY-MM-DDTHH:MM:SS, an optional fraction of 1-9 digits, then Z. */
bool arq_env_valid_timestamp(const char *s) {
  static const int mdays[12] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  int y, mo, d, h, mi, se;
  if (strlen(s) < 20 || !digits(s, 4, &y) || s[4] != '-' || !digits(s + 5, 2, &mo) || s[7] != '-' ||
      !digits(s + 8, 2, &d) || (s[10] != 'T' && s[10] != 't') || !digits(s + 11, 2, &h) || s[13] != ':' ||
      !digits(s + 14, 2, &mi) || s[16] != ':' || !digits(s + 17, 2, &se))
    return false;
  if (mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] || h > 23 || mi > 59 || se > 60)
    return false;
  if (mo == 2 && d == 29 && !((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
    return false;
  const char *p = s + 19;
  if (*p == '.') {
    int n = 0;
    for (p++; *p >= '0' && *p <= '9'; p++)
      n++;
    if (n < 1 || n > 9)
      return false;
  }
  return (p[0] == 'Z' || p[0] == 'z') && p[1] == '\0';
}

/* Refuses nesting deeper than ARQ_ENV_MAX_DEPTH before jansson recurses. */
static bool depth_ok(const char *s, size_t n) {
  int depth = 0;
  bool in_str = false;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (in_str) {
      if (c == '\\')
        i++;
      else if (c == '"')
        in_str = false;
    } else if (c == '"') {
      in_str = true;
    } else if (c == '{' || c == '[') {
      if (++depth > ARQ_ENV_MAX_DEPTH)
        return false;
    } else if (c == '}' || c == ']') {
      depth--;
    }
  }
  return true;
}

static int version_of(json_t *v, unsigned *minor, arq_env_error_t *err) {
  if (!json_is_string(v) || strlen(json_string_value(v)) != json_string_length(v))
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"version\" must be a string such as \"1.0\"");
  const char *s = json_string_value(v);
  /* major.minor: 1-4 digits each, nothing else; version 1 is written "1". */
  unsigned long major = 0, mi = 0;
  const char *p = s;
  int nd = 0;
  for (; *p >= '0' && *p <= '9' && nd < 5; p++, nd++)
    major = major * 10 + (unsigned long)(*p - '0');
  bool ok = nd >= 1 && nd <= 4 && *p == '.';
  if (ok) {
    nd = 0;
    for (p++; *p >= '0' && *p <= '9' && nd < 5; p++, nd++)
      mi = mi * 10 + (unsigned long)(*p - '0');
    ok = nd >= 1 && nd <= 4 && *p == '\0';
  }
  if (!ok)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"version\" must look like \"1.0\" (major.minor)");
  if (major != ARQ_PROTOCOL_MAJOR)
    return fail(err, ARQ_CODE_UNSUPPORTED_VERSION, "version \"%.32s\" is not supported; this server speaks 1.x", s);
  if (s[0] != '1' || s[1] != '.')
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"version\" must look like \"1.0\" (major.minor)");
  *minor = (unsigned)mi;
  return 0;
}

static int string_field(json_t *v, const char *key, size_t max, const char **out, arq_env_error_t *err) {
  if (!json_is_string(v))
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"%s\" must be a string", key);
  size_t n = json_string_length(v);
  if (strlen(json_string_value(v)) != n)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"%s\" must not contain a NUL character", key);
  if (n == 0 || n > max)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"%s\" must be 1 to %zu bytes long", key, max);
  *out = json_string_value(v);
  return 0;
}

static int name_field(json_t *v, const char *key, const char **out, arq_env_error_t *err) {
  if (!json_is_string(v))
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"%s\" must be a string", key);
  if (strlen(json_string_value(v)) != json_string_length(v))
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"%s\" must not contain a NUL character", key);
  if (json_string_length(v) > 2 * ARQ_NAME_MAX + 1)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"%s\" is too long (a name is at most %d bytes)", key,
                ARQ_NAME_MAX);
  *out = json_string_value(v);
  return 0;
}

static int split_target(char *room_out, char *channel_out, const char *room, const char *channel,
                        arq_env_error_t *err) {
  char r[ARQ_NAME_MAX + 1] = "", c[ARQ_NAME_MAX + 1] = "";
  if (channel && strchr(channel, ':')) {
    if (arq_names_split(channel, r, c) != 0 || !c[0])
      return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"channel\" \"%.64s\" is not a valid room:channel", channel);
    if (room && strcmp(room, r) != 0)
      return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"room\" \"%.64s\" contradicts \"channel\" \"%.64s\"", room,
                  channel);
  } else if (room && strchr(room, ':')) {
    if (channel)
      return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"room\" may hold room:channel only when \"channel\" is absent");
    if (arq_names_split(room, r, c) != 0 || !c[0])
      return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"room\" \"%.64s\" is not a valid room or room:channel", room);
  } else {
    if (room) {
      if (!arq_names_valid_channel(room, strlen(room)))
        return fail(err, ARQ_CODE_INVALID_ENVELOPE,
                    "\"room\" \"%.64s\" is not a valid name (1-64 of A-Z a-z 0-9 _ - ., starting with a letter "
                    "or digit)",
                    room);
      strcpy(r, room);
    }
    if (channel) {
      if (!arq_names_valid_channel(channel, strlen(channel)))
        return fail(err, ARQ_CODE_INVALID_ENVELOPE,
                    "\"channel\" \"%.64s\" is not a valid name (1-64 of A-Z a-z 0-9 _ - ., starting with a letter "
                    "or digit)",
                    channel);
      strcpy(c, channel);
    }
  }
  if (c[0] && !r[0])
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"channel\" needs a \"room\" (or write \"room:channel\")");
  strcpy(room_out, r);
  strcpy(channel_out, c);
  return 0;
}

int arq_env_target(json_t *room, json_t *channel, char *room_out, char *channel_out, arq_env_error_t *err) {
  const char *r = NULL, *c = NULL;
  err->correlation_id[0] = '\0';
  if ((room && name_field(room, "room", &r, err) != 0) || (channel && name_field(channel, "channel", &c, err) != 0))
    return ARQ_EINVAL;
  return split_target(room_out, channel_out, r, c, err) != 0 ? ARQ_EINVAL : 0;
}

static int recipients(json_t *v, arq_env_error_t *err) {
  if (!json_is_array(v))
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"to\" must be a list of client ids");
  size_t n = json_array_size(v);
  if (n == 0 || n > ARQ_ENV_MAX_TO)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"to\" must list 1 to %d client ids", ARQ_ENV_MAX_TO);
  for (size_t i = 0; i < n; i++) {
    json_t *id = json_array_get(v, i);
    if (!json_is_string(id) || !arq_names_valid_client_id(json_string_value(id), json_string_length(id)))
      return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"to\"[%zu] is not a valid client id", i);
  }
  return 0;
}

static int type_of(json_t *v, arq_msg_type_t *t, arq_env_error_t *err) {
  if (!json_is_string(v))
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"type\" must be a string");
  const char *s = json_string_value(v);
  for (int i = 0; i < ARQ_MSG_NTYPES; i++) {
    if (strcmp(s, type_names[i]) == 0) {
      *t = (arq_msg_type_t)i;
      return 0;
    }
  }
  return fail(err, ARQ_CODE_UNKNOWN_TYPE,
              "unknown type \"%.32s\"; one of event, command, private, telemetry (system and error come from the "
              "server)",
              s);
}

static bool known_key(const char *k) {
  static const char *const keys[] = {"version", "id",      "type",     "room",      "channel",        "from",
                                     "to",      "command", "payload",  "metadata",  "timestamp",      "correlation_id",
                                     "eventType", "position", "ack", NULL};
  for (int i = 0; keys[i]; i++)
    if (strcmp(k, keys[i]) == 0)
      return true;
  return false;
}

static int validate(arq_env_t *e, arq_env_error_t *err) {
  json_t *root = e->root, *v;
  const char *key, *room = NULL, *channel = NULL, *from = NULL;
  bool has_type = false;

  /* The id first, so that every later error can name the message. */
  v = json_object_get(root, "id");
  if (v) {
    if (!json_is_string(v) || !arq_env_valid_id(json_string_value(v)) ||
        strlen(json_string_value(v)) != json_string_length(v))
      return fail(err, ARQ_CODE_INVALID_ENVELOPE,
                  "\"id\" must be \"arq_\" followed by 1-124 of A-Z a-z 0-9 _ - (or be left out)");
    e->id = json_string_value(v);
    snprintf(err->correlation_id, sizeof err->correlation_id, "%s", e->id);
  }
  v = json_object_get(root, "version");
  if (v && version_of(v, &e->minor, err) != 0)
    return ARQ_EINVAL;
  if (v)
    e->version = json_string_value(v);

  json_object_foreach(root, key, v) {
    if (strcmp(key, "type") == 0) {
      if (type_of(v, &e->type, err) != 0)
        return ARQ_EINVAL;
      has_type = true;
    } else if (strcmp(key, "room") == 0) {
      if (name_field(v, key, &room, err) != 0)
        return ARQ_EINVAL;
    } else if (strcmp(key, "channel") == 0) {
      if (name_field(v, key, &channel, err) != 0)
        return ARQ_EINVAL;
    } else if (strcmp(key, "from") == 0) {
      if (string_field(v, key, ARQ_NAME_MAX, &from, err) != 0)
        return ARQ_EINVAL;
    } else if (strcmp(key, "to") == 0) {
      if (recipients(v, err) != 0)
        return ARQ_EINVAL;
      e->to = v;
    } else if (strcmp(key, "command") == 0) {
      if (string_field(v, key, ARQ_ENV_MAX_COMMAND, &e->command, err) != 0)
        return ARQ_EINVAL;
    } else if (strcmp(key, "position") == 0) {
      /* Set by the server; what a client sends (say, forwarding a message it
       * received) is only checked for its type and then replaced or dropped. */
      if (!json_is_string(v))
        return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"position\" must be a string");
    } else if (strcmp(key, "ack") == 0) {
      if (!json_is_boolean(v))
        return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"ack\" must be true or false");
      e->ack = json_is_true(v);
    } else if (strcmp(key, "eventType") == 0) {
      if (string_field(v, key, ARQ_ENV_MAX_EVENT_TYPE, &e->event_type, err) != 0)
        return ARQ_EINVAL;
      if (!arq_names_valid_channel(e->event_type, strlen(e->event_type)))
        return fail(err, ARQ_CODE_INVALID_ENVELOPE,
                    "\"eventType\" must be 1-64 of A-Z a-z 0-9 _ - ., starting with a letter or digit");
    } else if (strcmp(key, "payload") == 0) {
      if (!json_is_object(v))
        return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"payload\" must be an object");
      e->payload = v;
    } else if (strcmp(key, "metadata") == 0) {
      if (!json_is_object(v))
        return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"metadata\" must be an object");
      e->metadata = v;
    } else if (strcmp(key, "timestamp") == 0) {
      if (!json_is_string(v) || !arq_env_valid_timestamp(json_string_value(v)) ||
          strlen(json_string_value(v)) != json_string_length(v))
        return fail(err, ARQ_CODE_INVALID_ENVELOPE,
                    "\"timestamp\" must be ISO-8601 UTC such as \"2026-01-31T12:00:00.000Z\"");
      e->timestamp = json_string_value(v);
    } else if (strcmp(key, "correlation_id") == 0) {
      if (string_field(v, key, ARQ_ENV_MAX_ID, &e->correlation_id, err) != 0)
        return ARQ_EINVAL;
    } else if (!known_key(key) && e->minor == 0) {
      return fail(err, ARQ_CODE_INVALID_ENVELOPE, "unknown field \"%.64s\" in a version 1.0 envelope", key);
    }
  }
  if (!has_type)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"type\" is required (event, command, private or telemetry)");
  if (split_target(e->room, e->channel, room, channel, err) != 0)
    return ARQ_EINVAL;
  if (e->command && e->type != ARQ_MSG_COMMAND)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"command\" belongs to command envelopes only");
  if (e->type == ARQ_MSG_COMMAND && !e->command)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "a command envelope needs \"command\"");
  if (e->to && e->type != ARQ_MSG_PRIVATE)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"to\" belongs to private envelopes only");
  if (e->type == ARQ_MSG_PRIVATE && !e->to)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "a private envelope needs \"to\", a list of client ids");
  if (json_object_get(e->root, "ack") && e->type == ARQ_MSG_COMMAND)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"ack\" belongs to event, private and telemetry envelopes");
  if (e->event_type && e->type != ARQ_MSG_TELEMETRY)
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "\"eventType\" belongs to telemetry envelopes only");
  if (e->type == ARQ_MSG_TELEMETRY && (!e->event_type || !e->payload))
    return fail(err, ARQ_CODE_INVALID_ENVELOPE,
                "a telemetry envelope needs \"eventType\" (a name) and \"payload\" (an object)");
  return 0;
}

/* On the error paths that refuse a message before it is validated (a
 * repeated key, too deep nesting), parses it leniently only to find its id,
 * so that the error still names the message. */
static void correlate(const char *data, size_t len, arq_env_error_t *err) {
  json_t *root = json_loadb(data, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
  json_t *id = json_object_get(root, "id");
  if (json_is_string(id) && arq_env_valid_id(json_string_value(id)) &&
      strlen(json_string_value(id)) == json_string_length(id))
    snprintf(err->correlation_id, sizeof err->correlation_id, "%s", json_string_value(id));
  json_decref(root);
}

int arq_env_parse(arq_env_t *e, const char *data, size_t len, arq_env_error_t *err) {
  memset(e, 0, sizeof *e);
  err->correlation_id[0] = '\0';
  err->message[0] = '\0';
  if (!depth_ok(data, len)) {
    correlate(data, len, err);
    return fail(err, ARQ_CODE_INVALID_ENVELOPE, "nested deeper than %d levels", ARQ_ENV_MAX_DEPTH);
  }
  json_error_t je;
  /* Any JSON value is read, so that "not an object" is told apart from "not
   * JSON"; strings may hold \u0000 (payloads are forwarded as they are). */
  e->root = json_loadb(data, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
  if (!e->root) {
    if (json_error_code(&je) == json_error_duplicate_key) {
      correlate(data, len, err);
      return fail(err, ARQ_CODE_INVALID_ENVELOPE, "%s", je.text);
    }
    return fail(err, ARQ_CODE_INVALID_JSON, "not valid JSON: %s at byte %d", je.text, je.position);
  }
  if (!json_is_object(e->root)) {
    fail(err, ARQ_CODE_INVALID_ENVELOPE, "an envelope is a JSON object");
    goto free_root;
  }
  if (validate(e, err) != 0)
    goto free_root;
  return 0;
free_root:
  arq_env_free(e);
  return ARQ_EINVAL;
}

void arq_env_free(arq_env_t *e) {
  json_decref(e->root);
  e->root = NULL;
}

json_t *arq_env_extra(const arq_env_t *e) {
  if (e->minor == 0)
    return NULL;
  json_t *extra = NULL, *v;
  const char *key;
  json_object_foreach(e->root, key, v) {
    if (known_key(key))
      continue;
    if (!extra)
      extra = json_object();
    json_object_set(extra, key, v);
  }
  return extra;
}

/* ---- building and encoding ---------------------------------------------- */

static void set_str(json_t *o, const char *k, const char *v) {
  if (v && v[0])
    json_object_set_new_nocheck(o, k, json_string_nocheck(v));
}

json_t *arq_env_build(const arq_env_out_t *o) {
  json_t *obj = json_object();
  char version[16];
  snprintf(version, sizeof version, "%d.%u", ARQ_PROTOCOL_MAJOR, o->minor);
  json_object_set_new_nocheck(obj, "version", json_string_nocheck(o->version ? o->version : version));
  set_str(obj, "id", o->id);
  json_object_set_new_nocheck(obj, "type", json_string_nocheck(arq_msg_type_name(o->type)));
  set_str(obj, "eventType", o->event_type);
  set_str(obj, "room", o->room);
  set_str(obj, "channel", o->channel);
  set_str(obj, "from", o->from);
  if (o->to)
    json_object_set_nocheck(obj, "to", o->to);
  set_str(obj, "command", o->command);
  if (o->payload)
    json_object_set_nocheck(obj, "payload", o->payload);
  else
    json_object_set_new_nocheck(obj, "payload", json_object());
  if (o->metadata)
    json_object_set_nocheck(obj, "metadata", o->metadata);
  set_str(obj, "timestamp", o->timestamp);
  set_str(obj, "correlation_id", o->correlation_id);
  if (o->extra) {
    const char *key;
    json_t *v;
    json_object_foreach(o->extra, key, v) json_object_set_nocheck(obj, key, v);
  }
  return obj;
}

void arq_buf_free(arq_buf_t *b) {
  arq_free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

static int append(const char *s, size_t n, void *ud) {
  arq_buf_t *b = ud;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + n)
      cap *= 2;
    b->data = arq_realloc(b->data, cap);
    b->cap = cap;
  }
  memcpy(b->data + b->len, s, n);
  b->len += n;
  return 0;
}

arq_rcbuf_t *arq_env_frame(const json_t *obj, arq_buf_t *scratch, size_t *json_off, size_t *json_len) {
  return arq_env_frame_at(obj, NULL, scratch, json_off, json_len);
}

void arq_env_dump(const json_t *obj, arq_buf_t *scratch) {
  scratch->len = 0;
  json_dump_callback(obj, append, scratch, JSON_COMPACT);
}

arq_rcbuf_t *arq_env_frame_text(const char *json, size_t len, const char *position, size_t *json_off,
                                size_t *json_len) {
  /* A position is added as the last member, by text: the object ends in '}'. */
  char tail[80];
  int n = 0;
  if (position && position[0] && len >= 2) {
    n = snprintf(tail, sizeof tail, "%s\"position\":\"%.48s\"}", len > 2 ? "," : "", position);
    len--; /* the closing brace */
  }
  size_t total = len + (size_t)n;
  uint8_t hdr[14];
  size_t hl = arq_ws_header_encode(hdr, true, ARQ_WS_OP_TEXT, total, NULL);
  arq_rcbuf_t *f = arq_rcbuf_new(hl + total);
  memcpy(f->data, hdr, hl);
  memcpy(f->data + hl, json, len);
  memcpy(f->data + hl + len, tail, (size_t)n);
  *json_off = hl;
  *json_len = total;
  return f;
}

arq_rcbuf_t *arq_env_frame_at(const json_t *obj, const char *position, arq_buf_t *scratch, size_t *json_off,
                              size_t *json_len) {
  /* The JSON text goes to the reused scratch buffer first (its length decides
   * the header), then header and text are copied once into the shared frame. */
  arq_env_dump(obj, scratch);
  return arq_env_frame_text(scratch->data, scratch->len, position, json_off, json_len);
}
