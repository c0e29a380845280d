/* Client connections: accept, handshake, frames, close, write queue.
 *
 * Reads land in the server's one shared buffer; the frame decoder unmasks in
 * place and hands back whole messages, so an idle connection holds no read
 * memory at all. Writes go out as one writev of everything queued; what the
 * kernel does not take at once continues as one uv_write in flight.
 *
 * A TLS connection decrypts each read into the same shared buffer (its
 * ciphertext is copied into the session first) and encrypts batches of
 * queued frames just before they are written; a plaintext connection never
 * touches that code.
 */
#include "net/conn.h"

#include <linux/sockios.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <uthash.h>

#include "net/telemetry.h"
#include "net/tls.h"
#include "obs/log.h"
#include "util/alloc.h"
#include "util/err.h"
#include "auth/credential.h"
#include "util/time.h"
#include "wire/handshake.h"

#define MAX_IOV 256
#define TLS_RECORD 16384          /* plaintext of one full TLS record */
#define TLS_BATCH (256 * 1024)    /* plaintext encrypted for one write */
#define TLS_KEEP TLS_RECORD       /* a TLS session's emptied buffers above this go at once */

static const char *const port_names[ARQ_PORT_COUNT] = {"bus", "telemetry", "ops"};

static uint64_t now_ms(const arq_conn_t *c) { return uv_now(c->srv->loop); }

/* ---- connections per remote address -------------------------------------- */

/* Open bus WebSocket connections from one address (max_connections_per_ip).
 * An entry exists while its count is above 0. */
typedef struct arq_addr_count {
  char addr[INET6_ADDRSTRLEN];
  size_t n;       /* open bus WebSocket connections */
  size_t pending; /* connections in their opening handshake, any port */
  UT_hash_handle hh;
} arq_addr_count_t;

static arq_addr_count_t *addr_entry(arq_server_t *srv, const char *addr) {
  arq_addr_count_t *e = NULL;
  HASH_FIND_STR(srv->per_addr, addr, e);
  return e;
}

static size_t addr_count(arq_server_t *srv, const char *addr) {
  arq_addr_count_t *e = addr_entry(srv, addr);
  return e ? e->n : 0;
}

static arq_addr_count_t *addr_get(arq_conn_t *c) {
  arq_server_t *srv = c->srv;
  arq_addr_count_t *e = addr_entry(srv, c->addr);
  if (!e) {
    e = arq_calloc(1, sizeof *e);
    memcpy(e->addr, c->addr, sizeof e->addr);
    HASH_ADD_STR(srv->per_addr, addr, e);
  }
  return e;
}

static void addr_put(arq_server_t *srv, arq_addr_count_t *e) {
  if (e->n == 0 && e->pending == 0) {
    HASH_DEL(srv->per_addr, e);
    arq_free(e);
  }
}

static void addr_add(arq_conn_t *c) {
  addr_get(c)->n++;
  c->addr_counted = true;
}

static void addr_remove(arq_conn_t *c) {
  if (!c->addr_counted)
    return;
  c->addr_counted = false;
  arq_addr_count_t *e = addr_entry(c->srv, c->addr);
  if (e) {
    e->n--;
    addr_put(c->srv, e);
  }
}

/* The connection leaves its opening handshake (opened, refused or gone). */
static void handshake_over(arq_conn_t *c) {
  arq_server_t *srv = c->srv;
  if (c->kind == ARQ_PORT_OPS) {
    srv->npending_ops--;
    return;
  }
  srv->npending--;
  arq_addr_count_t *e = addr_entry(srv, c->addr);
  if (e) {
    e->pending--;
    addr_put(srv, e);
  }
}

void arq_conn_free_addr_counts(arq_server_t *srv) {
  arq_addr_count_t *e, *tmp;
  HASH_ITER(hh, srv->per_addr, e, tmp) {
    HASH_DEL(srv->per_addr, e);
    arq_free(e);
  }
}

static void unlink_all_timers(arq_conn_t *c) {
  arq_list_remove(&c->node_deadline);
  arq_list_remove(&c->node_ping);
  arq_list_remove(&c->node_pong);
  arq_list_remove(&c->node_write);
}

/* Takes the client off the bus (its channels are told it left), or a
 * monitoring client off the telemetry stream. */
static void detach(arq_conn_t *c) {
  if (c->kind == ARQ_PORT_TELEMETRY)
    arq_telemetry_detach(c->srv, c);
  if (!c->client)
    return;
  arq_client_t *client = c->client;
  c->client = NULL;
  arq_bus_disconnect(c->srv->bus, client);
}

static void on_closed(uv_handle_t *h) {
  arq_conn_t *c = (arq_conn_t *)h;
  arq_server_t *srv = c->srv;
  arq_outq_clear(&c->outq);
  if (c->req) {
    arq_http_req_free(c->req);
    arq_free(c->req);
  }
  arq_ws_decoder_free(&c->dec);
  arq_tls_free(c->tls);
  arq_free(c);
  arq_server_conn_gone(srv);
}

void arq_conn_destroy(arq_conn_t *c, arq_close_reason_t reason) {
  arq_server_t *srv = c->srv;
  if (c->state == ARQ_CONN_CLOSED)
    return;
  if (c->state != ARQ_CONN_CLOSING)
    c->reason = (uint8_t)reason; /* a closing connection keeps why it started closing */
  if (c->state == ARQ_CONN_HANDSHAKE)
    handshake_over(c);
  c->state = ARQ_CONN_CLOSED;
  if (c->waiter) {
    c->waiter->c = NULL;
    c->waiter = NULL;
  }
  detach(c);
  unlink_all_timers(c);
  arq_list_remove(&c->node_open);
  arq_list_remove(&c->node_flush);
  arq_list_remove(&c->node_all);
  addr_remove(c);
  if (c->opened) {
    srv->nws--;
    srv->metrics.connections--;
    srv->metrics.connections_closed[c->reason]++;
    arq_log(ARQ_LOG_INFO, "net", "client disconnected", ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote),
            ARQ_LS("port", port_names[c->kind]), ARQ_LS("reason", arq_close_reason_name(c->reason)));
  } else if (c->kind != ARQ_PORT_OPS &&
             (c->reason == ARQ_CLOSE_HANDSHAKE_FAILED || c->reason == ARQ_CLOSE_HANDSHAKE_TIMEOUT)) {
    srv->metrics.connections_closed[c->reason]++; /* a refused upgrade ends a connection too */
  }
  uv_close((uv_handle_t *)&c->tcp, on_closed);
}

/* ---- writing ------------------------------------------------------------ */

static void on_shutdown(uv_shutdown_t *req, int status) {
  arq_conn_t *c = req->data;
  if (status < 0 && c->state != ARQ_CONN_CLOSED)
    arq_conn_destroy(c, ARQ_CLOSE_IO_ERROR);
}

/* Everything queued is written: a closing connection shuts its write side
 * and waits for the peer to close (the lingering close that lets the peer
 * read our last frame instead of losing it to a reset). */
static void queue_drained(arq_conn_t *c) {
  if (c->state != ARQ_CONN_CLOSING || c->shut)
    return;
  c->shut = true;
  c->sreq.data = c;
  if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown) != 0)
    arq_conn_destroy(c, ARQ_CLOSE_IO_ERROR);
}

static void on_write(uv_write_t *req, int status) {
  arq_conn_t *c = req->data;
  c->writing = false;
  arq_list_remove(&c->node_write);
  if (c->state == ARQ_CONN_CLOSED)
    return; /* cancelled by uv_close; the queue is cleared in on_closed */
  if (c->tls)
    arq_tls_release(c->tls); /* the ciphertext written */
  if (status < 0) {
    arq_conn_destroy(c, ARQ_CLOSE_IO_ERROR);
    return;
  }
  arq_outq_consume(&c->outq, c->inflight_bytes);
  if (c->opened)
    c->srv->metrics.bytes_out += c->inflight_bytes;
  c->inflight = 0;
  c->inflight_bytes = 0;
  arq_conn_flush(c);
}

/* Bytes on their way to the peer: what libuv still holds of the writes in
 * flight, plus what the kernel holds in the socket's send buffer. The kernel
 * part matters: the send buffer can grow to megabytes, and the kernel only
 * lets us write again once a third of it has drained, so a slow but steady
 * reader can take seconds without the libuv part moving at all. */
static size_t unsent_bytes(arq_conn_t *c) {
  size_t left = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
  uv_os_fd_t fd;
  int kernel = 0;
  if (uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0 && ioctl(fd, SIOCOUTQ, &kernel) == 0 && kernel > 0)
    left += (size_t)kernel;
  return left;
}

/* Starts the one asynchronous write of 'iov' ('nbufs' buffers). It carries
 * the first 'entries' queue entries, 'queued' bytes of the queue (for TLS:
 * their plaintext), which are consumed when it completes. */
static void start_write(arq_conn_t *c, uv_buf_t *iov, unsigned nbufs, unsigned entries, size_t queued) {
  c->wreq.data = c;
  if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, iov, nbufs, on_write) != 0) {
    arq_conn_destroy(c, ARQ_CLOSE_IO_ERROR);
    return;
  }
  c->writing = true;
  c->inflight = entries;
  c->inflight_bytes = queued;
  c->write_at = now_ms(c);
  c->write_left = unsent_bytes(c);
  arq_list_push_back(&c->srv->writing, &c->node_write);
}

/* Encrypts whole frames from the head of the queue, at most TLS_BATCH bytes
 * of them (and at least one), small ones copied together so that each
 * SSL_write fills a record. The frames stay queued. Returns how many were
 * encrypted (their bytes in '*plain'), or -1 when the session failed. */
static int tls_encrypt_batch(arq_conn_t *c, size_t *plain) {
  uv_buf_t iov[MAX_IOV];
  uint8_t stage[TLS_RECORD];
  size_t staged = 0, total = 0;
  unsigned i = 0;
  *plain = 0;
  if (c->outq.count == 0 || !arq_tls_established(c->tls))
    return 0;
  unsigned n = arq_outq_peek(&c->outq, 0, iov, MAX_IOV);
  for (; i < n && total < TLS_BATCH; i++) {
    size_t len = iov[i].len;
    if (len > sizeof stage - staged) {
      if (staged > 0 && arq_tls_write(c->tls, stage, staged) != 0)
        return -1;
      staged = 0;
    }
    if (len <= sizeof stage - staged) {
      memcpy(stage + staged, iov[i].base, len);
      staged += len;
    } else if (arq_tls_write(c->tls, iov[i].base, len) != 0) {
      return -1;
    }
    total += len;
  }
  if (staged > 0 && arq_tls_write(c->tls, stage, staged) != 0)
    return -1;
  *plain = total;
  return (int)i;
}

/* The TLS write path: encrypts a batch of queued frames, then writes all the
 * ciphertext the session holds (handshake messages and alerts included, in
 * the order they were made). The frames leave the queue only when their
 * ciphertext is written, so the queue bound and the slow-consumer close see
 * them exactly as on a plaintext connection. */
static void tls_flush(arq_conn_t *c) {
  if (c->state == ARQ_CONN_CLOSING && !arq_tls_established(c->tls))
    arq_outq_truncate(&c->outq, 0); /* the session failed: only its alert can still go */
  for (;;) {
    size_t plain;
    int entries = tls_encrypt_batch(c, &plain);
    if (entries < 0) {
      arq_log(ARQ_LOG_WARN, "net", "tls write failed", ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote));
      arq_conn_destroy(c, ARQ_CLOSE_IO_ERROR);
      return;
    }
    if (c->state == ARQ_CONN_CLOSING && (unsigned)entries == c->outq.count)
      arq_tls_close_notify(c->tls); /* after the last frame */
    if (arq_tls_pending(c->tls) == 0) {
      if (c->outq.count == 0)
        queue_drained(c);
      return;
    }
    size_t len;
    uint8_t *data = arq_tls_take(c->tls, &len);
    arq_tls_trim(c->tls, TLS_KEEP);
    uv_buf_t buf = uv_buf_init((char *)data, (unsigned)len);
    int r = uv_try_write((uv_stream_t *)&c->tcp, &buf, 1);
    if (r == UV_EAGAIN)
      r = 0;
    if (r < 0) {
      arq_conn_destroy(c, ARQ_CLOSE_IO_ERROR);
      return;
    }
    if ((size_t)r < len) {
      buf = uv_buf_init((char *)data + r, (unsigned)(len - (size_t)r));
      start_write(c, &buf, 1, (unsigned)entries, plain);
      return;
    }
    arq_tls_release(c->tls);
    arq_outq_consume(&c->outq, plain);
    if (c->opened)
      c->srv->metrics.bytes_out += plain;
  }
}

void arq_conn_flush(arq_conn_t *c) {
  uv_buf_t iov[MAX_IOV];
  arq_list_remove(&c->node_flush);
  if (c->state == ARQ_CONN_CLOSED || c->writing || c->shut)
    return;
  if (c->tls) {
    tls_flush(c);
    return;
  }
  /* Write synchronously while the kernel takes everything. */
  while (c->outq.count > 0) {
    unsigned n = arq_outq_peek(&c->outq, 0, iov, MAX_IOV);
    int r = uv_try_write((uv_stream_t *)&c->tcp, iov, n);
    if (r == UV_EAGAIN)
      break;
    if (r < 0) {
      arq_conn_destroy(c, ARQ_CLOSE_IO_ERROR);
      return;
    }
    if (c->opened)
      c->srv->metrics.bytes_out += (uint64_t)r;
    size_t batch = 0;
    for (unsigned i = 0; i < n; i++)
      batch += iov[i].len;
    arq_outq_consume(&c->outq, (size_t)r);
    if ((size_t)r < batch)
      break; /* the socket buffer is full */
  }
  if (c->outq.count == 0) {
    queue_drained(c);
    return;
  }
  /* The rest goes as one asynchronous write; its completion continues here. */
  unsigned n = arq_outq_peek(&c->outq, 0, iov, MAX_IOV);
  size_t bytes = 0;
  for (unsigned i = 0; i < n; i++)
    bytes += iov[i].len;
  start_write(c, iov, n, n, bytes);
}

/* Queues 'buf' (one reference taken over) whatever the queue limit. */
static void push(arq_conn_t *c, arq_rcbuf_t *buf) {
  arq_outq_push(&c->outq, buf);
  arq_server_want_flush(c->srv, c);
}

static void push_frame(arq_conn_t *c, uint8_t opcode, const uint8_t *payload, size_t len) {
  push(c, arq_ws_frame_new(opcode, payload, len));
}

static void slow_consumer(arq_conn_t *c) {
  arq_server_t *srv = c->srv;
  size_t queued = c->outq.bytes;
  srv->metrics.slow_consumer_closes++;
  arq_log(ARQ_LOG_WARN, "net", "slow consumer closed", ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote),
          ARQ_LI("queued_bytes", queued));
  /* What is not already being written is dropped so the close frame can
   * follow right behind the write in flight. */
  arq_outq_truncate(&c->outq, c->writing ? c->inflight : 0);
  if (srv->tel_mask & (1u << ARQ_TEL_SLOW_CONSUMER))
    arq_telemetry_report(srv, ARQ_TEL_SLOW_CONSUMER,
                         json_pack("{s:s, s:s, s:s, s:I}", "client_id", c->client ? arq_client_id(c->client) : "",
                                   "remote", c->remote, "port", port_names[c->kind], "queued_bytes",
                                   (json_int_t)queued));
  arq_conn_close(c, ARQ_WS_CLOSE_POLICY, "slow_consumer", ARQ_CLOSE_SLOW_CONSUMER);
}

/* The one bound on what may be queued to a connection, for data and pongs
 * alike: max_outbound_queue on the bus, telemetry_queue for monitoring
 * clients. One frame always fits an empty queue. When it is reached, a bus
 * client is closed as a slow consumer, while a monitoring client only misses
 * the frame (an envelope, 'counted', goes into telemetry_dropped): telemetry
 * never disconnects anyone. Returns true when 'len' more bytes may be queued. */
static bool admit(arq_conn_t *c, size_t len, bool counted) {
  const arq_config_t *cfg = c->srv->cfg;
  size_t limit = c->kind == ARQ_PORT_TELEMETRY ? cfg->telemetry_queue : cfg->max_outbound_queue;
  if (c->outq.bytes == 0 || c->outq.bytes + len <= limit)
    return true;
  if (c->kind == ARQ_PORT_TELEMETRY)
    c->srv->metrics.telemetry_dropped += counted;
  else
    slow_consumer(c);
  return false;
}

bool arq_conn_send(arq_conn_t *c, arq_rcbuf_t *buf) {
  if (c->state != ARQ_CONN_OPEN || !admit(c, buf->len, true))
    return false;
  push(c, arq_rcbuf_ref(buf));
  return true;
}

/* ---- closing ------------------------------------------------------------ */

static void start_closing(arq_conn_t *c, arq_close_reason_t reason) {
  arq_server_t *srv = c->srv;
  if (c->state == ARQ_CONN_HANDSHAKE)
    handshake_over(c);
  c->state = ARQ_CONN_CLOSING;
  c->reason = (uint8_t)reason;
  detach(c);
  unlink_all_timers(c);
  arq_list_remove(&c->node_open);
  c->deadline = now_ms(c) + srv->cfg->close_timeout_ms;
  arq_list_push_back(&srv->closing, &c->node_deadline);
}

void arq_conn_close(arq_conn_t *c, uint16_t code, const char *why, arq_close_reason_t reason) {
  if (c->state != ARQ_CONN_OPEN)
    return;
  uint8_t payload[ARQ_WS_MAX_CONTROL];
  size_t n = arq_ws_close_payload(payload, code, why);
  c->close_sent = true;
  push_frame(c, ARQ_WS_OP_CLOSE, payload, n);
  start_closing(c, reason);
  arq_log(reason == ARQ_CLOSE_NORMAL || reason == ARQ_CLOSE_SHUTDOWN ? ARQ_LOG_DEBUG : ARQ_LOG_INFO, "net",
          "closing connection", ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote), ARQ_LI("code", code),
          ARQ_LS("why", why));
}

void arq_conn_http_reply(arq_conn_t *c, int status, const char *content_type, const char *extra_headers,
                         const char *body, size_t body_len, arq_close_reason_t reason) {
  if (c->state != ARQ_CONN_HANDSHAKE)
    return;
  char head[512];
  size_t hl = arq_http_response(head, sizeof head, status, content_type, extra_headers, NULL, body_len);
  arq_rcbuf_t *b = arq_rcbuf_new(hl + body_len);
  memcpy(b->data, head, hl);
  if (body_len)
    memcpy(b->data + hl, body, body_len);
  push(c, b);
  c->input_done = true;
  start_closing(c, reason);
}

/* Sends the refusal 'resp' ('n' bytes) of an upgrade with 'status' because
 * of 'why', counts and logs it, and closes. */
static void refused(arq_conn_t *c, int status, const char *why, const char *resp, size_t n) {
  arq_rcbuf_t *b = arq_rcbuf_new(n);
  memcpy(b->data, resp, n);
  push(c, b);
  c->input_done = true;
  arq_metrics_handshake_error(&c->srv->metrics, status);
  arq_log(ARQ_LOG_INFO, "net", "handshake refused", ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote),
          ARQ_LS("port", port_names[c->kind]), ARQ_LI("status", status), ARQ_LS("why", why));
  start_closing(c, status == 408 ? ARQ_CLOSE_HANDSHAKE_TIMEOUT : ARQ_CLOSE_HANDSHAKE_FAILED);
}

static void refuse_upgrade(arq_conn_t *c, int status, const char *why) {
  arq_ws_upgrade_t up = {.status = status, .errstr = why};
  char resp[512];
  size_t n = arq_ws_upgrade_response(&up, NULL, resp, sizeof resp);
  refused(c, status, why, resp, n);
}

/* Refuses an upgrade for want of a valid credential (401, with the
 * challenge of RFC 6750: 'invalid' when one was presented) or of a
 * permission (403). The body says why; it never repeats the credential. */
static void refuse_access(arq_conn_t *c, int status, bool invalid, const char *why) {
  char resp[768];
  const char *challenge = status != 401 ? NULL
                          : invalid     ? "WWW-Authenticate: Bearer realm=\"arqonbus\", error=\"invalid_token\"\r\n"
                                        : "WWW-Authenticate: Bearer realm=\"arqonbus\"\r\n";
  size_t n = arq_http_response(resp, sizeof resp, status, "text/plain; charset=utf-8", challenge, why, strlen(why));
  if (status == 403)
    c->srv->metrics.forbidden_connect++;
  refused(c, status, why, resp, n);
}

/* Checks the credential of an upgrade on the bus or telemetry port (auth on).
 * Returns true with 'id' filled (the caller clears it), or refuses. */
static bool authenticate(arq_conn_t *c, arq_identity_t *id) {
  arq_server_t *srv = c->srv;
  char buf[ARQ_AUTH_MAX_CREDENTIAL + 1], why[256];
  const char *cred;
  size_t n;
  switch (arq_credential_find(c->req, buf, sizeof buf, &cred, &n)) {
  case ARQ_CRED_NONE:
    srv->metrics.auth[ARQ_AUTH_MISSING]++;
    refuse_access(c, 401, false,
                  "authentication required: send the credential as Authorization: Bearer, as a Sec-WebSocket-Protocol "
                  "entry bearer.<credential>, or as the token query parameter");
    return false;
  case ARQ_CRED_MALFORMED:
    srv->metrics.auth[ARQ_AUTH_REFUSED]++;
    refuse_access(c, 401, true, "the Authorization header must be Bearer <credential>, and token= well encoded");
    return false;
  default:
    break;
  }
  if (arq_auth_verify(srv->auth, cred, n, arq_time_wall_ms(), id, why, sizeof why) != 0) {
    srv->metrics.auth[ARQ_AUTH_REFUSED]++;
    refuse_access(c, 401, true, why);
    return false;
  }
  srv->metrics.auth[ARQ_AUTH_OK]++;
  if (c->kind == ARQ_PORT_TELEMETRY && !(id->roles & ARQ_ROLE_ADMIN)) {
    refuse_access(c, 403, false, "the telemetry port is open to the admin role only");
    arq_identity_clear(id);
    return false;
  }
  return true;
}

/* Puts what the credential 'id' says into the client's 'params'; refuses
 * (403) a client_id parameter that names another client. */
static bool apply_identity(arq_conn_t *c, const arq_identity_t *id, arq_client_params_t *params) {
  if (params->client_id[0] && strcmp(params->client_id, id->client_id) != 0) {
    refuse_access(c, 403, false, "the client_id parameter does not match the credential's client id");
    return false;
  }
  snprintf(params->client_id, sizeof params->client_id, "%s", id->client_id);
  if (id->client_type[0])
    params->type = arq_client_type_parse(id->client_type);
  params->roles = id->roles;
  params->rooms = id->rooms;
  params->expires_ms = id->expires_ms;
  return true;
}

void arq_conn_handshake_expired(arq_conn_t *c) {
  if (c->tls && !arq_tls_established(c->tls)) {
    arq_log(ARQ_LOG_INFO, "net", "tls handshake timed out", ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote),
            ARQ_LS("port", port_names[c->kind]));
    arq_conn_destroy(c, ARQ_CLOSE_HANDSHAKE_TIMEOUT);
    return;
  }
  if (c->kind == ARQ_PORT_OPS) {
    arq_conn_destroy(c, ARQ_CLOSE_HANDSHAKE_TIMEOUT);
    return;
  }
  refuse_upgrade(c, 408, "the handshake took too long");
}

/* ---- heartbeat ---------------------------------------------------------- */

void arq_conn_ping(arq_conn_t *c, uint64_t now) {
  arq_server_t *srv = c->srv;
  if (c->awaiting_pong && now >= c->pong_at + srv->cfg->heartbeat_timeout_ms) {
    arq_log(ARQ_LOG_INFO, "net", "heartbeat timeout", ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote));
    arq_conn_close(c, ARQ_WS_CLOSE_INTERNAL, "heartbeat timeout", ARQ_CLOSE_HEARTBEAT_TIMEOUT);
    return;
  }
  /* The payload is the send time, which lets a client measure round trips. */
  uint8_t stamp[8];
  for (int i = 0; i < 8; i++)
    stamp[i] = (uint8_t)(now >> (56 - 8 * i));
  arq_outq_trim(&c->outq); /* a heartbeat is a quiet moment to give back a burst's ring */
  if (c->tls)
    arq_tls_trim(c->tls, 0);
  push_frame(c, ARQ_WS_OP_PING, stamp, sizeof stamp);
  c->ping_at = now;
  arq_list_move_back(&srv->ping_due, &c->node_ping);
  if (!c->awaiting_pong) {
    c->awaiting_pong = true;
    c->pong_at = now;
    arq_list_push_back(&srv->pong_wait, &c->node_pong);
  }
}

bool arq_conn_write_progressed(arq_conn_t *c, uint64_t now) {
  /* A long write whose bytes keep draining is a slow reader, not a stalled one. */
  size_t left = unsent_bytes(c);
  if (left >= c->write_left)
    return false;
  c->write_left = left;
  c->write_at = now;
  arq_list_move_back(&c->srv->writing, &c->node_write);
  return true;
}

void arq_conn_write_stalled(arq_conn_t *c) {
  arq_list_remove(&c->node_write);
  /* A stalled monitoring client only misses events; the heartbeat ends it
   * if it is gone for good. */
  if (c->state == ARQ_CONN_OPEN && c->kind != ARQ_PORT_TELEMETRY)
    slow_consumer(c);
}

/* ---- reading ------------------------------------------------------------ */

static void protocol_error(arq_conn_t *c, uint16_t code, const char *why) {
  c->input_done = true;
  if (c->close_sent) {
    /* We already closed: whatever the peer sends now only ends the wait for
     * its EOF; it is neither answered nor counted as a violation. */
    return;
  }
  arq_metrics_protocol_error(&c->srv->metrics, code);
  arq_log(ARQ_LOG_WARN, "net", "protocol violation", ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote),
          ARQ_LI("code", code), ARQ_LS("why", why));
  if (c->srv->tel_mask & (1u << ARQ_TEL_PROTOCOL_VIOLATION))
    arq_telemetry_report(c->srv, ARQ_TEL_PROTOCOL_VIOLATION,
                         json_pack("{s:s, s:s, s:s, s:i, s:s}", "client_id", c->client ? arq_client_id(c->client) : "",
                                   "remote", c->remote, "port", port_names[c->kind], "close_code", (int)code, "reason",
                                   why));
  arq_conn_close(c, code, why, ARQ_CLOSE_PROTOCOL_ERROR);
}

static void on_message(arq_conn_t *c, const arq_ws_msg_t *m) {
  switch (m->opcode) {
  case ARQ_WS_OP_TEXT:
  case ARQ_WS_OP_BINARY:
    if (c->state != ARQ_CONN_OPEN)
      return; /* closing: data is no longer routed */
    if (c->kind == ARQ_PORT_BUS && c->client)
      arq_bus_receive_at(c->srv->bus, c->client, (const char *)m->data, m->len, m->opcode == ARQ_WS_OP_BINARY,
                         c->srv->read_ns);
    return;
  case ARQ_WS_OP_PING:
    /* Pongs count against the queue bound too: a client that pings and
     * never reads must not grow its queue without limit, on any port. */
    if (!c->close_sent && admit(c, m->len + 2, false))
      push_frame(c, ARQ_WS_OP_PONG, m->data, m->len);
    return;
  case ARQ_WS_OP_PONG:
    if (c->awaiting_pong) {
      c->awaiting_pong = false;
      arq_list_remove(&c->node_pong);
    }
    return;
  case ARQ_WS_OP_CLOSE:
    c->input_done = true;
    if (c->state == ARQ_CONN_OPEN) {
      /* Echo the peer's code, as RFC 6455 section 5.5.1 suggests. */
      uint8_t payload[2];
      size_t n = 0;
      if (m->close_code != ARQ_WS_CLOSE_NO_STATUS) {
        payload[0] = (uint8_t)(m->close_code >> 8);
        payload[1] = (uint8_t)m->close_code;
        n = 2;
      }
      c->close_sent = true;
      push_frame(c, ARQ_WS_OP_CLOSE, payload, n);
      start_closing(c, ARQ_CLOSE_NORMAL);
    }
    return;
  default:
    return;
  }
}

static void read_frames(arq_conn_t *c, uint8_t *data, size_t n) {
  while (n > 0 && !c->input_done && c->state != ARQ_CONN_CLOSED) {
    size_t used;
    arq_ws_msg_t m;
    int rc = arq_ws_decode(&c->dec, data, n, &used, &m);
    data += used;
    n -= used;
    if (rc == ARQ_AGAIN)
      return;
    if (rc < 0) {
      protocol_error(c, c->dec.close_code, c->dec.errstr);
      return;
    }
    on_message(c, &m);
  }
}

static void open_websocket(arq_conn_t *c) {
  arq_server_t *srv = c->srv;
  arq_http_req_free(c->req);
  arq_free(c->req);
  c->req = NULL;
  arq_list_remove(&c->node_deadline);
  handshake_over(c);
  c->state = ARQ_CONN_OPEN;
  c->opened = true;
  srv->nws++;
  srv->metrics.connections++;
  srv->metrics.connections_opened++;
  arq_ws_decoder_init(&c->dec, srv->cfg->max_message_size, true);
  if (srv->cfg->heartbeat_interval_ms > 0) {
    c->ping_at = now_ms(c);
    arq_list_push_back(&srv->ping_due, &c->node_ping);
  }
  if (c->kind == ARQ_PORT_BUS) {
    arq_list_push_back(&srv->bus_open, &c->node_open);
    addr_add(c);
  }
  arq_log(ARQ_LOG_INFO, "net", "client connected", ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote),
          ARQ_LS("port", port_names[c->kind]));
}

/* Copies the header value 'v' for a log line: control bytes become '?',
 * and a long value is cut. */
static const char *show_value(char *buf, size_t cap, arq_slice_t v) {
  size_t n = v.p ? v.n : 0, o = 0;
  for (; o < n && o + 1 < cap; o++)
    buf[o] = (unsigned char)v.p[o] < 0x20 || v.p[o] == 0x7f ? '?' : v.p[o];
  buf[o] = '\0';
  return buf;
}

/* Counts and logs an upgrade refused by 'limit'; 'key' = 'value' says what. */
static void deny(arq_conn_t *c, arq_limit_t limit, const char *key, const char *value) {
  c->srv->metrics.limit_denials[limit]++;
  arq_log(ARQ_LOG_WARN, "net", "upgrade denied by a limit", ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote),
          ARQ_LS("port", port_names[c->kind]), ARQ_LS("limit", arq_limit_name(limit)), ARQ_LS(key, value));
}

static void read_handshake(arq_conn_t *c, uint8_t *data, size_t n) {
  arq_server_t *srv = c->srv;
  size_t used = 0;
  int rc = arq_http_req_feed(c->req, (const char *)data, n, &used);
  if (rc == ARQ_AGAIN)
    return;
  if (rc < 0) {
    if (c->kind == ARQ_PORT_OPS) {
      srv->metrics.http_requests++;
      const char *why = c->req->errstr;
      arq_conn_http_reply(c, c->req->status, "text/plain; charset=utf-8", NULL, why, strlen(why),
                          ARQ_CLOSE_HANDSHAKE_FAILED);
    } else {
      refuse_upgrade(c, c->req->status, c->req->errstr);
    }
    return;
  }
  if (c->kind == ARQ_PORT_OPS) {
    arq_ops_handle(c, c->req);
    return;
  }
  arq_ws_upgrade_t up;
  if (arq_ws_upgrade_check(c->req, &up) != 0) {
    refuse_upgrade(c, up.status, up.errstr);
    return;
  }
  if (srv->draining) {
    refuse_upgrade(c, 503, "the server is shutting down");
    return;
  }
  arq_slice_t origin = arq_http_req_header(c->req, "Origin"), host = arq_http_req_header(c->req, "Host");
  if (!arq_ws_origin_allowed(origin.p, origin.n, host.p, host.n, srv->cfg->allowed_origins)) {
    char shown[128];
    deny(c, ARQ_LIMIT_ORIGIN, "origin", show_value(shown, sizeof shown, origin));
    refuse_upgrade(c, 403, "this Origin is not allowed to connect (allowed_origins)");
    return;
  }
  if (srv->nws >= srv->cfg->max_connections) {
    refuse_upgrade(c, 503, "connection limit reached");
    return;
  }
  if (c->kind == ARQ_PORT_BUS && addr_count(srv, c->addr) >= srv->cfg->max_connections_per_ip) {
    deny(c, ARQ_LIMIT_CONNECTIONS_PER_IP, "addr", c->addr);
    refuse_upgrade(c, 429, "too many connections from this address (max_connections_per_ip)");
    return;
  }
  arq_client_params_t params;
  uint32_t tel_mask = 0;
  char why[256];
  if (c->kind == ARQ_PORT_BUS &&
      arq_bus_parse_params(c->req->query.p, c->req->query.n, &params, why, sizeof why) != 0) {
    refuse_upgrade(c, 400, why);
    return;
  }
  if (c->kind == ARQ_PORT_TELEMETRY &&
      arq_telemetry_parse_query(c->req->query.p, c->req->query.n, &tel_mask, why, sizeof why) != 0) {
    refuse_upgrade(c, 400, why);
    return;
  }
  arq_identity_t id = {0};
  if (srv->auth && !authenticate(c, &id))
    return;
  if (srv->auth && c->kind == ARQ_PORT_BUS && !apply_identity(c, &id, &params)) {
    arq_identity_clear(&id);
    return;
  }
  /* A browser that sends its credential as a subprotocol offers "arqonbus"
   * too, and must get a subprotocol it offered back. */
  const char *proto = arq_http_req_has_token(c->req, "Sec-WebSocket-Protocol", ARQ_SUBPROTOCOL) ? ARQ_SUBPROTOCOL
                                                                                               : NULL;
  char resp[256];
  size_t rn = arq_ws_upgrade_response(&up, proto, resp, sizeof resp);
  arq_rcbuf_t *b = arq_rcbuf_new(rn);
  memcpy(b->data, resp, rn);
  push(c, b);
  open_websocket(c);
  if (c->kind == ARQ_PORT_BUS) {
    c->client = arq_bus_connect(srv->bus, c, &params, c->remote);
    arq_identity_clear(&id);
    if (c->state != ARQ_CONN_OPEN)
      return; /* the welcome alone was too much for the queue */
  } else {
    c->expires_ms = id.expires_ms;
    arq_identity_clear(&id);
    arq_telemetry_attach(srv, c, tel_mask);
  }
  /* A client may send frames right behind its request. */
  srv->metrics.bytes_in += n - used;
  read_frames(c, data + used, n - used);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  arq_conn_t *c = (arq_conn_t *)h;
  *buf = uv_buf_init((char *)c->srv->rbuf, sizeof c->srv->rbuf);
}

/* Bytes of the HTTP request or WebSocket frames, as read or as decrypted. */
static void read_plain(arq_conn_t *c, uint8_t *data, size_t n) {
  if (c->opened)
    c->srv->metrics.bytes_in += n;
  if (c->input_done)
    return; /* lingering close: discard */
  if (c->state == ARQ_CONN_HANDSHAKE)
    read_handshake(c, data, n);
  else
    read_frames(c, data, n);
}

/* The session failed: a failed handshake (an old version, plaintext on a TLS
 * port, no shared cipher) is counted; either way the alert OpenSSL made goes
 * out before the write side is shut down. */
static void tls_failed(arq_conn_t *c, bool handshake) {
  char text[256];
  const char *why = text;
  arq_tls_strerror(c->tls, text, sizeof text);
  c->input_done = true;
  if (handshake)
    c->srv->metrics.tls_handshake_errors++;
  arq_log(handshake ? ARQ_LOG_INFO : ARQ_LOG_WARN, "net", handshake ? "tls handshake failed" : "tls error",
          ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote), ARQ_LS("port", port_names[c->kind]),
          ARQ_LS("why", why));
  if (c->state != ARQ_CONN_CLOSING)
    start_closing(c, handshake ? ARQ_CLOSE_HANDSHAKE_FAILED : ARQ_CLOSE_IO_ERROR);
  arq_server_want_flush(c->srv, c);
}

/* Ciphertext 'data' (in the shared read buffer) goes into the session; the
 * plaintext it yields is decrypted into that same buffer, one record at a
 * time, and read like plaintext. */
static void read_tls(arq_conn_t *c, const uint8_t *data, size_t n) {
  arq_server_t *srv = c->srv;
  arq_tls_t *t = c->tls;
  bool established = arq_tls_established(t);
  int rc = ARQ_AGAIN;
  arq_tls_feed(t, data, n);
  while (c->state != ARQ_CONN_CLOSED && !c->input_done) {
    size_t got;
    rc = arq_tls_read(t, srv->rbuf, sizeof srv->rbuf, &got);
    if (!established && arq_tls_established(t)) {
      established = true;
      arq_tls_trim(t, 0); /* the handshake's buffers */
      arq_log(ARQ_LOG_DEBUG, "net", "tls established", ARQ_LI("conn", c->id), ARQ_LS("remote", c->remote),
              ARQ_LS("protocol", arq_tls_protocol(t)), ARQ_LS("cipher", arq_tls_cipher(t)));
    }
    if (rc != ARQ_OK)
      break;
    read_plain(c, srv->rbuf, got);
  }
  if (c->state == ARQ_CONN_CLOSED)
    return;
  if (rc == ARQ_EPROTO) {
    tls_failed(c, !established);
    return;
  }
  if (rc == ARQ_ECLOSED) {
    /* close_notify: the peer sends nothing more. A closing connection still
     * writes what it owes and waits for the EOF; any other is gone. */
    c->input_done = true;
    if (c->state != ARQ_CONN_CLOSING) {
      arq_conn_destroy(c, ARQ_CLOSE_PEER_GONE);
      return;
    }
  }
  if (arq_tls_pending(t) > 0)
    arq_server_want_flush(srv, c); /* handshake messages, session tickets */
  arq_tls_trim(t, TLS_KEEP);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  arq_conn_t *c = (arq_conn_t *)s;
  if (nread == 0 || c->state == ARQ_CONN_CLOSED)
    return;
  if (nread < 0) {
    /* EOF ends a closing connection normally; otherwise the peer vanished. */
    arq_conn_destroy(c, nread == UV_EOF ? ARQ_CLOSE_PEER_GONE : ARQ_CLOSE_IO_ERROR);
    return;
  }
  c->srv->read_ns = uv_hrtime(); /* arrival of what this read completes */
  if (!c->tls)
    read_plain(c, (uint8_t *)buf->base, (size_t)nread);
  else if (!c->input_done) /* else a lingering close: discard */
    read_tls(c, (uint8_t *)buf->base, (size_t)nread);
}

/* ---- accepting ---------------------------------------------------------- */

static void format_peer(arq_conn_t *c) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  char ip[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) == 0) {
    if (ss.ss_family == AF_INET6) {
      uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof ip);
      port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    } else {
      uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof ip);
      port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    }
  }
  snprintf(c->remote, sizeof c->remote, "%s:%d", ip, port);
  snprintf(c->addr, sizeof c->addr, "%s", ip);
}

static void on_reject_closed(uv_handle_t *h) { arq_free(h); }

void arq_conn_accept(arq_listener_t *l) {
  arq_server_t *srv = l->srv;
  arq_conn_t *c = arq_calloc(1, sizeof(*c));
  c->srv = srv;
  c->kind = (uint8_t)l->kind;
  arq_list_init(&c->node_all);
  arq_list_init(&c->node_open);
  arq_list_init(&c->node_deadline);
  arq_list_init(&c->node_ping);
  arq_list_init(&c->node_pong);
  arq_list_init(&c->node_write);
  arq_list_init(&c->node_flush);
  uv_tcp_init(srv->loop, &c->tcp);
  int rc = uv_accept((uv_stream_t *)&l->tcp, (uv_stream_t *)&c->tcp);
  bool refuse = srv->draining && l->kind != ARQ_PORT_OPS;
  /* The ops port has a bound of its own: a flood of handshakes on the bus
   * port must not keep /health from answering. */
  bool full = l->kind == ARQ_PORT_OPS ? srv->npending_ops >= ARQ_OPS_MAX_PENDING : srv->npending >= srv->max_pending;
  if (rc != 0 || refuse || full) {
    if (rc != 0)
      arq_log(ARQ_LOG_WARN, "net", "accept failed", ARQ_LS("error", uv_strerror(rc)));
    else
      arq_log(ARQ_LOG_WARN, "net", "connection dropped: too many handshakes in progress",
              ARQ_LI("pending", srv->npending));
    uv_close((uv_handle_t *)&c->tcp, on_reject_closed);
    return;
  }
  format_peer(c);
  /* One address may not hold many handshakes open: it would take the
   * shared bound (max_pending) from everyone else. */
  arq_addr_count_t *e = l->kind == ARQ_PORT_OPS ? NULL : addr_get(c);
  if (e && e->pending >= srv->cfg->max_handshakes_per_ip) {
    addr_put(srv, e);
    srv->metrics.limit_denials[ARQ_LIMIT_HANDSHAKES_PER_IP]++;
    arq_log(ARQ_LOG_DEBUG, "net", "connection dropped: too many handshakes from this address",
            ARQ_LS("remote", c->remote), ARQ_LS("port", port_names[c->kind]));
    uv_close((uv_handle_t *)&c->tcp, on_reject_closed);
    return;
  }
  if (e)
    e->pending++;
  c->id = ++srv->next_conn_id;
  c->state = ARQ_CONN_HANDSHAKE;
  uv_tcp_nodelay(&c->tcp, 1);
  c->req = arq_malloc(sizeof(*c->req));
  arq_http_req_init(c->req, srv->cfg->max_header_size);
  arq_ws_decoder_init(&c->dec, srv->cfg->max_message_size, true);
  if (srv->tls_ctx)
    c->tls = arq_tls_new(srv->tls_ctx);
  srv->nconns++;
  if (l->kind == ARQ_PORT_OPS)
    srv->npending_ops++;
  else
    srv->npending++;
  arq_list_push_back(&srv->conns, &c->node_all);
  c->deadline = now_ms(c) + srv->cfg->handshake_timeout_ms;
  arq_list_push_back(&srv->handshaking, &c->node_deadline);
  rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  if (rc != 0)
    arq_conn_destroy(c, ARQ_CLOSE_IO_ERROR);
}
