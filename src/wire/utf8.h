/* Incremental UTF-8 validation (RFC 3629) for WebSocket text messages.
 *
 * The state survives between calls, so a code point split across frames or
 * across reads is validated as one: feed every fragment of a message in
 * order, then check arq_utf8_complete() at the end of the message. Overlong
 * forms, surrogates (U+D800..U+DFFF) and code points above U+10FFFF fail.
 */
#ifndef ARQ_WIRE_UTF8_H
#define ARQ_WIRE_UTF8_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct arq_utf8 {
  uint8_t need; /* continuation bytes still expected */
  uint8_t lo;   /* allowed range of the next continuation byte */
  uint8_t hi;
} arq_utf8_t;

/* Resets 's' to the start of a text. */
static inline void arq_utf8_init(arq_utf8_t *s) { *s = (arq_utf8_t){0, 0x80, 0xBF}; }
/* Validates the next 'n' bytes of the text. Returns 0, or ARQ_EUTF8 as soon as
 * the bytes cannot be the prefix of valid UTF-8 (the state is then undefined). */
int arq_utf8_feed(arq_utf8_t *s, const uint8_t *p, size_t n);
/* True when the bytes fed so far end on a code point boundary. */
static inline bool arq_utf8_complete(const arq_utf8_t *s) { return s->need == 0; }
/* Validates a whole text at once. Returns 0 or ARQ_EUTF8. */
int arq_utf8_validate(const uint8_t *p, size_t n);
/* Replaces, in place, every byte of the NUL-terminated 's' that is not part
 * of a valid UTF-8 sequence with '?' (for text built from what a peer sent,
 * such as a quoted name cut at a byte limit). */
void arq_utf8_repair(char *s);

#endif
