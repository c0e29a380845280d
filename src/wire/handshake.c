/* The WebSocket opening handshake, server side (see handshake.h). */
#include "wire/handshake.h"

#include <openssl/evp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
