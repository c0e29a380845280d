/* Allocation wrappers: abort on out-of-memory, hookable for tests. */
#include "util/alloc.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static arq_alloc_hooks_t hooks = {malloc, realloc, free};

static void oom(size_t size) {
  fprintf(stderr, "arqonbus: out of memory allocating %zu bytes\n", size);
  abort();
}

void *arq_malloc(size_t size) {
  void *p = hooks.malloc_fn(size ? size : 1);
  if (p == NULL)
    oom(size);
  return p;
}

void *arq_calloc(size_t n, size_t size) {
  if (size != 0 && n > SIZE_MAX / size)
    oom(SIZE_MAX);
  void *p = arq_malloc(n * size);
  memset(p, 0, n * size);
  return p;
}

void *arq_realloc(void *ptr, size_t size) {
  void *p = hooks.realloc_fn(ptr, size ? size : 1);
  if (p == NULL)
    oom(size);
  return p;
}

char *arq_strdup(const char *s) { return arq_strndup(s, strlen(s)); }

char *arq_strndup(const char *s, size_t n) {
  char *p = arq_malloc(n + 1);
  memcpy(p, s, n);
  p[n] = '\0';
  return p;
}

void arq_free(void *ptr) { hooks.free_fn(ptr); }

void arq_alloc_set_hooks(const arq_alloc_hooks_t *h) {
  if (h == NULL) {
    hooks = (arq_alloc_hooks_t){malloc, realloc, free};
    return;
  }
  hooks = *h;
}
