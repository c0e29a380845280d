/* The WebSocket opening handshake (RFC 6455 section 4.2), server side.
 *
 * Takes a parsed request head (wire/http.h), decides whether it is a valid
 * upgrade, and writes either the 101 response or the HTTP error that says
 * what was wrong: 405 for a method other than GET, 426 with
 * "Sec-WebSocket-Version: 13" for another protocol version, 400 otherwise.
 */
#ifndef ARQ_WIRE_HANDSHAKE_H
#define ARQ_WIRE_HANDSHAKE_H

#include <stddef.h>

#include "wire/http.h"

#define ARQ_WS_ACCEPT_LEN 28 /* base64 of a SHA-1 digest */

typedef struct arq_ws_upgrade {
  int status;          /* 101 when valid, else the HTTP error status */
  const char *errstr;  /* why it is not valid (static), NULL when valid */
  char accept[ARQ_WS_ACCEPT_LEN + 1];
} arq_ws_upgrade_t;

/* Checks 'req' as a WebSocket upgrade and fills 'up'. Returns 0 when valid,
 * ARQ_EPROTO otherwise (up->status and up->errstr say why). */
int arq_ws_upgrade_check(const arq_http_req_t *req, arq_ws_upgrade_t *up);

/* Computes Sec-WebSocket-Accept for the client's 'key' ('n' bytes) into
 * 'out' (ARQ_WS_ACCEPT_LEN + 1 bytes, NUL-terminated). */
void arq_ws_accept_key(const char *key, size_t n, char *out);

/* Writes the response for 'up' into 'out' ('cap' bytes): the 101 with the
 * accept key (and 'protocol' as Sec-WebSocket-Protocol when not NULL), or the
 * error with a short text body. Returns the length, 0 if 'cap' is too small. */
size_t arq_ws_upgrade_response(const arq_ws_upgrade_t *up, const char *protocol, char *out, size_t cap);

#endif
