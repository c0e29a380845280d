/* TLS for the three ports: OpenSSL driven through two memory BIOs.
 *
 * No I/O here: the connection (net/conn.c) feeds the ciphertext libuv read
 * into arq_tls_feed(), takes plaintext out with arq_tls_read() and hands it
 * to the same handshake and frame code a plaintext connection uses. Outgoing
 * plaintext goes in with arq_tls_write(); the ciphertext it produces (and
 * whatever the handshake, alerts or close_notify produce) waits in the write
 * BIO until arq_tls_take() moves it into one buffer for uv_write.
 *
 *   libuv read --> feed --> [rbio] --> SSL --> read --> HTTP / frames
 *   outq frames --> write --> SSL --> [wbio] --> take --> uv_write
 *
 * The SSL_CTX is the server's (one per certificate load); each connection's
 * SSL holds a reference to the context it started with, so a reload never
 * disturbs the connections already open.
 */
#ifndef ARQ_NET_TLS_H
#define ARQ_NET_TLS_H

#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct arq_tls arq_tls_t;

/* Creates a server context from the PEM certificate chain at 'cert' and the
 * PEM private key at 'key' (both borrowed paths), accepting 'min_version'
 * (TLS1_2_VERSION or TLS1_3_VERSION) or later, with compression and
 * renegotiation off. Returns the context (caller owns; SSL_CTX_free), or NULL
 * with one line naming the file and OpenSSL's reason in 'err'. */
SSL_CTX *arq_tls_ctx_new(const char *cert, const char *key, int min_version, char *err, size_t errcap);

/* Writes a short description of the certificate of 'ctx' (its subject and
 * expiry) into 'out' for the log, and returns 'out'. */
const char *arq_tls_ctx_describe(SSL_CTX *ctx, char *out, size_t cap);

/* A server-side session on 'ctx' (borrowed; the session takes its own
 * reference). Caller owns the result; free with arq_tls_free(). */
arq_tls_t *arq_tls_new(SSL_CTX *ctx);
void arq_tls_free(arq_tls_t *t);

/* Hands 'n' bytes of ciphertext from the peer to the session (copied). */
void arq_tls_feed(arq_tls_t *t, const uint8_t *data, size_t n);

/* Advances the handshake and decrypts what it can into 'out' ('cap' bytes).
 * Returns ARQ_OK with '*got' > 0 bytes of plaintext (call again: there may
 * be more), ARQ_AGAIN when more ciphertext is needed, ARQ_ECLOSED when the
 * peer sent close_notify, or ARQ_EPROTO on a TLS error (a failed handshake,
 * a bad record; arq_tls_strerror() names it). Check arq_tls_pending()
 * afterwards: the handshake and alerts produce bytes for the peer. */
int arq_tls_read(arq_tls_t *t, uint8_t *out, size_t cap, size_t *got);

/* True once the handshake has completed. */
bool arq_tls_established(const arq_tls_t *t);

/* Encrypts 'n' bytes of 'data' (borrowed) into the write BIO. Returns 0, or
 * ARQ_EPROTO when the session cannot send (handshake not done, failed). */
int arq_tls_write(arq_tls_t *t, const void *data, size_t n);

/* Queues a close_notify alert, once; nothing after a failed session. */
void arq_tls_close_notify(arq_tls_t *t);

/* Ciphertext waiting for the peer, in bytes. */
size_t arq_tls_pending(const arq_tls_t *t);

/* Moves all the waiting ciphertext into one buffer owned by the session and
 * returns it, its length in '*len'. The buffer stays valid until
 * arq_tls_release(); take only one at a time. */
uint8_t *arq_tls_take(arq_tls_t *t, size_t *len);

/* Frees the buffer of the last arq_tls_take(). */
void arq_tls_release(arq_tls_t *t);

/* Gives back memory an idle session holds: OpenSSL's record buffers, and
 * each empty memory BIO whose buffer is above 'keep' bytes. */
void arq_tls_trim(arq_tls_t *t, size_t keep);

/* Writes OpenSSL's reason for the last ARQ_EPROTO of 't' into 'out'. */
void arq_tls_strerror(const arq_tls_t *t, char *out, size_t cap);

/* The negotiated protocol ("TLSv1.3") and cipher, once established. */
const char *arq_tls_protocol(const arq_tls_t *t);
const char *arq_tls_cipher(const arq_tls_t *t);

#endif
