/* A connection's outbound queue: shared frames waiting to be written.
 *
 * Entries are references to arq_rcbuf_t frames (one frame, many queues), kept
 * in a ring that grows on demand and is trimmed back to a few entries at the
 * connection's heartbeat when empty, so an idle connection holds almost no
 * queue memory. The writer takes a batch from the head as
 * an iovec array (one writev for many frames), then reports how many bytes
 * went out; fully written frames are unreferenced, a partly written one keeps
 * its offset.
 */
#ifndef ARQ_NET_OUTQ_H
#define ARQ_NET_OUTQ_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "util/rcbuf.h"

typedef struct arq_outq_entry {
  arq_rcbuf_t *buf;
  size_t off; /* bytes of buf already written */
} arq_outq_entry_t;

typedef struct arq_outq {
  arq_outq_entry_t *ring; /* owned; NULL when empty */
  uint32_t head;
  uint32_t count;
  uint32_t cap;           /* power of two */
  size_t bytes;           /* unwritten bytes over all entries */
} arq_outq_t;

/* Appends a reference to 'buf' (takes ownership of one reference). */
void arq_outq_push(arq_outq_t *q, arq_rcbuf_t *buf);
/* Fills up to 'max' iovecs from the head, skipping the first 'skip' entries,
 * and returns how many were filled. The bytes stay queued. */
unsigned arq_outq_peek(const arq_outq_t *q, unsigned skip, uv_buf_t *iov, unsigned max);
/* Marks 'n' bytes from the head as written, dropping finished entries.
 * Returns how many entries were dropped. */
unsigned arq_outq_consume(arq_outq_t *q, size_t n);
/* Drops every entry after the first 'keep' (unreferenced). */
void arq_outq_truncate(arq_outq_t *q, unsigned keep);
/* Drops everything and releases the ring. */
void arq_outq_clear(arq_outq_t *q);

/* Frees a ring larger than the minimum if the queue is empty. */
void arq_outq_trim(arq_outq_t *q);

#endif
