/* The WebSocket opening handshake (RFC 6455 section 4.2), server side.
 *
 * Takes a parsed request head (wire/http.h), decides whether it is a valid
 * upgrade, and writes either the 101 response or the HTTP error that says
 * what was wrong: 405 for a method other than GET, 426 with
 * "Sec-WebSocket-Version: 13" for another protocol version, 400 otherwise.
 */
#ifndef ARQ_WIRE_HANDSHAKE_H
#define ARQ_WIRE_HANDSHAKE_H

#include <stdbool.h>
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

/* Checks one item of the allowed_origins setting ('n' bytes at 'item'): "*",
 * "null", or an origin scheme://host[:port] with nothing after it (no path,
 * no user). Returns true when it is one of those. */
bool arq_ws_origin_valid(const char *item, size_t n);

/* Decides whether a browser may open a WebSocket from 'origin' (the Origin
 * header, 'on' bytes; NULL when the request has none) to the server named by
 * 'host' (the Host header, 'hn' bytes). 'allowed' is the allowed_origins
 * setting: comma-separated items (arq_ws_origin_valid), or "" (NULL too).
 *
 * A request without Origin comes from a non-browser client and always passes.
 * With "" it passes only when the Origin names the same host and port as
 * Host (same origin; a missing port is the scheme's default: 80 for http and
 * ws, 443 for https and wss). Otherwise it passes when an item is "*" or
 * equals the Origin (scheme and host compared without regard to case, ports
 * by value, so "https://a.example" and "https://A.example:443" are equal). */
bool arq_ws_origin_allowed(const char *origin, size_t on, const char *host, size_t hn, const char *allowed);

#endif
