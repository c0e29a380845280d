/* Reference-counted byte buffers.
 *
 * A message published to many connections is encoded and framed once into an
 * arq_rcbuf_t; each connection's outbound queue takes a reference and drops it
 * when the write completes. Nobody copies the bytes per recipient.
 *
 * The count is not atomic: a buffer belongs to one event loop. A multi-loop
 * server hands buffers between loops through queues and must switch to
 * atomics here first.
 */
#ifndef ARQ_UTIL_RCBUF_H
#define ARQ_UTIL_RCBUF_H

#include <stddef.h>
#include <stdint.h>

typedef struct arq_rcbuf {
  uint32_t refs;
  size_t len;
  uint8_t data[];
} arq_rcbuf_t;

/* Returns a buffer of 'len' uninitialised bytes with one reference (caller owns). */
arq_rcbuf_t *arq_rcbuf_new(size_t len);
/* Takes one more reference on 'b' and returns it. */
static inline arq_rcbuf_t *arq_rcbuf_ref(arq_rcbuf_t *b) {
  b->refs++;
  return b;
}
/* Drops one reference on 'b'; frees it when the last one goes. */
void arq_rcbuf_unref(arq_rcbuf_t *b);

#endif
