/* Reference-counted byte buffers (see rcbuf.h). */
#include "util/rcbuf.h"

#include <assert.h>

#include "util/alloc.h"

arq_rcbuf_t *arq_rcbuf_new(size_t len) {
  arq_rcbuf_t *b = arq_malloc(sizeof(*b) + len);
  b->refs = 1;
  b->len = len;
  return b;
}

void arq_rcbuf_unref(arq_rcbuf_t *b) {
  assert(b->refs > 0);
  if (--b->refs == 0)
    arq_free(b);
}
