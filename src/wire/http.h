/* HTTP/1.1 request heads, parsed with llhttp, and response heads.
 *
 * Both the WebSocket upgrade on the bus and telemetry ports and the requests
 * of the ops port go through here. The head (request line and headers) is
 * collected until its blank line, bounded by a size limit so that a peer can
 * never make us hold more than that; then llhttp parses it in one pass and the
 * URL and header values are kept as slices of the collected bytes. Bodies are
 * not read: no endpoint takes one.
 */
#ifndef ARQ_WIRE_HTTP_H
#define ARQ_WIRE_HTTP_H

#include <stdbool.h>
#include <stddef.h>

#define ARQ_HTTP_MAX_HEADERS 64

typedef struct arq_slice {
  const char *p;
  size_t n;
} arq_slice_t;

typedef struct arq_http_header {
  arq_slice_t name;
  arq_slice_t value;
} arq_http_header_t;

typedef struct arq_http_req {
  size_t max_head;       /* limit on the head in bytes */
  char *head;            /* collected bytes (owned) */
  size_t head_len;
  size_t head_cap;
  size_t scanned;        /* bytes already searched for the blank line */
  /* results, valid once arq_http_req_feed() returned ARQ_OK */
  const char *method;    /* "GET", "POST", ... (static) */
  arq_slice_t url;       /* request target as sent */
  arq_slice_t path;      /* target up to '?' */
  arq_slice_t query;     /* after '?', empty when none */
  int http_major;
  int http_minor;
  size_t nheaders;
  arq_http_header_t headers[ARQ_HTTP_MAX_HEADERS];
  /* error */
  int status;            /* HTTP status to answer with after an error */
  const char *errstr;
} arq_http_req_t;

/* Prepares 'r' to read one request head of at most 'max_head' bytes. */
void arq_http_req_init(arq_http_req_t *r, size_t max_head);
/* Releases what 'r' holds (the slices become invalid). */
void arq_http_req_free(arq_http_req_t *r);

/* Feeds 'len' bytes. Sets '*used' to the bytes taken: on ARQ_OK, bytes past
 * the head are not taken and belong to what follows (WebSocket frames).
 * Returns ARQ_OK when the head is complete and parsed, ARQ_AGAIN when more
 * bytes are needed, ARQ_ETOOBIG when the head is over the limit (status 431)
 * or ARQ_EPROTO when it is not valid HTTP/1.x (status 400). */
int arq_http_req_feed(arq_http_req_t *r, const char *data, size_t len, size_t *used);

/* Returns the value of header 'name' (case-insensitive), or a NULL slice. */
arq_slice_t arq_http_req_header(const arq_http_req_t *r, const char *name);
/* True when the comma-separated header 'name' holds 'token' (case-insensitive),
 * in any of its occurrences. */
bool arq_http_req_has_token(const arq_http_req_t *r, const char *name, const char *token);

/* Returns the standard reason phrase for 'status' ("Not Found"). */
const char *arq_http_reason(int status);

/* Writes a whole response into 'out' ('cap' bytes): status line, Server,
 * Content-Type, Content-Length, Connection: close, 'extra_headers' (zero or
 * more "Name: value\r\n" lines, may be NULL), blank line and 'body'. With
 * 'body' NULL only the head is written (Content-Length still 'body_len').
 * Returns the length, or 0 when 'cap' is too small. */
size_t arq_http_response(char *out, size_t cap, int status, const char *content_type, const char *extra_headers,
                         const char *body, size_t body_len);

#endif
