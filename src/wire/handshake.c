/* The WebSocket opening handshake, server side (see handshake.h). */
#include "wire/handshake.h"

#include <openssl/evp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "util/err.h"

static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

void arq_ws_accept_key(const char *key, size_t n, char *out) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int dlen = 0;
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  if (ctx == NULL || !EVP_DigestInit_ex(ctx, EVP_sha1(), NULL) || !EVP_DigestUpdate(ctx, key, n) ||
      !EVP_DigestUpdate(ctx, ws_guid, sizeof(ws_guid) - 1) || !EVP_DigestFinal_ex(ctx, digest, &dlen)) {
    fprintf(stderr, "arqonbus: OpenSSL SHA-1 failed\n");
    abort();
  }
  EVP_MD_CTX_free(ctx);
  EVP_EncodeBlock((unsigned char *)out, digest, (int)dlen);
  out[ARQ_WS_ACCEPT_LEN] = '\0';
}

/* A valid key is the base64 of 16 bytes: 22 characters of the alphabet and "==". */
static bool key_valid(arq_slice_t k) {
  if (k.n != 24 || k.p[22] != '=' || k.p[23] != '=')
    return false;
  for (size_t i = 0; i < 22; i++) {
    char c = k.p[i];
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '/'))
      return false;
  }
  /* The last character before the padding carries only 2 bits of data. */
  return strchr("AQgw", k.p[21]) != NULL;
}

static int refuse(arq_ws_upgrade_t *up, int status, const char *why) {
  up->status = status;
  up->errstr = why;
  return ARQ_EPROTO;
}

int arq_ws_upgrade_check(const arq_http_req_t *req, arq_ws_upgrade_t *up) {
  memset(up, 0, sizeof(*up));
  if (strcmp(req->method, "GET") != 0)
    return refuse(up, 405, "a WebSocket upgrade must use GET");
  if (req->http_major < 1 || (req->http_major == 1 && req->http_minor < 1))
    return refuse(up, 400, "a WebSocket upgrade needs HTTP/1.1");
  if (arq_http_req_header(req, "Host").p == NULL)
    return refuse(up, 400, "missing Host header");
  if (!arq_http_req_has_token(req, "Upgrade", "websocket"))
    return refuse(up, 400, "not a WebSocket upgrade: Upgrade: websocket is missing");
  if (!arq_http_req_has_token(req, "Connection", "Upgrade"))
    return refuse(up, 400, "not a WebSocket upgrade: Connection: Upgrade is missing");
  arq_slice_t version = arq_http_req_header(req, "Sec-WebSocket-Version");
  if (version.p == NULL)
    return refuse(up, 400, "missing Sec-WebSocket-Version header");
  if (version.n != 2 || memcmp(version.p, "13", 2) != 0)
    return refuse(up, 426, "unsupported WebSocket version, use 13");
  arq_slice_t key = arq_http_req_header(req, "Sec-WebSocket-Key");
  if (!key_valid(key))
    return refuse(up, 400, "missing or invalid Sec-WebSocket-Key");
  arq_ws_accept_key(key.p, key.n, up->accept);
  up->status = 101;
  return 0;
}

size_t arq_ws_upgrade_response(const arq_ws_upgrade_t *up, const char *protocol, char *out, size_t cap) {
  if (up->status == 101) {
    int n = snprintf(out, cap,
                     "HTTP/1.1 101 Switching Protocols\r\n"
                     "Upgrade: websocket\r\n"
                     "Connection: Upgrade\r\n"
                     "Sec-WebSocket-Accept: %s\r\n"
                     "%s%s%s"
                     "\r\n",
                     up->accept, protocol ? "Sec-WebSocket-Protocol: " : "", protocol ? protocol : "",
                     protocol ? "\r\n" : "");
    return n < 0 || (size_t)n >= cap ? 0 : (size_t)n;
  }
  char body[160];
  int bn = snprintf(body, sizeof body, "%s\n", up->errstr ? up->errstr : arq_http_reason(up->status));
  const char *extra = up->status == 426 ? "Sec-WebSocket-Version: 13\r\n"
                      : up->status == 405 ? "Allow: GET\r\n"
                                          : NULL;
  return arq_http_response(out, cap, up->status, "text/plain; charset=utf-8", extra, body,
                           bn < 0 ? 0 : (size_t)bn >= sizeof body ? sizeof body - 1 : (size_t)bn);
}

/* ---- Origin (RFC 6454) ------------------------------------------------------ */

/* An origin or a Host value taken apart: the scheme (empty for Host), the
 * host (a name, an IPv4 address or a bracketed IPv6 address) and the port,
 * the scheme's default when none is written. */
typedef struct origin_parts {
  arq_slice_t scheme, host;
  unsigned port;
} origin_parts_t;

static bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static bool is_digit(char c) { return c >= '0' && c <= '9'; }

static bool slice_ieq(arq_slice_t a, const char *b) { return a.n == strlen(b) && strncasecmp(a.p, b, a.n) == 0; }

static unsigned default_port(arq_slice_t scheme) {
  if (slice_ieq(scheme, "http") || slice_ieq(scheme, "ws"))
    return 80;
  if (slice_ieq(scheme, "https") || slice_ieq(scheme, "wss"))
    return 443;
  return 0;
}

/* Reads host[:port] (all of the 'n' bytes at 's') into 'o', whose scheme is
 * already set. */
static bool parse_hostport(const char *s, size_t n, origin_parts_t *o) {
  size_t i = 0;
  if (n > 0 && s[0] == '[') {
    while (i < n && s[i] != ']') {
      char c = s[i];
      if (i > 0 && !(is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || c == ':' || c == '.'))
        return false;
      i++;
    }
    if (i == n || i < 2)
      return false;
    i++; /* the ']' */
  } else {
    while (i < n && s[i] != ':') {
      char c = s[i];
      if (!(is_alpha(c) || is_digit(c) || c == '-' || c == '.' || c == '_' || c == '~'))
        return false;
      i++;
    }
    if (i == 0)
      return false;
  }
  o->host = (arq_slice_t){s, i};
  o->port = default_port(o->scheme);
  if (i == n)
    return true;
  if (s[i] != ':' || i + 1 == n || n - i - 1 > 5)
    return false;
  unsigned port = 0;
  for (size_t j = i + 1; j < n; j++) {
    if (!is_digit(s[j]))
      return false;
    port = port * 10 + (unsigned)(s[j] - '0');
  }
  if (port == 0 || port > 65535)
    return false;
  o->port = port;
  return true;
}

/* Reads scheme://host[:port]. */
static bool parse_origin(const char *s, size_t n, origin_parts_t *o) {
  size_t i = 0;
  if (n == 0 || !is_alpha(s[0]))
    return false;
  while (i < n && (is_alpha(s[i]) || is_digit(s[i]) || s[i] == '+' || s[i] == '-' || s[i] == '.'))
    i++;
  if (n - i < 3 || memcmp(s + i, "://", 3) != 0)
    return false;
  o->scheme = (arq_slice_t){s, i};
  return parse_hostport(s + i + 3, n - i - 3, o);
}

static bool same_place(const origin_parts_t *a, const origin_parts_t *b) {
  return a->host.n == b->host.n && strncasecmp(a->host.p, b->host.p, a->host.n) == 0 && a->port == b->port;
}

bool arq_ws_origin_valid(const char *item, size_t n) {
  origin_parts_t o;
  return (n == 1 && item[0] == '*') || (n == 4 && memcmp(item, "null", 4) == 0) || parse_origin(item, n, &o);
}

bool arq_ws_origin_allowed(const char *origin, size_t on, const char *host, size_t hn, const char *allowed) {
  if (!origin)
    return true;
  origin_parts_t o;
  bool parsed = parse_origin(origin, on, &o);
  if (!allowed || !allowed[0]) {
    origin_parts_t h = {.scheme = parsed ? o.scheme : (arq_slice_t){"", 0}};
    return parsed && host && parse_hostport(host, hn, &h) && same_place(&o, &h);
  }
  for (const char *p = allowed; *p;) {
    size_t len = strcspn(p, ",");
    origin_parts_t a;
    if (len == 1 && p[0] == '*')
      return true;
    if (len == on && memcmp(p, origin, on) == 0)
      return true; /* "null", or the very same text */
    if (parsed && parse_origin(p, len, &a) && a.scheme.n == o.scheme.n &&
        strncasecmp(a.scheme.p, o.scheme.p, a.scheme.n) == 0 && same_place(&a, &o))
      return true;
    p += len + (p[len] == ',');
  }
  return false;
}
