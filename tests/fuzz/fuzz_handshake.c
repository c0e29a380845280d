/* libFuzzer target for the HTTP request-head reader (wire/http) and the
 * WebSocket upgrade check behind it (wire/handshake).
 *
 * The first input byte chooses the read size (1 to 256 bytes, or all at
 * once); the rest is fed in reads of that size, each copied into an
 * allocation of its exact size so that ASan sees any byte read past it, with
 * the head limit at 8192 as on the bus port. A parsed head goes through
 * arq_ws_upgrade_check() and arq_ws_upgrade_response(), a refused one
 * through the error response, as the connection code does. A second reader
 * gets all the bytes at once: the split must not change the outcome.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"
#include "wire/handshake.h"
#include "wire/http.h"

#define MAX_HEAD 8192

static void check(bool ok, const char *what) {
  if (!ok) {
    fprintf(stderr, "fuzz_handshake: %s\n", what);
    abort();
  }
}

static bool slice_in_head(const arq_http_req_t *r, arq_slice_t s) {
  return s.p >= r->head && s.p + s.n <= r->head + r->head_len;
}

/* Feeds 'data' in reads of 'step' bytes. Returns the last return code and
 * sets '*taken' to the bytes the reader took in all. */
static int read_head(arq_http_req_t *r, const uint8_t *data, size_t size, size_t step, size_t *taken) {
  int rc = ARQ_AGAIN;
  size_t pos = 0;
  *taken = 0;
  arq_http_req_init(r, MAX_HEAD);
  do {
    size_t k = size - pos < step ? size - pos : step;
    char *buf = malloc(k ? k : 1);
    check(buf != NULL, "out of memory");
    if (k)
      memcpy(buf, data + pos, k);
    size_t used = (size_t)-1;
    rc = arq_http_req_feed(r, buf, k, &used);
    free(buf);
    check(used <= k, "used past the buffer");
    if (rc == ARQ_AGAIN)
      check(used == k, "ARQ_AGAIN with bytes left");
    *taken += used;
    pos += k;
  } while (rc == ARQ_AGAIN && pos < size);
  return rc;
}

static void use_request(const arq_http_req_t *r) {
  check(r->method != NULL, "no method");
  check(slice_in_head(r, r->url) && slice_in_head(r, r->path) && slice_in_head(r, r->query), "URL outside the head");
  check(r->nheaders <= ARQ_HTTP_MAX_HEADERS, "too many headers");
  for (size_t i = 0; i < r->nheaders; i++)
    check(slice_in_head(r, r->headers[i].name) && slice_in_head(r, r->headers[i].value), "header outside the head");
  arq_slice_t host = arq_http_req_header(r, "host");
  check(host.p == NULL || slice_in_head(r, host), "Host outside the head");
  (void)arq_http_req_has_token(r, "Connection", "upgrade");

  arq_ws_upgrade_t up;
  int rc = arq_ws_upgrade_check(r, &up);
  if (rc == 0) {
    check(up.status == 101 && up.errstr == NULL, "valid upgrade without 101");
    check(strlen(up.accept) == ARQ_WS_ACCEPT_LEN, "accept key length");
  } else {
    check(rc == ARQ_EPROTO, "unexpected return code");
    check(up.status == 400 || up.status == 405 || up.status == 426, "unexpected refusal status");
    check(up.errstr != NULL, "refusal without errstr");
  }
  char out[512];
  size_t n = arq_ws_upgrade_response(&up, rc == 0 ? "arqon.v1" : NULL, out, sizeof out);
  check(n > 0 && n < sizeof out, "response did not fit");
  check(memcmp(out, "HTTP/1.1 ", 9) == 0, "response status line");
  char tiny[16];
  check(arq_ws_upgrade_response(&up, NULL, tiny, sizeof tiny) == 0, "response fitted 16 bytes");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  size_t step = data[0] == 0 ? SIZE_MAX : data[0];
  data++;
  size--;

  arq_http_req_t split, whole;
  size_t split_taken, whole_taken;
  int rc = read_head(&split, data, size, step, &split_taken);
  int whole_rc = read_head(&whole, data, size, SIZE_MAX, &whole_taken);

  check(rc == whole_rc, "the split changed the return code");
  check(split_taken == whole_taken, "the split changed the bytes taken");
  if (rc == ARQ_OK) {
    check(split_taken <= MAX_HEAD, "head over the limit accepted");
    check(split.nheaders == whole.nheaders && split.url.n == whole.url.n, "the split changed the request");
    use_request(&split);
  } else if (rc < 0) {
    check(rc == ARQ_EPROTO || rc == ARQ_ETOOBIG, "unexpected return code");
    check(split.status == (rc == ARQ_ETOOBIG ? 431 : 400), "status does not match the error");
    check(split.status == whole.status, "the split changed the status");
    check(split.errstr != NULL, "error without errstr");
    /* The refusal the bus port sends. */
    arq_ws_upgrade_t up = {.status = split.status, .errstr = split.errstr};
    char out[512];
    check(arq_ws_upgrade_response(&up, NULL, out, sizeof out) > 0, "refusal did not fit");
  } else {
    check(rc == ARQ_AGAIN && split_taken == size, "ARQ_AGAIN with bytes left");
  }
  arq_http_req_free(&split);
  arq_http_req_free(&whole);
  return 0;
}
