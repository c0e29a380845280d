/* Incremental UTF-8 validation (see utf8.h).
 *
 * A small state machine: the lead byte sets how many continuation bytes
 * follow and the range the first of them may take (which is how overlongs,
 * surrogates and values past U+10FFFF are refused); ASCII runs are skipped
 * eight bytes at a time, which is what JSON text mostly is.
 */
#include "wire/utf8.h"

#include <string.h>

#include "util/err.h"

int arq_utf8_feed(arq_utf8_t *s, const uint8_t *p, size_t n) {
  size_t i = 0;
  while (i < n) {
    if (s->need == 0) {
      /* Fast path: skip whole words of ASCII. */
      while (i + 8 <= n) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        if (w & 0x8080808080808080ull)
          break;
        i += 8;
      }
      if (i >= n)
        break;
      uint8_t c = p[i++];
      if (c < 0x80)
        continue;
      s->lo = 0x80;
      s->hi = 0xBF;
      if (c >= 0xC2 && c <= 0xDF) {
        s->need = 1;
      } else if (c >= 0xE0 && c <= 0xEF) {
        s->need = 2;
        if (c == 0xE0)
          s->lo = 0xA0; /* no overlongs */
        else if (c == 0xED)
          s->hi = 0x9F; /* no surrogates */
      } else if (c >= 0xF0 && c <= 0xF4) {
        s->need = 3;
        if (c == 0xF0)
          s->lo = 0x90; /* no overlongs */
        else if (c == 0xF4)
          s->hi = 0x8F; /* nothing past U+10FFFF */
      } else {
        return ARQ_EUTF8;
      }
    } else {
      uint8_t c = p[i++];
      if (c < s->lo || c > s->hi)
        return ARQ_EUTF8;
      s->lo = 0x80;
      s->hi = 0xBF;
      s->need--;
    }
  }
  return 0;
}

int arq_utf8_validate(const uint8_t *p, size_t n) {
  arq_utf8_t s;
  arq_utf8_init(&s);
  if (arq_utf8_feed(&s, p, n) != 0 || !arq_utf8_complete(&s))
    return ARQ_EUTF8;
  return 0;
}

void arq_utf8_repair(char *s) {
  size_t n = strlen(s);
  for (size_t i = 0; i < n;) {
    uint8_t c = (uint8_t)s[i];
    size_t len = c < 0x80 ? 1 : c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    if (len > 0 && i + len <= n && arq_utf8_validate((const uint8_t *)s + i, len) == 0) {
      i += len;
    } else {
      s[i++] = '?';
    }
  }
}
