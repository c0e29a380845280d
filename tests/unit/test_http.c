/* Unit tests for wire/http: the request-head reader in front of llhttp and
 * the response writer.
 *
 * The head reader is fed the way a socket delivers bytes (whole, byte by
 * byte, with WebSocket frames right behind the blank line) and checked at
 * its size limit, on garbage and on what RFC 7230 says about header values.
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
#include "wire/http.h"

static const char upgrade_req[] = "GET /chat?room=lobby&x=1 HTTP/1.1\r\n"
                                  "Host: bus.example.com:8080\r\n"
                                  "upgrade: websocket\r\n"
                                  "Connection: keep-alive, Upgrade\r\n"
                                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                  "Sec-WebSocket-Version: 13\r\n"
                                  "Origin: http://example.com\r\n"
                                  "\r\n";

static bool slice_is(arq_slice_t s, const char *z) {
  return s.p != NULL && s.n == strlen(z) && memcmp(s.p, z, s.n) == 0;
}

/* Parses the NUL-terminated 'head' in one feed with a roomy limit. */
static int parse(arq_http_req_t *r, const char *head) {
  arq_http_req_init(r, 8192);
  size_t used = 0;
  int rc = arq_http_req_feed(r, head, strlen(head), &used);
  if (rc == ARQ_OK)
    assert_int_equal(used, strlen(head));
  return rc;
}

static void assert_upgrade_fields(const arq_http_req_t *r) {
  assert_string_equal(r->method, "GET");
  assert_true(slice_is(r->url, "/chat?room=lobby&x=1"));
  assert_true(slice_is(r->path, "/chat"));
  assert_true(slice_is(r->query, "room=lobby&x=1"));
  assert_int_equal(r->http_major, 1);
  assert_int_equal(r->http_minor, 1);
  assert_int_equal(r->nheaders, 6);
  assert_true(slice_is(arq_http_req_header(r, "Host"), "bus.example.com:8080"));
  assert_true(slice_is(arq_http_req_header(r, "Sec-WebSocket-Key"), "dGhlIHNhbXBsZSBub25jZQ=="));
  assert_true(slice_is(arq_http_req_header(r, "Origin"), "http://example.com"));
}

static void test_parse_upgrade(void **state) {
  arq_http_req_t r;
  assert_int_equal(parse(&r, upgrade_req), ARQ_OK);
  assert_upgrade_fields(&r);
  arq_http_req_free(&r);
}

static void test_header_names_case_insensitive(void **state) {
  arq_http_req_t r;
  assert_int_equal(parse(&r, upgrade_req), ARQ_OK);
  assert_true(slice_is(arq_http_req_header(&r, "host"), "bus.example.com:8080"));
  assert_true(slice_is(arq_http_req_header(&r, "HOST"), "bus.example.com:8080"));
  assert_true(slice_is(arq_http_req_header(&r, "SEC-WEBSOCKET-VERSION"), "13"));
  assert_true(slice_is(arq_http_req_header(&r, "Upgrade"), "websocket")); /* sent as "upgrade" */
  /* Absent headers and prefixes of present ones are not found. */
  arq_slice_t none = arq_http_req_header(&r, "Cookie");
  assert_null(none.p);
  assert_int_equal(none.n, 0);
  assert_null(arq_http_req_header(&r, "Hos").p);
  assert_null(arq_http_req_header(&r, "Hostx").p);
  arq_http_req_free(&r);
}

static void test_has_token(void **state) {
  arq_http_req_t r;
  assert_int_equal(parse(&r, upgrade_req), ARQ_OK);
  assert_true(arq_http_req_has_token(&r, "Connection", "Upgrade"));
  assert_true(arq_http_req_has_token(&r, "connection", "upgrade"));
  assert_true(arq_http_req_has_token(&r, "Connection", "UPGRADE"));
  assert_true(arq_http_req_has_token(&r, "Connection", "keep-alive"));
  assert_false(arq_http_req_has_token(&r, "Connection", "keep"));
  assert_false(arq_http_req_has_token(&r, "Connection", "alive"));
  assert_false(arq_http_req_has_token(&r, "Connection", "grade"));
  assert_false(arq_http_req_has_token(&r, "Connection", "Upgrades"));
  assert_false(arq_http_req_has_token(&r, "Connection", "keep-alive, Upgrade"));
  assert_true(arq_http_req_has_token(&r, "Upgrade", "WebSocket"));
  assert_false(arq_http_req_has_token(&r, "Cookie", "Upgrade"));
  arq_http_req_free(&r);

  /* Odd spacing, empty list elements, and a second occurrence of the header. */
  assert_int_equal(parse(&r, "GET / HTTP/1.1\r\n"
                             "Connection: keep-alive\r\n"
                             "X-Connection: Upgrade\r\n"
                             "Connection: ,\t foo ,, \tUpgrade\t ,\r\n"
                             "\r\n"),
                   ARQ_OK);
  assert_true(arq_http_req_has_token(&r, "Connection", "Upgrade"));
  assert_true(arq_http_req_has_token(&r, "Connection", "foo"));
  assert_true(arq_http_req_has_token(&r, "Connection", "keep-alive"));
  assert_true(arq_http_req_has_token(&r, "X-Connection", "upgrade"));
  assert_false(arq_http_req_has_token(&r, "Connection", "bar"));
  arq_http_req_free(&r);

  /* Only in a header of another name: not found. */
  assert_int_equal(parse(&r, "GET / HTTP/1.1\r\nX-Connection: Upgrade\r\n\r\n"), ARQ_OK);
  assert_false(arq_http_req_has_token(&r, "Connection", "Upgrade"));
  arq_http_req_free(&r);
}

static void test_header_value_whitespace(void **state) {
  /* RFC 7230 section 3.2.4: the value excludes leading and trailing
   * whitespace; an empty value is present but empty. */
  arq_http_req_t r;
  assert_int_equal(parse(&r, "GET / HTTP/1.1\r\n"
                             "Host:   bus.example.com \t \r\n"
                             "Sec-WebSocket-Version:\t13 \r\n"
                             "X-Empty:\r\n"
                             "X-Blank:   \r\n"
                             "\r\n"),
                   ARQ_OK);
  assert_true(slice_is(arq_http_req_header(&r, "Host"), "bus.example.com"));
  assert_true(slice_is(arq_http_req_header(&r, "Sec-WebSocket-Version"), "13"));
  arq_slice_t e = arq_http_req_header(&r, "X-Empty");
  assert_non_null(e.p);
  assert_int_equal(e.n, 0);
  e = arq_http_req_header(&r, "X-Blank");
  assert_non_null(e.p);
  assert_int_equal(e.n, 0);
  arq_http_req_free(&r);
}

static void test_folded_header_refused(void **state) {
  /* Obsolete line folding (RFC 7230 section 3.2.4): a server must refuse
   * it with 400 or join the lines; it must not keep only the last line. */
  arq_http_req_t r;
  int rc = parse(&r, "GET / HTTP/1.1\r\n"
                     "Host: a\r\n"
                     "Connection: Upgrade\r\n"
                     "  , keep-alive\r\n"
                     "\r\n");
  assert_int_equal(rc, ARQ_EPROTO);
  assert_int_equal(r.status, 400);
  arq_http_req_free(&r);
}

static void test_no_query(void **state) {
  arq_http_req_t r;
  assert_int_equal(parse(&r, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), ARQ_OK);
  assert_true(slice_is(r.url, "/metrics"));
  assert_true(slice_is(r.path, "/metrics"));
  assert_int_equal(r.query.n, 0);
  arq_http_req_free(&r);

  assert_int_equal(parse(&r, "GET /a?b?c HTTP/1.1\r\n\r\n"), ARQ_OK);
  assert_true(slice_is(r.path, "/a"));
  assert_true(slice_is(r.query, "b?c"));
  assert_int_equal(r.nheaders, 0);
  arq_http_req_free(&r);

  assert_int_equal(parse(&r, "GET /x? HTTP/1.1\r\n\r\n"), ARQ_OK);
  assert_true(slice_is(r.path, "/x"));
  assert_int_equal(r.query.n, 0);
  arq_http_req_free(&r);
}

static void test_other_methods_and_versions(void **state) {
  arq_http_req_t r;
  assert_int_equal(parse(&r, "POST /publish HTTP/1.1\r\nContent-Length: 5\r\n\r\n"), ARQ_OK);
  assert_string_equal(r.method, "POST");
  arq_http_req_free(&r);
  assert_int_equal(parse(&r, "HEAD /health HTTP/1.0\r\n\r\n"), ARQ_OK);
  assert_string_equal(r.method, "HEAD");
  assert_int_equal(r.http_major, 1);
  assert_int_equal(r.http_minor, 0);
  arq_http_req_free(&r);
}

static void test_byte_by_byte(void **state) {
  arq_http_req_t r;
  arq_http_req_init(&r, 8192);
  size_t n = strlen(upgrade_req);
  for (size_t i = 0; i < n; i++) {
    size_t used = 99;
    int rc = arq_http_req_feed(&r, upgrade_req + i, 1, &used);
    assert_int_equal(used, 1);
    assert_int_equal(rc, i + 1 == n ? ARQ_OK : ARQ_AGAIN);
  }
  assert_upgrade_fields(&r);
  arq_http_req_free(&r);

  /* In two pieces at every cut. */
  for (size_t cut = 0; cut <= n; cut++) {
    arq_http_req_init(&r, 8192);
    size_t used = 99;
    int rc = arq_http_req_feed(&r, upgrade_req, cut, &used);
    assert_int_equal(rc, cut == n ? ARQ_OK : ARQ_AGAIN);
    assert_int_equal(used, cut);
    if (cut < n) {
      assert_int_equal(arq_http_req_feed(&r, upgrade_req + cut, n - cut, &used), ARQ_OK);
      assert_int_equal(used, n - cut);
    }
    assert_upgrade_fields(&r);
    arq_http_req_free(&r);
  }
}

static void test_empty_reads(void **state) {
  /* A read of no bytes, first or in between, changes nothing. */
  arq_http_req_t r;
  arq_http_req_init(&r, 8192);
  size_t used = 99, n = strlen(upgrade_req);
  assert_int_equal(arq_http_req_feed(&r, upgrade_req, 0, &used), ARQ_AGAIN);
  assert_int_equal(used, 0);
  assert_int_equal(arq_http_req_feed(&r, upgrade_req, 10, &used), ARQ_AGAIN);
  assert_int_equal(arq_http_req_feed(&r, upgrade_req + 10, 0, &used), ARQ_AGAIN);
  assert_int_equal(used, 0);
  assert_int_equal(arq_http_req_feed(&r, upgrade_req + 10, n - 10, &used), ARQ_OK);
  assert_int_equal(used, n - 10);
  assert_upgrade_fields(&r);
  arq_http_req_free(&r);
}

static void test_bytes_after_head_not_taken(void **state) {
  size_t head = strlen(upgrade_req);
  static const char frame[] = "\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
  char buf[1024];
  memcpy(buf, upgrade_req, head);
  memcpy(buf + head, frame, sizeof frame - 1);
  size_t total = head + sizeof frame - 1;

  arq_http_req_t r;
  arq_http_req_init(&r, 8192);
  size_t used = 0;
  assert_int_equal(arq_http_req_feed(&r, buf, total, &used), ARQ_OK);
  assert_int_equal(used, head);
  assert_upgrade_fields(&r);
  arq_http_req_free(&r);

  /* The head's end arriving together with the frame, in a second read. */
  for (size_t cut = 1; cut < head; cut += 13) {
    arq_http_req_init(&r, 8192);
    assert_int_equal(arq_http_req_feed(&r, buf, cut, &used), ARQ_AGAIN);
    assert_int_equal(used, cut);
    assert_int_equal(arq_http_req_feed(&r, buf + cut, total - cut, &used), ARQ_OK);
    assert_int_equal(used, head - cut);
    assert_upgrade_fields(&r);
    arq_http_req_free(&r);
  }
}

/* Builds a head of exactly 'len' bytes (padding one header) into 'out'. */
static void build_head(char *out, size_t len) {
  static const char start[] = "GET /pad HTTP/1.1\r\nHost: x\r\nX-Pad: ";
  static const char end[] = "\r\n\r\n";
  size_t fixed = sizeof start - 1 + sizeof end - 1;
  assert_true(len > fixed);
  memcpy(out, start, sizeof start - 1);
  memset(out + sizeof start - 1, 'p', len - fixed);
  memcpy(out + len - (sizeof end - 1), end, sizeof end - 1);
  out[len] = '\0';
}

static void test_head_size_limit(void **state) {
  enum { LEN = 300 };
  char head[LEN + 64];
  build_head(head, LEN);
  memcpy(head + LEN, "\x81\x80trailing", 10); /* frame bytes behind it */

  /* Exactly at the limit: accepted, whole or byte by byte. */
  arq_http_req_t r;
  arq_http_req_init(&r, LEN);
  size_t used = 0;
  assert_int_equal(arq_http_req_feed(&r, head, LEN + 10, &used), ARQ_OK);
  assert_int_equal(used, LEN);
  assert_int_equal(arq_http_req_header(&r, "X-Pad").n, LEN - 39);
  arq_http_req_free(&r);

  arq_http_req_init(&r, LEN);
  for (size_t i = 0; i < LEN; i++)
    assert_int_equal(arq_http_req_feed(&r, head + i, 1, &used), i + 1 == LEN ? ARQ_OK : ARQ_AGAIN);
  arq_http_req_free(&r);

  /* One byte over: 431, whole or byte by byte. */
  arq_http_req_init(&r, LEN - 1);
  assert_int_equal(arq_http_req_feed(&r, head, LEN, &used), ARQ_ETOOBIG);
  assert_int_equal(r.status, 431);
  assert_non_null(r.errstr);
  arq_http_req_free(&r);

  arq_http_req_init(&r, LEN - 1);
  for (size_t i = 0; i < LEN - 1; i++)
    assert_int_equal(arq_http_req_feed(&r, head + i, 1, &used), ARQ_AGAIN);
  assert_int_equal(arq_http_req_feed(&r, head + LEN - 1, 1, &used), ARQ_ETOOBIG);
  assert_int_equal(r.status, 431);
  arq_http_req_free(&r);
}

static void test_head_without_end(void **state) {
  /* A peer that never ends its head is cut off at the limit, and no more
   * than the limit (plus the byte that tells) is held. */
  char junk[1000];
  memset(junk, 'a', sizeof junk);
  arq_http_req_t r;
  arq_http_req_init(&r, 8192);
  size_t fed = 0, used = 0;
  int rc = ARQ_AGAIN;
  while (rc == ARQ_AGAIN && fed < 100000) {
    rc = arq_http_req_feed(&r, junk, sizeof junk, &used);
    fed += used;
  }
  assert_int_equal(rc, ARQ_ETOOBIG);
  assert_int_equal(r.status, 431);
  assert_true(fed <= 8193);
  assert_true(r.head_cap <= 8193);
  arq_http_req_free(&r);
}

#define BAD(s) {s, sizeof(s) - 1}

static void test_garbage(void **state) {
  static const struct {
    const char *p;
    size_t n;
  } bad[] = {
      BAD("HELLO\r\n\r\n"),
      BAD("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"), /* a TLS ClientHello */
      BAD("GET\r\n\r\n"),
      BAD("GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
      BAD("GET / HTTP/9.9\r\n\r\n"),
      BAD("get / HTTP/1.1\r\n\r\n"),
      BAD("GET / HTTP/1.1\r\nHost : x\r\n\r\n"),
      BAD("\r\n\r\n"),
      BAD("GET / HTTP/1.1\nHost: x\n\n"),
      BAD("GET /\0 HTTP/1.1\r\n\r\n"),
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    arq_http_req_t r;
    arq_http_req_init(&r, 8192);
    size_t used = 0;
    assert_int_equal(arq_http_req_feed(&r, bad[i].p, bad[i].n, &used), ARQ_EPROTO);
    assert_int_equal(r.status, 400);
    assert_non_null(r.errstr);
    arq_http_req_free(&r);
  }
}

static void test_header_count_limit(void **state) {
  char head[8192];
  for (int count = ARQ_HTTP_MAX_HEADERS; count <= ARQ_HTTP_MAX_HEADERS + 1; count++) {
    size_t n = (size_t)snprintf(head, sizeof head, "GET / HTTP/1.1\r\n");
    for (int i = 0; i < count; i++)
      n += (size_t)snprintf(head + n, sizeof head - n, "X-H%d: %d\r\n", i, i);
    n += (size_t)snprintf(head + n, sizeof head - n, "\r\n");
    arq_http_req_t r;
    int rc = parse(&r, head);
    if (count == ARQ_HTTP_MAX_HEADERS) {
      assert_int_equal(rc, ARQ_OK);
      assert_int_equal(r.nheaders, ARQ_HTTP_MAX_HEADERS);
      assert_true(slice_is(arq_http_req_header(&r, "X-H63"), "63"));
    } else {
      assert_int_equal(rc, ARQ_ETOOBIG);
      assert_int_equal(r.status, 431);
    }
    arq_http_req_free(&r);
  }
}

static void test_reason(void **state) {
  assert_string_equal(arq_http_reason(101), "Switching Protocols");
  assert_string_equal(arq_http_reason(200), "OK");
  assert_string_equal(arq_http_reason(400), "Bad Request");
  assert_string_equal(arq_http_reason(404), "Not Found");
  assert_string_equal(arq_http_reason(405), "Method Not Allowed");
  assert_string_equal(arq_http_reason(426), "Upgrade Required");
  assert_string_equal(arq_http_reason(431), "Request Header Fields Too Large");
  assert_string_equal(arq_http_reason(503), "Service Unavailable");
  assert_non_null(arq_http_reason(299));
}

static void test_response_format(void **state) {
  char out[512];
  size_t n = arq_http_response(out, sizeof out, 404, "text/plain; charset=utf-8", NULL, "no such page\n", 13);
  static const char want[] = "HTTP/1.1 404 Not Found\r\n"
                             "Server: arqonbus\r\n"
                             "Content-Type: text/plain; charset=utf-8\r\n"
                             "Content-Length: 13\r\n"
                             "Connection: close\r\n"
                             "\r\n"
                             "no such page\n";
  assert_int_equal(n, sizeof want - 1);
  assert_memory_equal(out, want, n);

  n = arq_http_response(out, sizeof out, 405, "text/plain", "Allow: GET\r\nX-A: b\r\n", "", 0);
  static const char want2[] = "HTTP/1.1 405 Method Not Allowed\r\n"
                              "Server: arqonbus\r\n"
                              "Content-Type: text/plain\r\n"
                              "Content-Length: 0\r\n"
                              "Connection: close\r\n"
                              "Allow: GET\r\nX-A: b\r\n"
                              "\r\n";
  assert_int_equal(n, sizeof want2 - 1);
  assert_memory_equal(out, want2, n);

  /* The head alone, for a body sent separately. */
  n = arq_http_response(out, sizeof out, 200, "application/json", NULL, NULL, 123456);
  static const char want3[] = "HTTP/1.1 200 OK\r\n"
                              "Server: arqonbus\r\n"
                              "Content-Type: application/json\r\n"
                              "Content-Length: 123456\r\n"
                              "Connection: close\r\n"
                              "\r\n";
  assert_int_equal(n, sizeof want3 - 1);
  assert_memory_equal(out, want3, n);

  /* The body may hold NUL bytes: it is copied by length. */
  n = arq_http_response(out, sizeof out, 200, "application/octet-stream", NULL, "a\0b", 3);
  assert_memory_equal(out + n - 3, "a\0b", 3);
}

/* With any 'cap', the result is either 0 or the whole response. */
static void check_caps(int status, const char *extra, const char *body, size_t body_len) {
  char full[512], out[512];
  size_t want = arq_http_response(full, sizeof full, status, "text/plain", extra, body, body_len);
  assert_true(want > 0);
  for (size_t cap = 0; cap <= want + 1; cap++) {
    memset(out, '#', sizeof out);
    size_t n = arq_http_response(out, cap, status, "text/plain", extra, body, body_len);
    if (n != 0) {
      assert_int_equal(n, want);
      assert_memory_equal(out, full, want);
    }
    for (size_t i = cap; i < sizeof out; i++)
      assert_int_equal(out[i], '#'); /* nothing written past 'cap' */
  }
  /* With room to spare it succeeds. */
  assert_int_equal(arq_http_response(out, want + 1, status, "text/plain", extra, body, body_len), want);
}

static void test_response_small_buffer(void **state) {
  check_caps(404, NULL, "body", 4);
  check_caps(200, "X: y\r\n", NULL, 10);
  check_caps(204, NULL, "", 0);
  /* With a body, an exact fit is not "too small". */
  char out[512];
  size_t want = arq_http_response(out, sizeof out, 404, "text/plain", NULL, "body", 4);
  assert_int_equal(arq_http_response(out, want, 404, "text/plain", NULL, "body", 4), want);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_parse_upgrade),
      cmocka_unit_test(test_header_names_case_insensitive),
      cmocka_unit_test(test_has_token),
      cmocka_unit_test(test_header_value_whitespace),
      cmocka_unit_test(test_folded_header_refused),
      cmocka_unit_test(test_no_query),
      cmocka_unit_test(test_other_methods_and_versions),
      cmocka_unit_test(test_byte_by_byte),
      cmocka_unit_test(test_empty_reads),
      cmocka_unit_test(test_bytes_after_head_not_taken),
      cmocka_unit_test(test_head_size_limit),
      cmocka_unit_test(test_head_without_end),
      cmocka_unit_test(test_garbage),
      cmocka_unit_test(test_header_count_limit),
      cmocka_unit_test(test_reason),
      cmocka_unit_test(test_response_format),
      cmocka_unit_test(test_response_small_buffer),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
