/* redis:// URLs, parsed without any I/O (the configuration checks them). */
#ifndef ARQ_STORE_REDIS_URL_H
#define ARQ_STORE_REDIS_URL_H

#include <stddef.h>

/* Where a redis:// URL points. */
typedef struct arq_redis_url {
  char host[256];
  int port;
  int db;
  char password[256];
} arq_redis_url_t;

/* Parses "redis://[:password@]host[:port][/db]" into 'u'. Returns 0, or
 * ARQ_EINVAL with one line in 'err'. */
int arq_redis_parse_url(const char *url, arq_redis_url_t *u, char *err, size_t errcap);

#endif
