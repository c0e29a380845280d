/* Intrusive doubly-linked lists (the shape of the Linux kernel's list.h).
 *
 * A node lives inside the object it links, so linking costs no allocation.
 * Used for the connection sets and the deadline queues of net/: a queue whose
 * entries all share one timeout is ordered by insertion time, so the expired
 * ones are always at the head.
 */
#ifndef ARQ_UTIL_LIST_H
#define ARQ_UTIL_LIST_H

#include <stdbool.h>
#include <stddef.h>

typedef struct arq_list {
  struct arq_list *prev, *next;
} arq_list_t;

#define ARQ_CONTAINER_OF(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* Makes 'l' an empty list (or an unlinked node). */
static inline void arq_list_init(arq_list_t *l) { l->prev = l->next = l; }
static inline bool arq_list_empty(const arq_list_t *l) { return l->next == l; }
/* True when node 'n' is in some list (nodes are initialised unlinked). */
static inline bool arq_list_linked(const arq_list_t *n) { return n->next != n; }

/* Appends 'n' at the tail of 'l'. 'n' must be unlinked. */
static inline void arq_list_push_back(arq_list_t *l, arq_list_t *n) {
  n->prev = l->prev;
  n->next = l;
  l->prev->next = n;
  l->prev = n;
}

/* Unlinks 'n' from its list, if any, and leaves it unlinked. */
static inline void arq_list_remove(arq_list_t *n) {
  n->prev->next = n->next;
  n->next->prev = n->prev;
  n->next = n->prev = n;
}

/* Moves 'n' (linked or not) to the tail of 'l'. */
static inline void arq_list_move_back(arq_list_t *l, arq_list_t *n) {
  arq_list_remove(n);
  arq_list_push_back(l, n);
}

static inline arq_list_t *arq_list_head(const arq_list_t *l) { return l->next == l ? NULL : l->next; }

#define arq_list_foreach_safe(pos, tmp, l) \
  for ((pos) = (l)->next, (tmp) = (pos)->next; (pos) != (l); (pos) = (tmp), (tmp) = (pos)->next)

#endif
