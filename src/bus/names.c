/* Name rules (see names.h). */
#include "bus/names.h"

#include <string.h>

#include "util/err.h"

static bool alnum(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

static bool valid(const char *s, size_t n, const char *extra) {
  if (n == 0 || n > ARQ_NAME_MAX || !alnum((unsigned char)s[0]))
    return false;
  for (size_t i = 1; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!alnum(c) && (c == 0 || !strchr(extra, c)))
      return false;
  }
  return true;
}

bool arq_names_valid_channel(const char *s, size_t n) { return valid(s, n, "_-."); }

bool arq_names_valid_client_id(const char *s, size_t n) { return valid(s, n, "_-.@"); }

int arq_names_split(const char *s, char *room, char *channel) {
  const char *colon = strchr(s, ':');
  size_t rn = colon ? (size_t)(colon - s) : strlen(s);
  if (!arq_names_valid_channel(s, rn))
    return ARQ_EINVAL;
  memcpy(room, s, rn);
  room[rn] = '\0';
  channel[0] = '\0';
  if (!colon)
    return 0;
  const char *c = colon + 1;
  size_t cn = strlen(c);
  if (!arq_names_valid_channel(c, cn))
    return ARQ_EINVAL;
  memcpy(channel, c, cn + 1);
  return 0;
}

int arq_names_hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

long arq_names_unescape(const char *s, size_t n, char *out, size_t cap) {
  size_t o = 0;
  if (cap == 0)
    return -1;
  for (size_t i = 0; i < n; i++) {
    int c = (unsigned char)s[i];
    if (c == '+') {
      c = ' ';
    } else if (c == '%') {
      if (i + 2 >= n)
        return -1;
      int hi = arq_names_hexval(s[i + 1]), lo = arq_names_hexval(s[i + 2]);
      if (hi < 0 || lo < 0)
        return -1;
      c = hi * 16 + lo;
      i += 2;
    }
    if (c == 0 || o + 1 >= cap)
      return -1;
    out[o++] = (char)c;
  }
  out[o] = '\0';
  return (long)o;
}
