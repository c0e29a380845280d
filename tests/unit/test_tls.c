/* Unit tests for net/tls: the server session over memory BIOs, against an
 * OpenSSL client in the same process.
 *
 * Each test makes a self-signed P-256 certificate in a temporary directory,
 * loads it with arq_tls_ctx_new() and moves bytes between the two sides by
 * hand (whole, or a byte at a time), so that every state the connection code
 * relies on is seen without a socket: the handshake, data both ways, a write
 * larger than a record, refused versions, plaintext instead of a
 * ClientHello, close_notify both ways, and the context's load errors.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "net/tls.h"
#include "util/err.h"

typedef struct {
  char dir[64];
  char cert[128], key[128], other_key[128], garbage[128];
} files_t;

static void write_key(EVP_PKEY *pk, const char *path) {
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  assert_int_equal(PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL), 1);
  fclose(f);
}

/* A self-signed certificate and its key, another key, and a file of garbage. */
static int setup(void **state) {
  files_t *f = calloc(1, sizeof *f);
  snprintf(f->dir, sizeof f->dir, "/tmp/arq-tls-unit-XXXXXX");
  assert_non_null(mkdtemp(f->dir));
  snprintf(f->cert, sizeof f->cert, "%s/cert.pem", f->dir);
  snprintf(f->key, sizeof f->key, "%s/key.pem", f->dir);
  snprintf(f->other_key, sizeof f->other_key, "%s/other.pem", f->dir);
  snprintf(f->garbage, sizeof f->garbage, "%s/garbage.pem", f->dir);
  EVP_PKEY *pk = EVP_EC_gen("P-256");
  EVP_PKEY *other = EVP_EC_gen("P-256");
  X509 *x = X509_new();
  assert_non_null(pk);
  assert_non_null(other);
  X509_set_version(x, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
  X509_gmtime_adj(X509_getm_notBefore(x), 0);
  X509_gmtime_adj(X509_getm_notAfter(x), 3600);
  X509_set_pubkey(x, pk);
  X509_NAME *name = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"arq-unit", -1, -1, 0);
  X509_set_issuer_name(x, name);
  assert_true(X509_sign(x, pk, EVP_sha256()) > 0);
  FILE *out = fopen(f->cert, "w");
  assert_non_null(out);
  PEM_write_X509(out, x);
  fclose(out);
  write_key(pk, f->key);
  write_key(other, f->other_key);
  out = fopen(f->garbage, "w");
  fputs("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", out);
  fclose(out);
  X509_free(x);
  EVP_PKEY_free(pk);
  EVP_PKEY_free(other);
  *state = f;
  return 0;
}

static int teardown(void **state) {
  files_t *f = *state;
  unlink(f->cert);
  unlink(f->key);
  unlink(f->other_key);
  unlink(f->garbage);
  rmdir(f->dir);
  free(f);
  return 0;
}

/* The peer: an OpenSSL client on memory BIOs. */
typedef struct {
  SSL_CTX *ctx;
  SSL *ssl;
  BIO *rbio, *wbio;
} client_t;

static void client_init(client_t *c, int max_version) {
  c->ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_verify(c->ctx, SSL_VERIFY_NONE, NULL);
  if (max_version)
    SSL_CTX_set_max_proto_version(c->ctx, max_version);
  c->ssl = SSL_new(c->ctx);
  c->rbio = BIO_new(BIO_s_mem());
  c->wbio = BIO_new(BIO_s_mem());
  SSL_set_bio(c->ssl, c->rbio, c->wbio);
  SSL_set_connect_state(c->ssl);
}

static void client_free(client_t *c) {
  SSL_free(c->ssl);
  SSL_CTX_free(c->ctx);
}

/* Client to server: everything the client has written, 'step' bytes per
 * feed (0: all at once), then the server reads. Returns the last result of
 * arq_tls_read and appends the plaintext to 'plain' (may be NULL). */
static int to_server(client_t *c, arq_tls_t *t, size_t step, char *plain, size_t *plain_len) {
  uint8_t buf[65536];
  int n = BIO_read(c->wbio, buf, sizeof buf);
  int rc = ARQ_AGAIN;
  size_t off = 0;
  do {
    size_t len = n > 0 ? (size_t)n - off : 0;
    if (step && len > step)
      len = step;
    arq_tls_feed(t, buf + off, len);
    off += len;
    size_t got;
    uint8_t out[65536];
    while ((rc = arq_tls_read(t, out, sizeof out, &got)) == ARQ_OK) {
      assert_non_null(plain);
      memcpy(plain + *plain_len, out, got);
      *plain_len += got;
    }
  } while (n > 0 && off < (size_t)n && rc == ARQ_AGAIN);
  return rc;
}

/* Server to client: the ciphertext waiting, as the connection takes it. */
static void to_client(arq_tls_t *t, client_t *c) {
  size_t len;
  uint8_t *data = arq_tls_take(t, &len);
  if (len)
    assert_int_equal(BIO_write(c->rbio, data, (int)len), (int)len);
  arq_tls_release(t);
}

/* Runs the handshake to completion. */
static void handshake(client_t *c, arq_tls_t *t) {
  for (int i = 0; i < 10 && (!SSL_is_init_finished(c->ssl) || !arq_tls_established(t)); i++) {
    SSL_do_handshake(c->ssl);
    assert_int_equal(to_server(c, t, 0, NULL, NULL), ARQ_AGAIN);
    to_client(t, c);
  }
  assert_true(SSL_is_init_finished(c->ssl));
  assert_true(arq_tls_established(t));
}

static SSL_CTX *load(files_t *f, int min_version) {
  char err[512];
  SSL_CTX *ctx = arq_tls_ctx_new(f->cert, f->key, min_version, err, sizeof err);
  assert_non_null(ctx);
  return ctx;
}

static void test_handshake_and_data_both_ways(void **state) {
  SSL_CTX *ctx = load(*state, ARQ_TLS_1_2);
  arq_tls_t *t = arq_tls_new(ctx);
  client_t c;
  client_init(&c, 0);
  assert_false(arq_tls_established(t));
  assert_int_equal(arq_tls_write(t, "x", 1), ARQ_EPROTO); /* not before the handshake */
  handshake(&c, t);
  assert_string_equal(arq_tls_protocol(t), "TLSv1.3");
  assert_non_null(arq_tls_cipher(t));

  /* Client to server, fed a byte at a time. */
  static const char req[] = "GET / HTTP/1.1\r\n\r\n";
  assert_int_equal(SSL_write(c.ssl, req, (int)strlen(req)), (int)strlen(req));
  char plain[70000];
  size_t n = 0;
  assert_int_equal(to_server(&c, t, 1, plain, &n), ARQ_AGAIN);
  assert_int_equal(n, strlen(req));
  assert_memory_equal(plain, req, n);

  /* Server to client: 40000 bytes are three records; the client reads all. */
  static char big[40000];
  for (size_t i = 0; i < sizeof big; i++)
    big[i] = (char)('a' + i % 26);
  assert_int_equal(arq_tls_write(t, big, sizeof big), 0);
  assert_int_equal(arq_tls_write(t, "!", 1), 0);
  assert_true(arq_tls_pending(t) > sizeof big);
  to_client(t, &c);
  assert_int_equal(arq_tls_pending(t), 0);
  n = 0;
  int r;
  while ((r = SSL_read(c.ssl, plain + n, (int)(sizeof plain - n))) > 0)
    n += (size_t)r;
  assert_int_equal(n, sizeof big + 1);
  assert_memory_equal(plain, big, sizeof big);
  assert_int_equal(plain[sizeof big], '!');

  /* Trimming an idle session keeps it working. */
  arq_tls_trim(t, 0);
  assert_int_equal(SSL_write(c.ssl, "after", 5), 5);
  n = 0;
  assert_int_equal(to_server(&c, t, 0, plain, &n), ARQ_AGAIN);
  assert_int_equal(n, 5);

  /* close_notify both ways: once, and the client sees a clean end. */
  arq_tls_close_notify(t);
  size_t pending = arq_tls_pending(t);
  assert_true(pending > 0);
  arq_tls_close_notify(t);
  assert_int_equal(arq_tls_pending(t), pending);
  to_client(t, &c);
  assert_int_equal(SSL_read(c.ssl, plain, sizeof plain), 0);
  assert_int_equal(SSL_get_error(c.ssl, 0), SSL_ERROR_ZERO_RETURN);
  SSL_shutdown(c.ssl);
  assert_int_equal(to_server(&c, t, 0, plain, &n), ARQ_ECLOSED);

  client_free(&c);
  arq_tls_free(t);
  SSL_CTX_free(ctx);
}

/* The session keeps its context alive: a reload frees the server's
 * reference while connections still use theirs. */
static void test_session_outlives_its_context_reference(void **state) {
  SSL_CTX *ctx = load(*state, ARQ_TLS_1_2);
  arq_tls_t *t = arq_tls_new(ctx);
  SSL_CTX_free(ctx);
  client_t c;
  client_init(&c, 0);
  handshake(&c, t);
  client_free(&c);
  arq_tls_free(t);
}

static void refused(files_t *f, int min_version, int client_max, const char *reason) {
  SSL_CTX *ctx = load(f, min_version);
  arq_tls_t *t = arq_tls_new(ctx);
  client_t c;
  client_init(&c, client_max);
  SSL_do_handshake(c.ssl);
  assert_int_equal(to_server(&c, t, 0, NULL, NULL), ARQ_EPROTO);
  assert_false(arq_tls_established(t));
  assert_true(arq_tls_pending(t) > 0); /* the alert */
  char why[256];
  arq_tls_strerror(t, why, sizeof why);
  if (!strstr(why, reason))
    fail_msg("'%s' not in '%s'", reason, why);
  /* Failed for good: no more reads, writes or close_notify. */
  size_t got;
  uint8_t out[16];
  assert_int_equal(arq_tls_read(t, out, sizeof out, &got), ARQ_EPROTO);
  assert_int_equal(arq_tls_write(t, "x", 1), ARQ_EPROTO);
  size_t pending = arq_tls_pending(t);
  arq_tls_close_notify(t);
  assert_int_equal(arq_tls_pending(t), pending);
  client_free(&c);
  arq_tls_free(t);
  SSL_CTX_free(ctx);
}

static void test_version_below_the_minimum_is_refused(void **state) {
  refused(*state, ARQ_TLS_1_3, TLS1_2_VERSION, "unsupported protocol");
}

static void test_plaintext_instead_of_a_client_hello(void **state) {
  SSL_CTX *ctx = load(*state, ARQ_TLS_1_2);
  arq_tls_t *t = arq_tls_new(ctx);
  static const char req[] = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
  arq_tls_feed(t, (const uint8_t *)req, strlen(req));
  size_t got;
  uint8_t out[64];
  assert_int_equal(arq_tls_read(t, out, sizeof out, &got), ARQ_EPROTO);
  assert_int_equal(got, 0);
  char why[256];
  arq_tls_strerror(t, why, sizeof why);
  assert_non_null(strstr(why, "http request"));
  arq_tls_free(t);
  SSL_CTX_free(ctx);
}

static void expect_load_error(const char *cert, const char *key, const char *want) {
  char err[512];
  assert_null(arq_tls_ctx_new(cert, key, ARQ_TLS_1_2, err, sizeof err));
  if (!strstr(err, want))
    fail_msg("'%s' not in '%s'", want, err);
  assert_int_equal(ERR_peek_error(), 0); /* nothing left on OpenSSL's error queue */
}

static void test_load_errors_name_the_file(void **state) {
  files_t *f = *state;
  expect_load_error(f->garbage, f->key, "cannot load the certificate chain");
  expect_load_error(f->garbage, f->key, f->garbage);
  expect_load_error(f->cert, f->cert, "cannot load the private key");
  expect_load_error(f->cert, f->other_key, "does not match the certificate");
  expect_load_error("/nonexistent/cert.pem", f->key, "(tls_cert)");
  char desc[256];
  SSL_CTX *ctx = load(f, ARQ_TLS_1_3);
  assert_ptr_equal(arq_tls_ctx_describe(ctx, desc, sizeof desc), desc);
  assert_non_null(strstr(desc, "CN=arq-unit"));
  assert_non_null(strstr(desc, "valid until"));
  SSL_CTX_free(ctx);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_handshake_and_data_both_ways),
      cmocka_unit_test(test_session_outlives_its_context_reference),
      cmocka_unit_test(test_version_below_the_minimum_is_refused),
      cmocka_unit_test(test_plaintext_instead_of_a_client_hello),
      cmocka_unit_test(test_load_errors_name_the_file),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
