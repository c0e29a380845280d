/* Where a client puts its credential in the WebSocket upgrade request.
 *
 * Three places, looked at in this order:
 *
 *   Authorization: Bearer <credential>           any client that sets headers
 *   Sec-WebSocket-Protocol: arqonbus, bearer.<credential>
 *                                                 browsers (their WebSocket API
 *                                                 sets no other header)
 *   GET /?token=<credential>                      anything else; URLs end up in
 *                                                 logs of proxies, so last
 *
 * The credential is an opaque string here; auth.c decides what it is.
 */
#include "auth/credential.h"

#include <string.h>
#include <strings.h>

#define BEARER_PROTOCOL "bearer."

/* Finds the first "bearer.<credential>" entry of the comma-separated header
 * values 'v' ('n' bytes). */
static bool protocol_entry(const char *v, size_t n, const char **cred, size_t *len) {
  const char *end = v + n;
  while (v < end) {
    const char *comma = memchr(v, ',', (size_t)(end - v));
    const char *e = comma ? comma : end;
    const char *s = v;
    while (s < e && (*s == ' ' || *s == '\t'))
      s++;
    const char *t = e;
    while (t > s && (t[-1] == ' ' || t[-1] == '\t'))
      t--;
    size_t plen = sizeof BEARER_PROTOCOL - 1;
    if ((size_t)(t - s) > plen && strncasecmp(s, BEARER_PROTOCOL, plen) == 0) {
      *cred = s + plen;
      *len = (size_t)(t - s) - plen;
      return true;
    }
    v = e + 1;
  }
  return false;
}

/* Finds the query parameter 'token' and decodes it into 'buf'. */
static int query_token(arq_slice_t q, char *buf, size_t cap, const char **cred, size_t *len) {
  const char *p = q.p, *end = q.p + q.n;
  while (p < end) {
    const char *amp = memchr(p, '&', (size_t)(end - p));
    const char *e = amp ? amp : end;
    if ((size_t)(e - p) >= 6 && memcmp(p, "token=", 6) == 0) {
      long n = arq_names_unescape(p + 6, (size_t)(e - p - 6), buf, cap);
      if (n < 0)
        return ARQ_CRED_MALFORMED;
      *cred = buf;
      *len = (size_t)n;
      return ARQ_CRED_QUERY;
    }
    p = e + 1;
  }
  return ARQ_CRED_NONE;
}

arq_cred_source_t arq_credential_find(const arq_http_req_t *req, char *buf, size_t cap, const char **cred,
                                      size_t *len) {
  *cred = NULL;
  *len = 0;
  arq_slice_t h = arq_http_req_header(req, "Authorization");
  if (h.p) {
    const char *v = h.p, *end = h.p + h.n;
    if (h.n < 7 || strncasecmp(v, "Bearer ", 7) != 0)
      return ARQ_CRED_MALFORMED;
    v += 7;
    while (v < end && *v == ' ')
      v++;
    while (end > v && (end[-1] == ' ' || end[-1] == '\t'))
      end--;
    if (v == end)
      return ARQ_CRED_MALFORMED;
    *cred = v;
    *len = (size_t)(end - v);
    return ARQ_CRED_HEADER;
  }
  for (size_t i = 0; i < req->nheaders; i++) {
    const arq_http_header_t *hd = &req->headers[i];
    if (hd->name.n == 22 && strncasecmp(hd->name.p, "Sec-WebSocket-Protocol", 22) == 0 &&
        protocol_entry(hd->value.p, hd->value.n, cred, len))
      return ARQ_CRED_PROTOCOL;
  }
  return (arq_cred_source_t)query_token(req->query, buf, cap, cred, len);
}
