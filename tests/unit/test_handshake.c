/* Unit tests for wire/handshake: the server side of the RFC 6455 opening
 * handshake. Requests go through the real head parser (wire/http), so each
 * case is the bytes a client would send and the answer it would read.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/err.h"
#include "wire/handshake.h"
#include "wire/http.h"

#define SAMPLE_KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define SAMPLE_ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

/* A request built from parts; NULL leaves the header out. */
typedef struct req_parts {
  const char *request_line;
  const char *host;
  const char *upgrade;
  const char *connection;
  const char *key;
  const char *version;
} req_parts_t;

static const req_parts_t good = {
    .request_line = "GET /ws HTTP/1.1",
    .host = "localhost:9100",
    .upgrade = "websocket",
    .connection = "Upgrade",
    .key = SAMPLE_KEY,
    .version = "13",
};

/* Parses the request of 'parts' into 'req' and checks it into 'up'. Returns
 * what arq_ws_upgrade_check() returned. */
static int check(const req_parts_t *parts, arq_http_req_t *req, arq_ws_upgrade_t *up) {
  char head[1024];
  int n = snprintf(head, sizeof head, "%s\r\n", parts->request_line);
  if (parts->host)
    n += snprintf(head + n, sizeof head - (size_t)n, "Host: %s\r\n", parts->host);
  if (parts->upgrade)
    n += snprintf(head + n, sizeof head - (size_t)n, "Upgrade: %s\r\n", parts->upgrade);
  if (parts->connection)
    n += snprintf(head + n, sizeof head - (size_t)n, "Connection: %s\r\n", parts->connection);
  if (parts->key)
    n += snprintf(head + n, sizeof head - (size_t)n, "Sec-WebSocket-Key: %s\r\n", parts->key);
  if (parts->version)
    n += snprintf(head + n, sizeof head - (size_t)n, "Sec-WebSocket-Version: %s\r\n", parts->version);
  n += snprintf(head + n, sizeof head - (size_t)n, "\r\n");
  assert_true(n > 0 && (size_t)n < sizeof head);

  arq_http_req_init(req, 8192);
  size_t used = 0;
  assert_int_equal(arq_http_req_feed(req, head, (size_t)n, &used), ARQ_OK);
  memset(up, 0x5A, sizeof(*up));
  return arq_ws_upgrade_check(req, up);
}

/* Checks 'parts', expects a refusal with 'status', and checks the response. */
static void assert_refused(const req_parts_t *parts, int status) {
  arq_http_req_t req;
  arq_ws_upgrade_t up;
  assert_int_equal(check(parts, &req, &up), ARQ_EPROTO);
  assert_int_equal(up.status, status);
  assert_non_null(up.errstr);

  char out[1024], line[64];
  size_t n = arq_ws_upgrade_response(&up, NULL, out, sizeof out);
  assert_true(n > 0 && n < sizeof out);
  out[n] = '\0';
  snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\n", status, arq_http_reason(status));
  assert_int_equal(strncmp(out, line, strlen(line)), 0);
  assert_non_null(strstr(out, "\r\nConnection: close\r\n"));
  assert_null(strstr(out, "Sec-WebSocket-Accept"));
  /* The body is what Content-Length says. */
  const char *cl = strstr(out, "\r\nContent-Length: ");
  assert_non_null(cl);
  const char *body = strstr(out, "\r\n\r\n");
  assert_non_null(body);
  body += 4;
  assert_int_equal(strtoul(cl + 18, NULL, 10), strlen(body));
  assert_true(strlen(body) > 0);
  arq_http_req_free(&req);
}

static void test_accept_key_rfc_sample(void **state) {
  char out[ARQ_WS_ACCEPT_LEN + 1];
  memset(out, 'x', sizeof out);
  arq_ws_accept_key(SAMPLE_KEY, strlen(SAMPLE_KEY), out);
  assert_string_equal(out, SAMPLE_ACCEPT);
  /* Another key gives another answer. */
  arq_ws_accept_key("AAAAAAAAAAAAAAAAAAAAAA==", 24, out);
  assert_int_equal(strlen(out), ARQ_WS_ACCEPT_LEN);
  assert_string_not_equal(out, SAMPLE_ACCEPT);
}

static void test_valid_upgrade(void **state) {
  arq_http_req_t req;
  arq_ws_upgrade_t up;
  assert_int_equal(check(&good, &req, &up), 0);
  assert_int_equal(up.status, 101);
  assert_null(up.errstr);
  assert_string_equal(up.accept, SAMPLE_ACCEPT);
  arq_http_req_free(&req);
}

static void test_valid_variants(void **state) {
  /* Token lists, any case, and header values in any case where the RFC
   * makes them case-insensitive. */
  static const char *connections[] = {"Upgrade", "upgrade", "keep-alive, Upgrade", "Upgrade, keep-alive",
                                      "keep-alive,Upgrade"};
  static const char *upgrades[] = {"websocket", "WebSocket", "WEBSOCKET"};
  for (size_t c = 0; c < sizeof connections / sizeof connections[0]; c++) {
    for (size_t u = 0; u < sizeof upgrades / sizeof upgrades[0]; u++) {
      req_parts_t p = good;
      p.connection = connections[c];
      p.upgrade = upgrades[u];
      arq_http_req_t req;
      arq_ws_upgrade_t up;
      assert_int_equal(check(&p, &req, &up), 0);
      assert_int_equal(up.status, 101);
      assert_string_equal(up.accept, SAMPLE_ACCEPT);
      arq_http_req_free(&req);
    }
  }
  /* Lower-case header names, as HTTP/2-minded clients send them. */
  const char head[] = "GET /ws?token=abc HTTP/1.1\r\n"
                      "host: example\r\n"
                      "upgrade: websocket\r\n"
                      "connection: Upgrade\r\n"
                      "sec-websocket-key: " SAMPLE_KEY "\r\n"
                      "sec-websocket-version: 13\r\n"
                      "\r\n";
  arq_http_req_t req;
  arq_http_req_init(&req, 8192);
  size_t used;
  assert_int_equal(arq_http_req_feed(&req, head, sizeof head - 1, &used), ARQ_OK);
  arq_ws_upgrade_t up;
  assert_int_equal(arq_ws_upgrade_check(&req, &up), 0);
  assert_string_equal(up.accept, SAMPLE_ACCEPT);
  arq_http_req_free(&req);
}

static void test_other_valid_keys(void **state) {
  /* Any base64 of 16 bytes: its 22nd character carries 2 bits of data. */
  static const char *keys[] = {"AAAAAAAAAAAAAAAAAAAAAA==", "/////////////////////w==", "+++++++++++++++++++++Q==",
                               "AQIDBAUGBwgJCgsMDQ4PEA=="};
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    req_parts_t p = good;
    p.key = keys[i];
    arq_http_req_t req;
    arq_ws_upgrade_t up;
    assert_int_equal(check(&p, &req, &up), 0);
    char want[ARQ_WS_ACCEPT_LEN + 1];
    arq_ws_accept_key(keys[i], strlen(keys[i]), want);
    assert_string_equal(up.accept, want);
    arq_http_req_free(&req);
  }
}

static void test_missing_or_invalid_key(void **state) {
  static const char *keys[] = {
      NULL,                          /* missing */
      "",                            /* empty */
      "dGhlIHNhbXBsZSBub25jZQ",      /* no padding */
      "dGhlIHNhbXBsZSBub25jZQ=",     /* short padding */
      "dGhlIHNhbXBsZSBub25jZQ===",   /* long */
      "dGhlIHNhbXBsZSBub25j",        /* 15 bytes */
      "dGhlIHNhbXBsZSBub25jZXM=",    /* 17 bytes */
      "dGhlIHNhbXBsZSBub25jZR==",    /* stray bits in the last character */
      "dGhlIHNhbXBsZSBub25j!Q==",    /* not base64 */
      "dGhlIHNhbXBsZSBub2 jZQ==",    /* a space inside */
      "=GhlIHNhbXBsZSBub25jZQ==",    /* padding first */
      "the sample nonce",            /* not encoded at all */
  };
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    req_parts_t p = good;
    p.key = keys[i];
    assert_refused(&p, 400);
  }
}

static void test_version(void **state) {
  static const char *versions[] = {"8", "7", "12", "14", "0", "13, 8", "abc"};
  for (size_t i = 0; i < sizeof versions / sizeof versions[0]; i++) {
    req_parts_t p = good;
    p.version = versions[i];
    assert_refused(&p, 426);
    /* The 426 says which version we speak (RFC 6455 section 4.4). */
    arq_http_req_t req;
    arq_ws_upgrade_t up;
    check(&p, &req, &up);
    char out[1024];
    size_t n = arq_ws_upgrade_response(&up, NULL, out, sizeof out - 1);
    out[n] = '\0';
    assert_non_null(strstr(out, "HTTP/1.1 426 Upgrade Required\r\n"));
    assert_non_null(strstr(out, "\r\nSec-WebSocket-Version: 13\r\n"));
    arq_http_req_free(&req);
  }
  req_parts_t p = good;
  p.version = NULL;
  assert_refused(&p, 400);
}

static void test_method(void **state) {
  static const char *lines[] = {"POST /ws HTTP/1.1", "PUT /ws HTTP/1.1", "HEAD /ws HTTP/1.1", "OPTIONS /ws HTTP/1.1"};
  for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++) {
    req_parts_t p = good;
    p.request_line = lines[i];
    assert_refused(&p, 405);
    arq_http_req_t req;
    arq_ws_upgrade_t up;
    check(&p, &req, &up);
    char out[1024];
    size_t n = arq_ws_upgrade_response(&up, NULL, out, sizeof out - 1);
    out[n] = '\0';
    /* RFC 7231 section 6.5.5: a 405 lists the allowed methods. */
    assert_non_null(strstr(out, "\r\nAllow: GET\r\n"));
    arq_http_req_free(&req);
  }
}

static void test_http_version(void **state) {
  req_parts_t p = good;
  p.request_line = "GET /ws HTTP/1.0";
  assert_refused(&p, 400);
}

static void test_missing_upgrade_or_connection(void **state) {
  req_parts_t p = good;
  p.upgrade = NULL;
  assert_refused(&p, 400);
  p.upgrade = "h2c";
  assert_refused(&p, 400);
  p.upgrade = "websocket2";
  assert_refused(&p, 400);

  p = good;
  p.connection = NULL;
  assert_refused(&p, 400);
  p.connection = "keep-alive";
  assert_refused(&p, 400);
  p.connection = "close";
  assert_refused(&p, 400);
  p.connection = "Upgraded";
  assert_refused(&p, 400);

  p = good;
  p.host = NULL; /* RFC 6455 section 4.1: the request has a Host */
  assert_refused(&p, 400);
}

static void test_101_response(void **state) {
  arq_http_req_t req;
  arq_ws_upgrade_t up;
  assert_int_equal(check(&good, &req, &up), 0);

  static const char want[] = "HTTP/1.1 101 Switching Protocols\r\n"
                             "Upgrade: websocket\r\n"
                             "Connection: Upgrade\r\n"
                             "Sec-WebSocket-Accept: " SAMPLE_ACCEPT "\r\n"
                             "\r\n";
  char out[512];
  size_t n = arq_ws_upgrade_response(&up, NULL, out, sizeof out);
  assert_int_equal(n, sizeof want - 1);
  assert_memory_equal(out, want, n);

  static const char want_proto[] = "HTTP/1.1 101 Switching Protocols\r\n"
                                   "Upgrade: websocket\r\n"
                                   "Connection: Upgrade\r\n"
                                   "Sec-WebSocket-Accept: " SAMPLE_ACCEPT "\r\n"
                                   "Sec-WebSocket-Protocol: arqon.v1\r\n"
                                   "\r\n";
  n = arq_ws_upgrade_response(&up, "arqon.v1", out, sizeof out);
  assert_int_equal(n, sizeof want_proto - 1);
  assert_memory_equal(out, want_proto, n);

  /* A buffer too small gives 0, never a cut response. */
  for (size_t cap = 0; cap <= sizeof want; cap++) {
    n = arq_ws_upgrade_response(&up, NULL, out, cap);
    if (n != 0) {
      assert_int_equal(n, sizeof want - 1);
      assert_memory_equal(out, want, n);
    }
  }
  assert_int_equal(arq_ws_upgrade_response(&up, NULL, out, sizeof want), sizeof want - 1);
  arq_http_req_free(&req);
}

static void test_error_response_small_buffer(void **state) {
  arq_ws_upgrade_t up = {.status = 426, .errstr = "unsupported WebSocket version, use 13"};
  char full[1024], out[1024];
  size_t want = arq_ws_upgrade_response(&up, NULL, full, sizeof full);
  assert_true(want > 0);
  for (size_t cap = 0; cap <= want; cap++) {
    size_t n = arq_ws_upgrade_response(&up, NULL, out, cap);
    if (n != 0) {
      assert_int_equal(n, want);
      assert_memory_equal(out, full, want);
    }
  }
  assert_int_equal(arq_ws_upgrade_response(&up, NULL, out, want + 1), want);
}

/* ---- Origin ---- */

static bool allowed(const char *origin, const char *host, const char *list) {
  return arq_ws_origin_allowed(origin, origin ? strlen(origin) : 0, host, host ? strlen(host) : 0, list);
}

static void test_origin_same_origin_default(void **state) {
  /* No Origin: not a browser, always allowed. */
  assert_true(allowed(NULL, "bus.example:9100", ""));
  assert_true(allowed(NULL, "bus.example:9100", "https://app.example"));
  /* Same host and port as Host. */
  assert_true(allowed("http://bus.example:9100", "bus.example:9100", ""));
  assert_true(allowed("http://BUS.example:9100", "bus.EXAMPLE:9100", NULL));
  assert_true(allowed("http://127.0.0.1:9100", "127.0.0.1:9100", ""));
  assert_true(allowed("http://[::1]:9100", "[::1]:9100", ""));
  /* Default ports: none written on one side is the scheme's default. */
  assert_true(allowed("https://bus.example", "bus.example:443", ""));
  assert_true(allowed("http://bus.example:80", "bus.example", ""));
  assert_true(allowed("https://bus.example", "bus.example", ""));
  assert_false(allowed("http://bus.example", "bus.example:9100", ""));
  /* Another host, another port, garbage, "null". */
  assert_false(allowed("http://evil.example:9100", "bus.example:9100", ""));
  assert_false(allowed("http://bus.example:9101", "bus.example:9100", ""));
  assert_false(allowed("http://bus.example.evil:9100", "bus.example:9100", ""));
  assert_false(allowed("null", "bus.example:9100", ""));
  assert_false(allowed("", "bus.example:9100", ""));
  assert_false(allowed("bus.example:9100", "bus.example:9100", ""));
  assert_false(allowed("http://bus.example:9100/", "bus.example:9100", ""));
  assert_false(allowed("http://user@bus.example:9100", "user@bus.example:9100", ""));
  assert_false(allowed("http://bus.example:99999", "bus.example:99999", ""));
  assert_false(allowed("http://bus.example:0", "bus.example:0", ""));
  assert_false(allowed("http://[::1", "[::1", ""));
}

static void test_origin_list(void **state) {
  const char *list = "https://app.example,http://localhost:8080,null";
  assert_true(allowed("https://app.example", "bus:9100", list));
  assert_true(allowed("HTTPS://App.Example:443", "bus:9100", list));
  assert_true(allowed("http://localhost:8080", "bus:9100", list));
  assert_true(allowed("null", "bus:9100", list));
  assert_false(allowed("http://app.example", "bus:9100", list));      /* another scheme */
  assert_false(allowed("https://app.example:8443", "bus:9100", list)); /* another port */
  assert_false(allowed("http://localhost:8081", "bus:9100", list));
  assert_false(allowed("https://app.example.evil", "bus:9100", list));
  /* With a list, the same origin is no longer allowed by itself. */
  assert_false(allowed("http://bus:9100", "bus:9100", list));
  assert_true(allowed("http://anything:1", "bus:9100", "https://x.example,*"));
  assert_true(allowed("not even an origin", "bus:9100", "*"));
}

static void test_origin_valid_items(void **state) {
  const char *valid_items[] = {"*", "null", "http://a", "https://a.example:8443", "http://[::1]:80", "chrome-extension://abc",
                        "http://127.0.0.1"};
  const char *invalid_items[] = {"", "**", "a", "http://", "http://a/", "http://a:", "http://a:x", "http://a:70000",
                       "://a", "1http://a", "http://a b", "http://[zz]", "http://a?b"};
  for (size_t i = 0; i < sizeof valid_items / sizeof valid_items[0]; i++)
    if (!arq_ws_origin_valid(valid_items[i], strlen(valid_items[i])))
      fail_msg("'%s' should be valid", valid_items[i]);
  for (size_t i = 0; i < sizeof invalid_items / sizeof invalid_items[0]; i++)
    if (arq_ws_origin_valid(invalid_items[i], strlen(invalid_items[i])))
      fail_msg("'%s' should not be valid", invalid_items[i]);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_accept_key_rfc_sample),
      cmocka_unit_test(test_valid_upgrade),
      cmocka_unit_test(test_valid_variants),
      cmocka_unit_test(test_other_valid_keys),
      cmocka_unit_test(test_missing_or_invalid_key),
      cmocka_unit_test(test_version),
      cmocka_unit_test(test_method),
      cmocka_unit_test(test_http_version),
      cmocka_unit_test(test_missing_upgrade_or_connection),
      cmocka_unit_test(test_101_response),
      cmocka_unit_test(test_error_response_small_buffer),
      cmocka_unit_test(test_origin_same_origin_default),
      cmocka_unit_test(test_origin_list),
      cmocka_unit_test(test_origin_valid_items),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
