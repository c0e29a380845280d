/* Allocation for the whole server.
 *
 * Out of memory aborts with the requested size in the message: a message bus
 * that cannot allocate a few bytes cannot keep any promise to its clients, and
 * every call site stays free of impossible error paths. Sizes that a peer
 * controls are checked against configured limits before they get here.
 *
 * Tests can install a failing allocator with arq_alloc_set_hooks() to drive
 * the abort path or to count allocations.
 */
#ifndef ARQ_UTIL_ALLOC_H
#define ARQ_UTIL_ALLOC_H

#include <stddef.h>

/* Returns a block of 'size' bytes (caller owns); never NULL. */
void *arq_malloc(size_t size);
/* Returns 'n' * 'size' zeroed bytes (caller owns); never NULL; aborts on overflow. */
void *arq_calloc(size_t n, size_t size);
/* Resizes 'ptr' (may be NULL) to 'size' bytes; never NULL. */
void *arq_realloc(void *ptr, size_t size);
/* Returns a copy of the NUL-terminated 's' (caller owns). */
char *arq_strdup(const char *s);
/* Returns a NUL-terminated copy of the first 'n' bytes of 's' (caller owns). */
char *arq_strndup(const char *s, size_t n);
/* Releases 'ptr' (NULL is fine). */
void arq_free(void *ptr);

typedef struct arq_alloc_hooks {
  void *(*malloc_fn)(size_t);
  void *(*realloc_fn)(void *, size_t);
  void (*free_fn)(void *);
} arq_alloc_hooks_t;

/* Replaces the allocator ('hooks' borrowed, NULL restores libc). For tests. */
void arq_alloc_set_hooks(const arq_alloc_hooks_t *hooks);

#endif
