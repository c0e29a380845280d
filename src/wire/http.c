/* HTTP/1.1 request heads with llhttp (see http.h). */
#include "wire/http.h"

#include <llhttp.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "util/alloc.h"
#include "util/err.h"

void arq_http_req_init(arq_http_req_t *r, size_t max_head) {
  memset(r, 0, sizeof(*r));
  r->max_head = max_head;
}

void arq_http_req_free(arq_http_req_t *r) {
  arq_free(r->head);
  r->head = NULL;
  r->head_len = r->head_cap = 0;
}

/* llhttp callbacks: each span arrives whole because the whole head is parsed
 * in one llhttp_execute() call, so the slices point into r->head. */
static arq_http_req_t *req_of(llhttp_t *p) { return p->data; }

static int on_url(llhttp_t *p, const char *at, size_t n) {
  req_of(p)->url = (arq_slice_t){at, n};
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n) {
  arq_http_req_t *r = req_of(p);
  if (r->nheaders == ARQ_HTTP_MAX_HEADERS)
    return -1;
  /* llhttp 8 lets "Name :" through; RFC 7230 section 3.2.4 says to refuse
   * whitespace before the colon with 400. */
  if (n > 0 && (at[n - 1] == ' ' || at[n - 1] == '\t'))
    return -1;
  r->headers[r->nheaders].name = (arq_slice_t){at, n};
  r->headers[r->nheaders].value = (arq_slice_t){at + n, 0};
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
  arq_http_header_t *h = &req_of(p)->headers[req_of(p)->nheaders];
  /* A second span for the same value is an obsolete line fold. RFC 7230
   * section 3.2.4 lets a server refuse it with 400; keeping only the last
   * line would silently drop the first. */
  if (h->value.p != h->name.p + h->name.n)
    return -1;
  h->value = (arq_slice_t){at, n};
  return 0;
}

static int on_header_value_complete(llhttp_t *p) {
  arq_http_req_t *r = req_of(p);
  /* llhttp strips the whitespace before a value but not after it, and the
   * value excludes both (RFC 7230 section 3.2.4). */
  arq_slice_t *v = &r->headers[r->nheaders].value;
  while (v->n > 0 && (v->p[v->n - 1] == ' ' || v->p[v->n - 1] == '\t'))
    v->n--;
  r->nheaders++;
  return 0;
}

static int on_headers_complete(llhttp_t *p) { return HPE_PAUSED; }

static const llhttp_settings_t settings = {
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
};

/* Finds the end of the head (after its blank line) in r->head, resuming the
 * search where the previous call stopped. Returns 0 when not there yet. */
static size_t find_head_end(arq_http_req_t *r) {
  size_t i = r->scanned;
  for (; i < r->head_len; i++) {
    if (r->head[i] != '\n')
      continue;
    if (i >= 1 && r->head[i - 1] == '\n')
      return i + 1;
    if (i >= 2 && r->head[i - 1] == '\r' && r->head[i - 2] == '\n')
      return i + 1;
  }
  r->scanned = i;
  return 0;
}

static int parse_head(arq_http_req_t *r, size_t head_len) {
  llhttp_t parser;
  llhttp_init(&parser, HTTP_REQUEST, &settings);
  parser.data = r;
  llhttp_errno_t err = llhttp_execute(&parser, r->head, head_len);
  if (err != HPE_PAUSED && err != HPE_PAUSED_UPGRADE && err != HPE_OK) {
    r->status = r->nheaders == ARQ_HTTP_MAX_HEADERS ? 431 : 400;
    r->errstr = r->status == 431 ? "too many header fields" : "malformed HTTP request";
    return r->status == 431 ? ARQ_ETOOBIG : ARQ_EPROTO;
  }
  if (r->url.p == NULL) {
    r->status = 400;
    r->errstr = "malformed HTTP request";
    return ARQ_EPROTO;
  }
  r->method = llhttp_method_name((llhttp_method_t)parser.method);
  r->http_major = parser.http_major;
  r->http_minor = parser.http_minor;
  const char *q = memchr(r->url.p, '?', r->url.n);
  if (q) {
    r->path = (arq_slice_t){r->url.p, (size_t)(q - r->url.p)};
    r->query = (arq_slice_t){q + 1, r->url.n - (size_t)(q - r->url.p) - 1};
  } else {
    r->path = r->url;
    r->query = (arq_slice_t){r->url.p + r->url.n, 0};
  }
  return ARQ_OK;
}

int arq_http_req_feed(arq_http_req_t *r, const char *data, size_t len, size_t *used) {
  /* Take no more than the limit allows plus one byte, to tell "over". */
  size_t room = r->max_head + 1 - r->head_len;
  size_t take = len < room ? len : room;
  if (r->head_len + take > r->head_cap) {
    size_t cap = r->head_cap ? r->head_cap * 2 : 1024;
    while (cap < r->head_len + take)
      cap *= 2;
    if (cap > r->max_head + 1)
      cap = r->max_head + 1;
    r->head = arq_realloc(r->head, cap);
    r->head_cap = cap;
  }
  if (take > 0) /* an empty first read has no buffer to copy into yet */
    memcpy(r->head + r->head_len, data, take);
  size_t before = r->head_len;
  r->head_len += take;

  size_t end = find_head_end(r);
  if (end == 0 || end > r->max_head) {
    *used = take;
    if (r->head_len > r->max_head) {
      r->status = 431;
      r->errstr = "request header fields too large";
      return ARQ_ETOOBIG;
    }
    return ARQ_AGAIN;
  }
  *used = end - before;
  r->head_len = end;
  return parse_head(r, end);
}

static bool slice_ieq(arq_slice_t s, const char *z) {
  size_t n = strlen(z);
  return s.n == n && strncasecmp(s.p, z, n) == 0;
}

arq_slice_t arq_http_req_header(const arq_http_req_t *r, const char *name) {
  for (size_t i = 0; i < r->nheaders; i++)
    if (slice_ieq(r->headers[i].name, name))
      return r->headers[i].value;
  return (arq_slice_t){NULL, 0};
}

bool arq_http_req_has_token(const arq_http_req_t *r, const char *name, const char *token) {
  for (size_t i = 0; i < r->nheaders; i++) {
    if (!slice_ieq(r->headers[i].name, name))
      continue;
    const char *p = r->headers[i].value.p, *end = p + r->headers[i].value.n;
    while (p < end) {
      while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
        p++;
      const char *t = p;
      while (p < end && *p != ',')
        p++;
      const char *te = p;
      while (te > t && (te[-1] == ' ' || te[-1] == '\t'))
        te--;
      if (slice_ieq((arq_slice_t){t, (size_t)(te - t)}, token))
        return true;
    }
  }
  return false;
}

const char *arq_http_reason(int status) {
  switch (status) {
  case 101: return "Switching Protocols";
  case 200: return "OK";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 426: return "Upgrade Required";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 503: return "Service Unavailable";
  default: return "Unknown";
  }
}

size_t arq_http_response(char *out, size_t cap, int status, const char *content_type, const char *extra_headers,
                         const char *body, size_t body_len) {
  int n = snprintf(out, cap,
                   "HTTP/1.1 %d %s\r\n"
                   "Server: arqonbus\r\n"
                   "Content-Type: %s\r\n"
                   "Content-Length: %zu\r\n"
                   "Connection: close\r\n"
                   "%s\r\n",
                   status, arq_http_reason(status), content_type, body_len, extra_headers ? extra_headers : "");
  if (body == NULL)
    body_len = 0; /* the head alone: the caller sends the body */
  /* n == cap means snprintf() cut the head's last byte for its NUL. */
  if (n < 0 || (size_t)n >= cap || (size_t)n + body_len > cap)
    return 0;
  if (body_len)
    memcpy(out + n, body, body_len);
  return (size_t)n + body_len;
}
