/* TLS sessions over memory BIOs (see tls.h). */
#include "net/tls.h"

#include <openssl/buffer.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/alloc.h"
#include "util/err.h"

#define TLS12_CIPHERS "ECDHE+AESGCM:ECDHE+CHACHA20"

struct arq_tls {
  SSL *ssl;
  BIO *rbio;            /* ciphertext from the peer; owned by ssl */
  BIO *wbio;            /* ciphertext for the peer; owned by ssl */
  uint8_t *out;         /* the buffer of the last arq_tls_take(), or NULL */
  unsigned long error;  /* OpenSSL's error code of the last failure */
  bool failed;          /* a fatal error: no more writes, no close_notify */
  bool notify_sent;
};

/* OpenSSL failing to allocate is out of memory like any other (util/alloc.h). */
static void oom(size_t size) {
  fprintf(stderr, "arqonbus: out of memory in OpenSSL (%zu bytes)\n", size);
  abort();
}

/* Formats the oldest error on OpenSSL's queue (or 'fallback') and clears it. */
static void take_error(char *out, size_t cap, const char *fallback) {
  unsigned long e = ERR_get_error();
  if (e)
    ERR_error_string_n(e, out, cap);
  else
    snprintf(out, cap, "%s", fallback);
  ERR_clear_error();
}

SSL_CTX *arq_tls_ctx_new(const char *cert, const char *key, int min_version, char *err, size_t errcap) {
  char why[256];
  ERR_clear_error();
  SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
  if (!ctx) {
    take_error(why, sizeof why, "out of memory");
    snprintf(err, errcap, "tls: cannot create a TLS context: %s", why);
    return NULL;
  }
  /* Security level 2 (keys of at least 112 bits' strength, no SHA-1
   * signatures) whatever the system's openssl.cnf says. TLS 1.3's suites
   * are OpenSSL's defaults (all AEAD, all forward secret); TLS 1.2 is held
   * to the same two properties: ECDHE key exchange with AES-GCM or
   * ChaCha20-Poly1305, no CBC, no static RSA key exchange. */
  SSL_CTX_set_security_level(ctx, 2);
  if (SSL_CTX_set_cipher_list(ctx, TLS12_CIPHERS) != 1) {
    take_error(why, sizeof why, "no cipher available");
    snprintf(err, errcap, "tls: cannot set the TLS 1.2 ciphers: %s", why);
    goto free_ctx;
  }
  SSL_CTX_set_min_proto_version(ctx, min_version);
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  /* Idle sessions give their 2 x 16 KiB record buffers back. */
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_num_tickets(ctx, 1);
  if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
    take_error(why, sizeof why, "no certificate found");
    snprintf(err, errcap, "tls: cannot load the certificate chain '%s' (tls_cert): %s", cert, why);
    goto free_ctx;
  }
  /* Loading a key checks it against the certificate already loaded. */
  bool loaded = SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) == 1;
  if (!loaded && ERR_GET_REASON(ERR_peek_last_error()) != X509_R_KEY_VALUES_MISMATCH) {
    take_error(why, sizeof why, "no private key found");
    snprintf(err, errcap, "tls: cannot load the private key '%s' (tls_key): %s", key, why);
    goto free_ctx;
  }
  if (!loaded || SSL_CTX_check_private_key(ctx) != 1) {
    take_error(why, sizeof why, "the key does not match");
    snprintf(err, errcap, "tls: the private key '%s' (tls_key) does not match the certificate '%s' (tls_cert): %s",
             key, cert, why);
    goto free_ctx;
  }
  return ctx;
free_ctx:
  SSL_CTX_free(ctx);
  return NULL;
}

const char *arq_tls_ctx_describe(SSL_CTX *ctx, char *out, size_t cap) {
  X509 *x = SSL_CTX_get0_certificate(ctx);
  out[0] = '\0';
  if (!x)
    return out;
  char subject[256];
  X509_NAME_oneline(X509_get_subject_name(x), subject, sizeof subject);
  BIO *b = BIO_new(BIO_s_mem());
  char expiry[64] = "";
  if (b && ASN1_TIME_print(b, X509_get0_notAfter(x)) == 1) {
    int n = BIO_read(b, expiry, (int)sizeof expiry - 1);
    expiry[n > 0 ? n : 0] = '\0';
  }
  BIO_free(b);
  snprintf(out, cap, "%s, valid until %s", subject, expiry);
  return out;
}

arq_tls_t *arq_tls_new(SSL_CTX *ctx) {
  arq_tls_t *t = arq_calloc(1, sizeof *t);
  t->ssl = SSL_new(ctx);
  t->rbio = BIO_new(BIO_s_mem());
  t->wbio = BIO_new(BIO_s_mem());
  if (!t->ssl || !t->rbio || !t->wbio)
    oom(sizeof *t);
  SSL_set_bio(t->ssl, t->rbio, t->wbio);
  SSL_set_accept_state(t->ssl);
  return t;
}

void arq_tls_free(arq_tls_t *t) {
  if (!t)
    return;
  SSL_free(t->ssl); /* frees both BIOs */
  arq_free(t->out);
  arq_free(t);
}

void arq_tls_feed(arq_tls_t *t, const uint8_t *data, size_t n) {
  /* A memory BIO only fails to take bytes when it cannot grow. */
  if (n > 0 && BIO_write(t->rbio, data, (int)n) != (int)n)
    oom(n);
}

/* Records the error of a failed call that returned 'rc'. */
static int failure(arq_tls_t *t, int rc) {
  int e = SSL_get_error(t->ssl, rc);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
    return ARQ_AGAIN;
  if (e == SSL_ERROR_ZERO_RETURN)
    return ARQ_ECLOSED;
  t->failed = true;
  t->error = ERR_peek_error();
  ERR_clear_error();
  return ARQ_EPROTO;
}

int arq_tls_read(arq_tls_t *t, uint8_t *out, size_t cap, size_t *got) {
  *got = 0;
  if (t->failed)
    return ARQ_EPROTO;
  ERR_clear_error();
  int rc = SSL_read(t->ssl, out, (int)(cap > INT32_MAX ? INT32_MAX : cap));
  if (rc > 0) {
    *got = (size_t)rc;
    return ARQ_OK;
  }
  return failure(t, rc);
}

bool arq_tls_established(const arq_tls_t *t) { return !t->failed && SSL_is_init_finished(t->ssl); }

int arq_tls_write(arq_tls_t *t, const void *data, size_t n) {
  if (!arq_tls_established(t))
    return ARQ_EPROTO;
  const uint8_t *p = data;
  ERR_clear_error();
  while (n > 0) {
    int chunk = n > INT32_MAX ? INT32_MAX : (int)n;
    int rc = SSL_write(t->ssl, p, chunk);
    if (rc <= 0) {
      failure(t, rc);
      t->failed = true; /* with a memory BIO nothing is worth retrying */
      return ARQ_EPROTO;
    }
    p += rc;
    n -= (size_t)rc;
  }
  return 0;
}

void arq_tls_close_notify(arq_tls_t *t) {
  if (t->notify_sent || !arq_tls_established(t))
    return;
  t->notify_sent = true;
  ERR_clear_error();
  SSL_shutdown(t->ssl); /* returns 0: the peer's close_notify is not awaited */
  ERR_clear_error();
}

size_t arq_tls_pending(const arq_tls_t *t) { return BIO_ctrl_pending(t->wbio); }

uint8_t *arq_tls_take(arq_tls_t *t, size_t *len) {
  size_t n = BIO_ctrl_pending(t->wbio);
  arq_free(t->out);
  t->out = n ? arq_malloc(n) : NULL;
  if (n && BIO_read(t->wbio, t->out, (int)n) != (int)n)
    oom(n); /* a memory BIO hands back all it holds */
  *len = n;
  return t->out;
}

void arq_tls_release(arq_tls_t *t) {
  arq_free(t->out);
  t->out = NULL;
}

/* Capacity of the buffer behind the memory BIO 'b'. */
static size_t bio_capacity(BIO *b) {
  BUF_MEM *m = NULL;
  BIO_get_mem_ptr(b, &m);
  return m ? m->max : 0;
}

void arq_tls_trim(arq_tls_t *t, size_t keep) {
  SSL_free_buffers(t->ssl); /* refuses (harmlessly) while a record is half read or written */
  /* An emptied memory BIO keeps its largest buffer; a fresh one holds none. */
  if (BIO_ctrl_pending(t->rbio) == 0 && bio_capacity(t->rbio) > keep) {
    BIO *b = BIO_new(BIO_s_mem());
    if (!b)
      oom(0);
    t->rbio = b;
    SSL_set0_rbio(t->ssl, b); /* frees the old one */
  }
  if (BIO_ctrl_pending(t->wbio) == 0 && bio_capacity(t->wbio) > keep) {
    BIO *b = BIO_new(BIO_s_mem());
    if (!b)
      oom(0);
    t->wbio = b;
    SSL_set0_wbio(t->ssl, b);
  }
}

void arq_tls_strerror(const arq_tls_t *t, char *out, size_t cap) {
  if (t->error)
    ERR_error_string_n(t->error, out, cap);
  else
    snprintf(out, cap, "connection failed at the TLS layer");
}

const char *arq_tls_protocol(const arq_tls_t *t) { return SSL_get_version(t->ssl); }

const char *arq_tls_cipher(const arq_tls_t *t) { return SSL_get_cipher_name(t->ssl); }
