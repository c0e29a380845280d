/* Connection identity from the upgrade request's query string.
 *
 *   client_id    a client id (names.h); assigned by the server when absent
 *   client_type  human (default), ai-agent, dashboard or service
 *   screen_name  1-128 bytes, avatar and personality 1-512 bytes: UTF-8
 *                without control characters
 *   channel      the initial channel, "room:channel"; or room= and channel=
 *   echo         true/false (default false): deliver the client's own events
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "bus/bus_int.h"
#include "util/err.h"
#include "wire/utf8.h"

static const char *const type_names[ARQ_CLIENT_NTYPES] = {"human", "ai-agent", "dashboard", "service"};

arq_client_type_t arq_client_type_parse(const char *name) {
  for (int t = 0; t < ARQ_CLIENT_NTYPES; t++)
    if (strcmp(name, type_names[t]) == 0)
      return (arq_client_type_t)t;
  return ARQ_CLIENT_HUMAN;
}

const char *arq_client_type_name(arq_client_type_t t) {
  return (unsigned)t < ARQ_CLIENT_NTYPES ? type_names[t] : "human";
}

static int bad(char *err, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int bad(char *err, size_t cap, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, cap, fmt, ap);
  va_end(ap);
  /* It becomes the one-line body of a 400: what it quotes of the request
   * may hold any byte. */
  for (char *p = err; cap > 0 && *p; p++)
    if ((unsigned char)*p < 0x20 || *p == 0x7f)
      *p = '?';
  return ARQ_EINVAL;
}

/* UTF-8 without control characters: C0, DEL, and C1 (U+0080-U+009F, which
 * UTF-8 writes as 0xC2 0x80-0x9F). */
static bool printable_utf8(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c < 0x20 || c == 0x7f || (c == 0xC2 && i + 1 < n && (unsigned char)s[i + 1] <= 0x9F))
      return false;
  }
  return arq_utf8_validate((const uint8_t *)s, n) == 0;
}

static bool boolean(const char *v, bool *out) {
  if (!strcmp(v, "true") || !strcmp(v, "1") || !strcmp(v, "yes") || !strcmp(v, "on")) {
    *out = true;
    return true;
  }
  if (!strcmp(v, "false") || !strcmp(v, "0") || !strcmp(v, "no") || !strcmp(v, "off")) {
    *out = false;
    return true;
  }
  return false;
}

static int text_param(const char *name, const char *v, size_t n, char *out, size_t cap, char *err, size_t errcap) {
  if (n == 0 || n >= cap || !printable_utf8(v, n))
    return bad(err, errcap, "query parameter %s must be 1 to %zu bytes of UTF-8 text without control characters",
               name, cap - 1);
  memcpy(out, v, n + 1);
  return 0;
}

int arq_bus_parse_params(const char *q, size_t n, arq_client_params_t *p, char *err, size_t errcap) {
  memset(p, 0, sizeof *p);
  char room[ARQ_NAME_MAX + 1] = "", channel[2 * ARQ_NAME_MAX + 2] = "";
  char value[1024];
  const char *end = q + n;
  while (q < end) {
    const char *amp = memchr(q, '&', (size_t)(end - q));
    const char *pe = amp ? amp : end;
    const char *eq = memchr(q, '=', (size_t)(pe - q));
    const char *key = q;
    size_t klen = (size_t)((eq ? eq : pe) - q);
    q = amp ? amp + 1 : end;
    if (klen == 0)
      continue;
    long vn = 0;
    if (eq) {
      vn = arq_names_unescape(eq + 1, (size_t)(pe - eq - 1), value, sizeof value);
    } else {
      value[0] = '\0';
    }
#define IS(k) (klen == sizeof(k) - 1 && memcmp(key, k, klen) == 0)
    if (!IS("client_id") && !IS("client_type") && !IS("screen_name") && !IS("avatar") && !IS("personality") &&
        !IS("room") && !IS("channel") && !IS("echo"))
      continue; /* other parameters (tokens, cache busters) are not ours */
    if (vn < 0)
      return bad(err, errcap, "query parameter %.*s is badly encoded or too long", (int)klen, key);
    size_t len = (size_t)vn;
    if (IS("client_id")) {
      if (!arq_names_valid_client_id(value, len))
        return bad(err, errcap,
                   "query parameter client_id must be 1-64 of A-Z a-z 0-9 _ - . @, starting with a letter or digit");
      memcpy(p->client_id, value, len + 1);
    } else if (IS("client_type")) {
      int t;
      for (t = 0; t < ARQ_CLIENT_NTYPES; t++)
        if (!strcmp(value, type_names[t]))
          break;
      if (t == ARQ_CLIENT_NTYPES)
        return bad(err, errcap, "query parameter client_type must be human, ai-agent, dashboard or service");
      p->type = (arq_client_type_t)t;
    } else if (IS("screen_name")) {
      if (text_param("screen_name", value, len, p->screen_name, sizeof p->screen_name, err, errcap))
        return ARQ_EINVAL;
    } else if (IS("avatar")) {
      if (text_param("avatar", value, len, p->avatar, sizeof p->avatar, err, errcap))
        return ARQ_EINVAL;
    } else if (IS("personality")) {
      if (text_param("personality", value, len, p->personality, sizeof p->personality, err, errcap))
        return ARQ_EINVAL;
    } else if (IS("room")) {
      if (!arq_names_valid_channel(value, len))
        return bad(err, errcap, "query parameter room is not a valid room name");
      memcpy(room, value, len + 1);
    } else if (IS("channel")) {
      if (len == 0)
        return bad(err, errcap, "query parameter channel must not be empty");
      if (len >= sizeof channel)
        return bad(err, errcap, "query parameter channel is too long");
      memcpy(channel, value, len + 1);
    } else if (IS("echo")) {
      if (!boolean(value, &p->echo))
        return bad(err, errcap, "query parameter echo must be true or false");
    }
#undef IS
  }
  if (channel[0]) {
    char r[ARQ_NAME_MAX + 1], c[ARQ_NAME_MAX + 1];
    if (strchr(channel, ':')) {
      if (arq_names_split(channel, r, c) != 0 || !c[0] || (room[0] && strcmp(room, r) != 0))
        return bad(err, errcap, "query parameter channel must be room:channel with valid names");
    } else {
      if (!room[0] || !arq_names_valid_channel(channel, strlen(channel)))
        return bad(err, errcap, "query parameter channel needs room= (or write channel=room:channel)");
      strcpy(r, room);
      strcpy(c, channel);
    }
    strcpy(p->room, r);
    strcpy(p->channel, c);
  } else if (room[0]) {
    return bad(err, errcap, "query parameter room needs channel= as well");
  }
  return 0;
}
