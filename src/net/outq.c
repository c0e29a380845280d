/* A connection's outbound queue (see outq.h). */
#include "net/outq.h"

#include <assert.h>

#include "util/alloc.h"

#define MIN_CAP 8

static arq_outq_entry_t *at(const arq_outq_t *q, uint32_t i) { return &q->ring[(q->head + i) & (q->cap - 1)]; }

static void grow(arq_outq_t *q) {
  uint32_t cap = q->cap ? q->cap * 2 : MIN_CAP;
  arq_outq_entry_t *ring = arq_malloc(sizeof(*ring) * cap);
  for (uint32_t i = 0; i < q->count; i++)
    ring[i] = *at(q, i);
  arq_free(q->ring);
  q->ring = ring;
  q->cap = cap;
  q->head = 0;
}

void arq_outq_push(arq_outq_t *q, arq_rcbuf_t *buf) {
  if (q->count == q->cap)
    grow(q);
  *at(q, q->count) = (arq_outq_entry_t){buf, 0};
  q->count++;
  q->bytes += buf->len;
}

unsigned arq_outq_peek(const arq_outq_t *q, unsigned skip, uv_buf_t *iov, unsigned max) {
  unsigned n = 0;
  for (uint32_t i = skip; i < q->count && n < max; i++, n++) {
    const arq_outq_entry_t *e = at(q, i);
    iov[n] = uv_buf_init((char *)e->buf->data + e->off, (unsigned)(e->buf->len - e->off));
  }
  return n;
}

/* An empty ring of the minimum size (128 bytes) is kept for the next burst;
 * a larger one goes, so a connection that once had a backlog does not hold
 * it while idle. Called when the connection is known to be quiet (its
 * heartbeat), not whenever the queue empties: under fan-out a queue empties
 * and refills many times a second, and freeing the ring each time made every
 * burst fault its pages back in. */
void arq_outq_trim(arq_outq_t *q) {
  if (q->count == 0 && q->cap > MIN_CAP) {
    arq_free(q->ring);
    q->ring = NULL;
    q->cap = q->head = 0;
  }
}

unsigned arq_outq_consume(arq_outq_t *q, size_t n) {
  unsigned dropped = 0;
  assert(n <= q->bytes);
  q->bytes -= n;
  while (n > 0) {
    arq_outq_entry_t *e = at(q, 0);
    size_t left = e->buf->len - e->off;
    if (n < left) {
      e->off += n;
      break;
    }
    n -= left;
    arq_rcbuf_unref(e->buf);
    q->head = (q->head + 1) & (q->cap - 1);
    q->count--;
    dropped++;
  }
  return dropped;
}

void arq_outq_truncate(arq_outq_t *q, unsigned keep) {
  while (q->count > keep) {
    arq_outq_entry_t *e = at(q, q->count - 1);
    q->bytes -= e->buf->len - e->off;
    arq_rcbuf_unref(e->buf);
    q->count--;
  }
}

void arq_outq_clear(arq_outq_t *q) {
  arq_outq_truncate(q, 0);
  arq_free(q->ring);
  q->ring = NULL;
  q->cap = q->head = 0;
}
