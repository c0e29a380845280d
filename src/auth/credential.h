/* Finding a client's credential in its WebSocket upgrade request (see
 * credential.c for the three places and their order). No I/O.
 */
#ifndef ARQ_AUTH_CREDENTIAL_H
#define ARQ_AUTH_CREDENTIAL_H

#include <stddef.h>

#include "bus/names.h"
#include "wire/http.h"

typedef enum {
  ARQ_CRED_NONE = 0,  /* no credential anywhere */
  ARQ_CRED_HEADER,    /* Authorization: Bearer */
  ARQ_CRED_PROTOCOL,  /* a "bearer.<credential>" entry of Sec-WebSocket-Protocol */
  ARQ_CRED_QUERY,     /* the token query parameter */
  ARQ_CRED_MALFORMED, /* an Authorization header that is not "Bearer <credential>", or a badly encoded token= */
} arq_cred_source_t;

/* The subprotocol the server selects when a client offers it (browsers that
 * send their credential as a subprotocol must offer one the server accepts). */
#define ARQ_SUBPROTOCOL "arqonbus"

/* Finds the credential in 'req'. Sets '*cred' and '*len' to it: a slice of
 * the request, or of 'buf' ('cap' bytes) for a percent-decoded query
 * parameter. Returns where it was found. */
arq_cred_source_t arq_credential_find(const arq_http_req_t *req, char *buf, size_t cap, const char **cred,
                                      size_t *len);

#endif
