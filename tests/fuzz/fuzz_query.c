/* libFuzzer target for what a client puts in its upgrade request besides the
 * handshake itself: the query string of the bus port (arq_bus_parse_params,
 * bus/params.c), the query string of the telemetry port
 * (arq_telemetry_parse_query, net/telemetry.c) and the Origin check
 * (arq_ws_origin_allowed and arq_ws_origin_valid, wire/handshake.c).
 *
 * The first input byte chooses the target; the rest is copied into an
 * allocation of its exact size so that ASan sees any byte read past it. For
 * the Origin check the rest is split at the first two NUL bytes into the
 * Origin, the Host and the allowed_origins list. Checked whatever the input:
 * a refusal comes with one terminated line; accepted parameters are what the
 * protocol allows (valid names, bounded lengths, no control characters); the
 * Origin check accepts every request without Origin, every valid item
 * matches itself, and "*" accepts everything.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bus/bus.h"
#include "bus/names.h"
#include "net/telemetry.h"
#include "util/err.h"
#include "wire/handshake.h"

static void check(bool ok, const char *what) {
  if (!ok) {
    fprintf(stderr, "fuzz_query: %s\n", what);
    abort();
  }
}

/* A refusal comes with one terminated line of at most 'cap' - 1 bytes. */
static void check_message(const char *err, size_t cap, bool refused) {
  if (!refused)
    return;
  const char *nul = memchr(err, '\0', cap);
  check(nul != NULL, "the message is not terminated");
  check(nul > err && memchr(err, '\n', (size_t)(nul - err)) == NULL, "a refusal without a one-line message");
}

static bool no_controls(const char *s) {
  for (const unsigned char *p = (const unsigned char *)s; *p; p++)
    if (*p < 0x20 || *p == 0x7f)
      return false;
  return true;
}

static void fuzz_params(const char *q, size_t n) {
  arq_client_params_t p;
  char err[256];
  memset(err, '#', sizeof err);
  int rc = arq_bus_parse_params(q, n, &p, err, sizeof err);
  check(rc == 0 || rc == ARQ_EINVAL, "an unexpected return code");
  check_message(err, sizeof err, rc != 0);
  if (rc != 0)
    return;
  check(!p.client_id[0] || arq_names_valid_client_id(p.client_id, strlen(p.client_id)), "an invalid client_id");
  check((unsigned)p.type < ARQ_CLIENT_NTYPES, "an invalid client_type");
  check(!p.room[0] == !p.channel[0], "a room without a channel");
  check(!p.room[0] || (arq_names_valid_channel(p.room, strlen(p.room)) &&
                       arq_names_valid_channel(p.channel, strlen(p.channel))),
        "an invalid initial channel");
  check(no_controls(p.screen_name) && no_controls(p.avatar) && no_controls(p.personality),
        "a control character in a name");
}

static void fuzz_telemetry(const char *q, size_t n) {
  uint32_t mask = 0xdeadbeef;
  char err[256];
  memset(err, '#', sizeof err);
  int rc = arq_telemetry_parse_query(q, n, &mask, err, sizeof err);
  check(rc == 0 || rc == ARQ_EINVAL, "an unexpected return code");
  check_message(err, sizeof err, rc != 0);
  if (rc == 0)
    check(mask != 0 && (mask & ~((1u << ARQ_TEL_NEVENTS) - 1)) == 0, "a mask with unknown kinds");
}

/* Copies 'n' bytes into an allocation of their exact size (NULL for none). */
static char *exact(const char *s, size_t n) {
  char *p = malloc(n ? n : 1);
  check(p != NULL, "out of memory");
  memcpy(p, s, n);
  return p;
}

static void fuzz_origin(const char *d, size_t n) {
  const char *end = d + n, *z1 = memchr(d, '\0', n);
  const char *host = z1 ? z1 + 1 : end;
  const char *z2 = host < end ? memchr(host, '\0', (size_t)(end - host)) : NULL;
  const char *list = z2 ? z2 + 1 : end;
  size_t on = (size_t)((z1 ? z1 : end) - d), hn = (size_t)((z2 ? z2 : end) - host);
  char *origin = exact(d, on), *h = exact(host, hn);
  /* The list is a C string, as the configuration holds it. */
  char *allowed = malloc((size_t)(end - list) + 1);
  check(allowed != NULL, "out of memory");
  memcpy(allowed, list, (size_t)(end - list));
  allowed[end - list] = '\0';

  check(arq_ws_origin_allowed(NULL, 0, h, hn, allowed), "a request without Origin refused");
  check(arq_ws_origin_allowed(origin, on, h, hn, "*"), "\"*\" refused an Origin");
  (void)arq_ws_origin_allowed(origin, on, h, hn, allowed);
  (void)arq_ws_origin_allowed(origin, on, h, hn, "");
  if (arq_ws_origin_valid(origin, on)) {
    char *self = malloc(on + 1);
    check(self != NULL, "out of memory");
    memcpy(self, origin, on);
    self[on] = '\0';
    check(memchr(origin, ',', on) == NULL, "a valid item with a comma");
    check(arq_ws_origin_allowed(origin, on, h, hn, self), "a valid item does not match itself");
    free(self);
  }
  free(origin);
  free(h);
  free(allowed);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  uint8_t target = data[0] % 3;
  char *rest = exact((const char *)data + 1, size - 1);
  if (target == 0)
    fuzz_params(rest, size - 1);
  else if (target == 1)
    fuzz_telemetry(rest, size - 1);
  else
    fuzz_origin(rest, size - 1);
  free(rest);
  return 0;
}
