/* arqbench: a fan-out benchmark client for the ArqonBus bus port.
 *
 * One process, one libuv loop. It opens N subscriber connections and one
 * publisher connection (raw TCP, a hand-written upgrade request, the 101 and
 * its accept key checked). Subscribers join the channel bench:fanout with the
 * channel query parameter of their upgrade; then the publisher sends M event
 * envelopes to that channel as masked text frames. Each subscriber should see
 * every sequence number once, in order; the publisher gets none back (the
 * server does not echo a sender's events by default).
 *
 * Flow control is a window over whole deliveries: a message is complete when
 * all N subscribers have received it (a countdown per sequence number), and
 * the publisher keeps at most W messages sent but not complete. That bounds
 * what the server queues per client far below its slow-consumer limit, so the
 * run measures throughput without anyone being disconnected.
 *
 * Each message is an envelope of exactly --size bytes:
 *
 *   {"type":"event","room":"bench","channel":"fanout","payload":{"m":"<seq>:<ns>:xx...x"}}
 *
 * where <ns> is the send time in ns since the run started (CLOCK_MONOTONIC).
 * Subscribers find the sequence number after "payload":{"m":" in what the
 * server delivers; other envelopes (the welcome, join notifications) are
 * counted and skipped.
 *
 * Latency is receive time minus send time, with the receive time taken once
 * per read callback (a read holds many frames), into a log-linear histogram
 * with 32 sub-buckets per power of two (about 3% resolution).
 */
#define _GNU_SOURCE /* strcasestr */
#include <getopt.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <uv.h>

#include "util/alloc.h"
#include "util/err.h"
#include "wire/frame.h"
#include "wire/handshake.h"

#define MAX_CONNECTING 256          /* handshakes in progress at once */
#define BATCH_FRAMES 256            /* frames per publisher write, at most */
#define BATCH_BYTES (64 * 1024)     /* bytes per publisher write, at most */
#define READ_BUF_SIZE (256 * 1024)  /* one read buffer, shared by every connection */
#define MAX_RESPONSE_HEAD 1024
#define SETUP_TIMEOUT_MS 60000      /* connecting and upgrading everyone */
#define GRACE_MS 5000               /* after the duration limit, for the window to drain */
#define CLOSE_WAIT_MS 2000          /* for our close frames to go out at the end */
#define TICK_MS 50
#define SERVER_DEFAULT_QUEUE (1024 * 1024) /* max_outbound_queue */
#define MAX_CLOSE_CODES 16
#define ENV_PREFIX "{\"type\":\"event\",\"room\":\"bench\",\"channel\":\"fanout\",\"payload\":{\"m\":\""
#define ENV_SUFFIX "\"}}"
#define DELIVERED_KEY "\"payload\":{\"m\":\""
#define HIST_SUB_BITS 5
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS (2 * HIST_SUB + (64 - HIST_SUB_BITS - 1) * HIST_SUB)

typedef struct options {
  const char *host;
  int port;
  unsigned subs;
  uint64_t msgs;
  size_t size;
  unsigned window;
  double duration_limit; /* seconds of publishing */
} options_t;

typedef enum { PEER_CONNECTING = 0, PEER_HANDSHAKE, PEER_OPEN, PEER_CLOSED } peer_state_t;

typedef struct bench bench_t;

typedef struct peer {
  uv_tcp_t tcp;             /* first, so the handle is the peer */
  uv_connect_t connect_req;
  bench_t *bench;
  unsigned index;           /* in bench->peers */
  bool publisher;
  uint8_t state;            /* peer_state_t */
  char key[25];             /* Sec-WebSocket-Key sent */
  char *head;               /* the response head as it arrives; handshake only */
  size_t head_len;
  arq_ws_decoder_t dec;
  uint64_t next_seq;        /* the sequence number expected next */
} peer_t;

/* One uv_write with its bytes, freed in the callback. */
typedef struct out_write {
  uv_write_t req;
  peer_t *peer;
  bool publish;             /* a publisher batch: counts against the window */
  bool close_after;         /* our close frame: close the handle once written */
  size_t len;
  uint8_t data[];
} out_write_t;

typedef struct close_count {
  uint16_t code;
  uint64_t count;
} close_count_t;

struct bench {
  uv_loop_t *loop;
  options_t opt;
  struct sockaddr_storage addr;
  peer_t **peers;           /* subscribers first, the publisher last */
  unsigned npeers;
  peer_t *pub;
  unsigned next_connect;
  unsigned connecting;      /* connects started, not yet upgraded */
  unsigned open;
  uv_timer_t tick;
  /* publishing */
  uint32_t *remaining;      /* per sequence: subscribers that still have to receive it */
  uint64_t sent;
  uint64_t completed;
  size_t frame_len;
  unsigned refill;          /* free window slots worth a write */
  uint64_t rng;
  bool publishing;
  bool limit_hit;           /* --duration-limit passed: publish no more */
  bool finishing;           /* results are in; closing down */
  uint64_t start_ms;        /* loop time: setup start, then publish start */
  uint64_t setup_ns;        /* connecting and upgrading everyone took this long */
  uint64_t t0;              /* uv_hrtime() at the first publish */
  uint64_t t_done;          /* uv_hrtime() when the last message completed */
  uint64_t now_ns;          /* receive time of the read being processed */
  /* results */
  uint64_t deliveries;      /* data messages received by subscribers */
  uint64_t echoes;          /* envelopes received by the publisher (its welcome) */
  uint64_t system_msgs;     /* other envelopes received by subscribers */
  uint64_t order_errors;    /* gaps, repeats, reordering, unparsable payloads */
  uint64_t unexpected_closes;
  close_count_t closes[MAX_CLOSE_CODES];
  unsigned nclose_codes;
  const char *abort_reason; /* set when the run could not complete */
  char abort_buf[256];
  uint64_t hist[HIST_BUCKETS];
  uint64_t hist_count;
  uint64_t lat_max;
  uint8_t rbuf[READ_BUF_SIZE];
};

static void finish(bench_t *b);

/* ---- small helpers ------------------------------------------------------ */

static uint64_t rng_next(bench_t *b) {
  /* xorshift64*: masks and keys need to vary, not to be secret here. */
  b->rng ^= b->rng >> 12;
  b->rng ^= b->rng << 25;
  b->rng ^= b->rng >> 27;
  return b->rng * 0x2545F4914F6CDD1DULL;
}

static unsigned digits(uint64_t v) {
  unsigned n = 1;
  while (v >= 10) {
    v /= 10;
    n++;
  }
  return n;
}

/* Writes 'v' in decimal at 'p' and returns the length. */
static size_t put_u64(char *p, uint64_t v) {
  char tmp[20];
  size_t n = 0;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  for (size_t i = 0; i < n; i++)
    p[i] = tmp[n - 1 - i];
  return n;
}

/* Reads decimal digits up to a ':' at '*p' (advanced past it). Returns false
 * when there is no number followed by ':' before 'end'. */
static bool get_u64(const uint8_t **p, const uint8_t *end, uint64_t *out) {
  const uint8_t *s = *p;
  uint64_t v = 0;
  while (s < end && *s >= '0' && *s <= '9')
    v = v * 10 + (uint64_t)(*s++ - '0');
  if (s == *p || s == end || *s != ':')
    return false;
  *p = s + 1;
  *out = v;
  return true;
}

/* Ends the run with the first reason given (printf-style). */
__attribute__((format(printf, 2, 3))) static void abort_run(bench_t *b, const char *fmt, ...) {
  if (b->abort_reason == NULL) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->abort_buf, sizeof b->abort_buf, fmt, ap);
    va_end(ap);
    b->abort_reason = b->abort_buf;
  }
  finish(b);
}

static void record_close(bench_t *b, uint16_t code) {
  for (unsigned i = 0; i < b->nclose_codes; i++) {
    if (b->closes[i].code == code) {
      b->closes[i].count++;
      return;
    }
  }
  if (b->nclose_codes < MAX_CLOSE_CODES)
    b->closes[b->nclose_codes++] = (close_count_t){code, 1};
}

/* ---- latency histogram -------------------------------------------------- */

static unsigned hist_index(uint64_t v) {
  if (v < 2 * HIST_SUB)
    return (unsigned)v;
  unsigned shift = (unsigned)(63 - __builtin_clzll(v)) - HIST_SUB_BITS; /* >= 1 */
  return 2 * HIST_SUB + (shift - 1) * HIST_SUB + (unsigned)((v >> shift) - HIST_SUB);
}

/* The largest value that falls into bucket 'i'. */
static uint64_t hist_upper(unsigned i) {
  if (i < 2 * HIST_SUB)
    return i;
  unsigned shift = (i - 2 * HIST_SUB) / HIST_SUB + 1;
  uint64_t m = (i - 2 * HIST_SUB) % HIST_SUB + HIST_SUB;
  return ((m + 1) << shift) - 1;
}

static void hist_add(bench_t *b, uint64_t ns) {
  b->hist[hist_index(ns)]++;
  b->hist_count++;
  if (ns > b->lat_max)
    b->lat_max = ns;
}

static uint64_t hist_percentile(const bench_t *b, double p) {
  if (b->hist_count == 0)
    return 0;
  uint64_t rank = (uint64_t)(p / 100.0 * (double)b->hist_count + 0.5);
  if (rank < 1)
    rank = 1;
  uint64_t seen = 0;
  for (unsigned i = 0; i < HIST_BUCKETS; i++) {
    seen += b->hist[i];
    if (seen >= rank)
      return hist_upper(i) < b->lat_max ? hist_upper(i) : b->lat_max;
  }
  return b->lat_max;
}

/* ---- writing ------------------------------------------------------------ */

static void on_peer_closed(uv_handle_t *h) {
  peer_t *p = (peer_t *)h;
  arq_ws_decoder_free(&p->dec);
  arq_free(p->head);
  arq_free(p);
}

static void close_peer(peer_t *p) {
  if (p->state == PEER_CLOSED)
    return;
  p->state = PEER_CLOSED;
  p->bench->peers[p->index] = NULL;
  if (p == p->bench->pub)
    p->bench->pub = NULL;
  uv_close((uv_handle_t *)&p->tcp, on_peer_closed);
}

static void publish_more(bench_t *b);

static void on_written(uv_write_t *req, int status) {
  out_write_t *w = (out_write_t *)req;
  peer_t *p = w->peer;
  bench_t *b = p->bench;
  bool publish = w->publish;
  bool close_after = w->close_after;
  arq_free(w);
  if (status == UV_ECANCELED)
    return; /* the handle is closing */
  if (status < 0 && !b->finishing) {
    abort_run(b, "write failed: %s", uv_strerror(status));
    return;
  }
  if (close_after)
    close_peer(p);
  else if (publish)
    publish_more(b);
}

static out_write_t *write_new(peer_t *p, size_t cap) {
  out_write_t *w = arq_malloc(sizeof(*w) + cap);
  w->peer = p;
  w->publish = false;
  w->close_after = false;
  w->len = 0;
  return w;
}

static void write_start(out_write_t *w) {
  peer_t *p = w->peer;
  uv_buf_t buf = uv_buf_init((char *)w->data, (unsigned)w->len);
  int rc = uv_write(&w->req, (uv_stream_t *)&p->tcp, &buf, 1, on_written);
  if (rc != 0) {
    bench_t *b = p->bench;
    arq_free(w);
    if (!b->finishing)
      abort_run(b, "write failed: %s", uv_strerror(rc));
    else
      close_peer(p);
  }
}

/* Appends one masked frame to 'w' (room is the caller's business). */
static uint8_t *frame_append(bench_t *b, out_write_t *w, uint8_t opcode, size_t len) {
  uint64_t r = rng_next(b);
  uint8_t mask[4] = {(uint8_t)r, (uint8_t)(r >> 8), (uint8_t)(r >> 16), (uint8_t)(r >> 24)};
  w->len += arq_ws_header_encode(w->data + w->len, true, opcode, len, mask);
  uint8_t *payload = w->data + w->len;
  w->len += len;
  return payload;
}

static void send_control(peer_t *p, uint8_t opcode, const uint8_t *payload, size_t len, bool close_after) {
  out_write_t *w = write_new(p, ARQ_WS_MAX_HEADER + len);
  uint8_t *dst = frame_append(p->bench, w, opcode, len);
  if (len)
    memcpy(dst, payload, len);
  arq_ws_mask(dst, len, dst - 4, 0);
  w->close_after = close_after;
  write_start(w);
}

/* ---- publishing --------------------------------------------------------- */

static void publish_more(bench_t *b) {
  const options_t *o = &b->opt;
  while (b->publishing && !b->limit_hit && b->pub && b->sent < o->msgs) {
    uint64_t in_flight = b->sent - b->completed;
    uint64_t free_slots = o->window - in_flight;
    uint64_t left = o->msgs - b->sent;
    uint64_t n = free_slots < left ? free_slots : left;
    /* Wait for a worthwhile batch unless this is the tail of the run. */
    if (n == 0 || (n < b->refill && n < left))
      return;
    uint64_t max_frames = BATCH_BYTES / b->frame_len;
    if (max_frames < 1)
      max_frames = 1;
    if (max_frames > BATCH_FRAMES)
      max_frames = BATCH_FRAMES;
    if (n > max_frames)
      n = max_frames;
    out_write_t *w = write_new(b->pub, n * b->frame_len);
    w->publish = true;
    uint64_t ts = uv_hrtime() - b->t0;
    for (uint64_t i = 0; i < n; i++) {
      uint64_t seq = b->sent + i;
      uint8_t *payload = frame_append(b, w, ARQ_WS_OP_TEXT, o->size);
      size_t k = sizeof ENV_PREFIX - 1;
      memcpy(payload, ENV_PREFIX, k);
      k += put_u64((char *)payload + k, seq);
      payload[k++] = ':';
      k += put_u64((char *)payload + k, ts);
      payload[k++] = ':';
      memset(payload + k, 'x', o->size - k - (sizeof ENV_SUFFIX - 1));
      memcpy(payload + o->size - (sizeof ENV_SUFFIX - 1), ENV_SUFFIX, sizeof ENV_SUFFIX - 1);
      b->remaining[seq] = o->subs;
      arq_ws_mask(payload, o->size, payload - 4, 0);
    }
    b->sent += n;
    write_start(w);
  }
}

static void start_publishing(bench_t *b) {
  b->publishing = true;
  b->start_ms = uv_now(b->loop);
  b->t0 = uv_hrtime();
  b->setup_ns = b->t0 - b->setup_ns;
  fprintf(stderr, "arqbench: %u subscribers and the publisher are connected; publishing\n", b->opt.subs);
  publish_more(b);
}

/* All sent messages reached everyone: done, unless more are to be sent. */
static void check_done(bench_t *b) {
  if (!b->publishing || b->finishing || b->completed != b->sent)
    return;
  if (b->sent == b->opt.msgs || b->limit_hit) {
    b->t_done = uv_hrtime();
    finish(b);
  }
}

/* ---- reading ------------------------------------------------------------ */

static void on_data(peer_t *p, const uint8_t *data, size_t len) {
  bench_t *b = p->bench;
  if (p->publisher) {
    b->echoes++;
    if (len > 30 && memmem(data, len, "\"type\":\"error\"", 15))
      abort_run(b, "the server answered the publisher with an error: %.*s", (int)(len > 300 ? 300 : len), data);
    return;
  }
  const uint8_t *key = memmem(data, len, DELIVERED_KEY, sizeof DELIVERED_KEY - 1);
  if (!key) {
    b->system_msgs++;
    return;
  }
  b->deliveries++;
  const uint8_t *s = key + sizeof DELIVERED_KEY - 1, *end = data + len;
  uint64_t seq, ts;
  if (!get_u64(&s, end, &seq) || !get_u64(&s, end, &ts) || seq >= b->sent) {
    b->order_errors++;
    return;
  }
  if (seq != p->next_seq)
    b->order_errors++;
  p->next_seq = seq + 1;
  if (b->remaining[seq] == 0) {
    b->order_errors++; /* a duplicate */
    return;
  }
  if (--b->remaining[seq] == 0)
    b->completed++;
  uint64_t sent_at = b->t0 + ts;
  hist_add(b, b->now_ns > sent_at ? b->now_ns - sent_at : 0);
}

static void on_close_frame(peer_t *p, uint16_t code, const uint8_t *reason, size_t reason_len) {
  bench_t *b = p->bench;
  record_close(b, code);
  if (b->finishing)
    return;
  b->unexpected_closes++;
  abort_run(b, "the server closed a %s with %u \"%.*s\"", p->publisher ? "publisher" : "subscriber", code,
            (int)reason_len, (const char *)reason);
}

static void read_frames(peer_t *p, uint8_t *data, size_t n) {
  bench_t *b = p->bench;
  while (n > 0 && p->state == PEER_OPEN) {
    size_t used;
    arq_ws_msg_t m;
    int rc = arq_ws_decode(&p->dec, data, n, &used, &m);
    data += used;
    n -= used;
    if (rc == ARQ_AGAIN)
      return;
    if (rc < 0) {
      abort_run(b, "bad frame from the server: %s", p->dec.errstr);
      return;
    }
    switch (m.opcode) {
    case ARQ_WS_OP_TEXT:
    case ARQ_WS_OP_BINARY:
      on_data(p, m.data, m.len);
      break;
    case ARQ_WS_OP_PING:
      send_control(p, ARQ_WS_OP_PONG, m.data, m.len, false);
      break;
    case ARQ_WS_OP_CLOSE:
      on_close_frame(p, m.close_code, m.reason, m.reason_len);
      return;
    default:
      break;
    }
  }
}

static void connect_more(bench_t *b);

/* Checks the 101 once the whole head is in; the bytes after it are frames. */
static void read_handshake(peer_t *p, const uint8_t *data, size_t n) {
  bench_t *b = p->bench;
  /* Frames (the welcome) may follow the head in the same read: copy only
   * what fits, the rest is handed to the frame reader below. */
  size_t take = MAX_RESPONSE_HEAD - 1 - p->head_len;
  if (take > n)
    take = n;
  memcpy(p->head + p->head_len, data, take);
  p->head_len += take;
  p->head[p->head_len] = '\0';
  char *end = strstr(p->head, "\r\n\r\n");
  if (end == NULL) {
    if (p->head_len == MAX_RESPONSE_HEAD - 1)
      abort_run(b, "the upgrade response head is too long");
    return;
  }
  size_t head_len = (size_t)(end + 4 - p->head);
  char expect[ARQ_WS_ACCEPT_LEN + 1];
  arq_ws_accept_key(p->key, strlen(p->key), expect);
  const char *accept = strcasestr(p->head, "\r\nSec-WebSocket-Accept:");
  if (strncmp(p->head, "HTTP/1.1 101 ", 13) != 0) {
    abort_run(b, "upgrade refused: %.*s", (int)strcspn(p->head, "\r\n"), p->head);
    return;
  }
  if (accept == NULL || accept > end) {
    abort_run(b, "the 101 has no Sec-WebSocket-Accept");
    return;
  }
  accept += strlen("\r\nSec-WebSocket-Accept:");
  accept += strspn(accept, " \t");
  if (strncmp(accept, expect, ARQ_WS_ACCEPT_LEN) != 0) {
    abort_run(b, "the 101 has a wrong Sec-WebSocket-Accept");
    return;
  }
  p->state = PEER_OPEN;
  arq_ws_decoder_init(&p->dec, UINT32_MAX, false);
  b->connecting--;
  b->open++;
  /* Frames may follow the head in the same read. */
  size_t rest = p->head_len - head_len;
  uint8_t *frames = (uint8_t *)p->head + head_len;
  if (rest > 0)
    read_frames(p, frames, rest);
  if (n > take && p->state == PEER_OPEN)
    read_frames(p, (uint8_t *)data + take, n - take);
  arq_free(p->head);
  p->head = NULL;
  if (b->finishing)
    return;
  if (b->open == b->npeers)
    start_publishing(b);
  else
    connect_more(b);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  bench_t *b = ((peer_t *)h)->bench;
  *buf = uv_buf_init((char *)b->rbuf, sizeof b->rbuf);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  peer_t *p = (peer_t *)s;
  bench_t *b = p->bench;
  if (nread == 0 || p->state == PEER_CLOSED)
    return;
  if (nread < 0) {
    if (!b->finishing) {
      record_close(b, ARQ_WS_CLOSE_ABNORMAL);
      b->unexpected_closes++;
      abort_run(b, "a %s connection ended without a close frame: %s", p->publisher ? "publisher" : "subscriber",
                uv_strerror((int)nread));
    }
    close_peer(p);
    return;
  }
  if (b->finishing)
    return; /* the results are in; what still arrives is discarded */
  b->now_ns = uv_hrtime();
  uint64_t completed = b->completed;
  if (p->state == PEER_HANDSHAKE)
    read_handshake(p, (const uint8_t *)buf->base, (size_t)nread);
  else
    read_frames(p, (uint8_t *)buf->base, (size_t)nread);
  if (b->completed != completed) {
    check_done(b);
    publish_more(b);
  }
}

/* ---- connecting --------------------------------------------------------- */

static void on_connect(uv_connect_t *req, int status) {
  peer_t *p = req->data;
  bench_t *b = p->bench;
  if (status == UV_ECANCELED)
    return;
  if (status < 0) {
    abort_run(b, "connect to %s:%d failed: %s", b->opt.host, b->opt.port, uv_strerror(status));
    return;
  }
  if (b->finishing)
    return;
  p->state = PEER_HANDSHAKE;
  uv_tcp_nodelay(&p->tcp, 1);
  int rc = uv_read_start((uv_stream_t *)&p->tcp, on_alloc, on_read);
  if (rc != 0) {
    abort_run(b, "read failed: %s", uv_strerror(rc));
    return;
  }
  out_write_t *w = write_new(p, 512);
  int n = snprintf((char *)w->data, 512,
                   "GET %s HTTP/1.1\r\n"
                   "Host: %s:%d\r\n"
                   "Upgrade: websocket\r\n"
                   "Connection: Upgrade\r\n"
                   "Sec-WebSocket-Key: %s\r\n"
                   "Sec-WebSocket-Version: 13\r\n"
                   "\r\n",
                   p->publisher ? "/?client_id=bench-publisher&client_type=service" : "/?channel=bench:fanout",
                   b->opt.host, b->opt.port, p->key);
  w->len = (size_t)n;
  write_start(w);
}

static void start_peer(bench_t *b, unsigned i) {
  peer_t *p = arq_calloc(1, sizeof(*p));
  p->bench = b;
  p->index = i;
  p->publisher = i == b->npeers - 1;
  p->state = PEER_CONNECTING;
  p->head = arq_malloc(MAX_RESPONSE_HEAD);
  uint8_t raw[16];
  for (int k = 0; k < 16; k += 8) {
    uint64_t r = rng_next(b);
    memcpy(raw + k, &r, 8);
  }
  EVP_EncodeBlock((unsigned char *)p->key, raw, sizeof raw);
  b->peers[i] = p;
  if (p->publisher)
    b->pub = p;
  uv_tcp_init(b->loop, &p->tcp);
  p->connect_req.data = p;
  int rc = uv_tcp_connect(&p->connect_req, &p->tcp, (const struct sockaddr *)&b->addr, on_connect);
  b->connecting++;
  if (rc != 0) {
    abort_run(b, "connect failed: %s", uv_strerror(rc));
  }
}

static void connect_more(bench_t *b) {
  while (!b->finishing && b->next_connect < b->npeers && b->connecting < MAX_CONNECTING)
    start_peer(b, b->next_connect++);
}

/* ---- results ------------------------------------------------------------ */

static void print_summary(const bench_t *b) {
  const options_t *o = &b->opt;
  uint64_t end = b->t_done ? b->t_done : uv_hrtime();
  double elapsed = b->publishing ? (double)(end - b->t0) / 1e9 : 0.0;
  double per_s = elapsed > 0 ? 1.0 / elapsed : 0.0;
  printf("arqbench results\n");
  printf("  subscribers         %u (+1 publisher)", o->subs);
  if (b->publishing)
    printf(", connected and upgraded in %.2f s", (double)b->setup_ns / 1e9);
  printf("\n");
  printf("  messages            %" PRIu64 " published, %" PRIu64 " complete (of %" PRIu64 " requested)%s\n", b->sent,
         b->completed, o->msgs, b->limit_hit && b->sent < o->msgs ? ", stopped by --duration-limit" : "");
  printf("  payload size        %zu bytes (%zu on the wire per frame to a client)\n", o->size, b->frame_len - 4);
  printf("  window              %u messages\n", o->window);
  printf("  deliveries          %" PRIu64 " to subscribers (+%" PRIu64 " system envelopes to them, %" PRIu64
         " to the publisher)\n",
         b->deliveries, b->system_msgs, b->echoes);
  printf("  elapsed             %.3f s\n", elapsed);
  printf("  deliveries/s        %.0f\n", (double)b->deliveries * per_s);
  printf("  messages/s          %.0f published, %.0f complete\n", (double)b->sent * per_s,
         (double)b->completed * per_s);
  printf("  latency us          p50 %.1f  p90 %.1f  p99 %.1f  max %.1f  (%" PRIu64 " samples)\n",
         (double)hist_percentile(b, 50) / 1e3, (double)hist_percentile(b, 90) / 1e3,
         (double)hist_percentile(b, 99) / 1e3, (double)b->lat_max / 1e3, b->hist_count);
  printf("  ordering errors     %" PRIu64 "\n", b->order_errors);
  printf("  closes received     ");
  if (b->nclose_codes == 0)
    printf("none");
  for (unsigned i = 0; i < b->nclose_codes; i++)
    printf("%s%u x%" PRIu64, i ? ", " : "", b->closes[i].code, b->closes[i].count);
  printf(" (%" PRIu64 " unexpected)\n", b->unexpected_closes);
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) == 0)
    printf("  arqbench cpu        user %.2f s, sys %.2f s (whole process)\n",
           (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
  if (b->abort_reason)
    printf("  aborted             %s\n", b->abort_reason);
  fflush(stdout);
}

/* Prints the results once and closes every connection with a close frame. */
static void finish(bench_t *b) {
  if (b->finishing)
    return;
  b->finishing = true;
  print_summary(b);
  b->start_ms = uv_now(b->loop);
  uint8_t payload[2] = {ARQ_WS_CLOSE_NORMAL >> 8, ARQ_WS_CLOSE_NORMAL & 0xFF};
  for (unsigned i = 0; i < b->npeers; i++) {
    peer_t *p = b->peers[i];
    if (p == NULL)
      continue;
    if (p->state == PEER_OPEN)
      send_control(p, ARQ_WS_OP_CLOSE, payload, sizeof payload, true);
    else
      close_peer(p); /* a pending connect completes with UV_ECANCELED */
  }
}

static void on_tick(uv_timer_t *t) {
  bench_t *b = t->data;
  uint64_t now = uv_now(b->loop);
  if (b->finishing) {
    bool any = false;
    for (unsigned i = 0; i < b->npeers; i++) {
      peer_t *p = b->peers[i];
      if (p == NULL)
        continue;
      any = true;
      if (now - b->start_ms >= CLOSE_WAIT_MS || p->state != PEER_OPEN)
        close_peer(p);
    }
    if (!any)
      uv_close((uv_handle_t *)t, NULL);
    return;
  }
  if (!b->publishing) {
    if (now - b->start_ms >= SETUP_TIMEOUT_MS) {
      abort_run(b, "only %u of %u connections upgraded within %d s", b->open, b->npeers, SETUP_TIMEOUT_MS / 1000);
    }
    return;
  }
  uint64_t limit_ms = (uint64_t)(b->opt.duration_limit * 1000.0);
  if (!b->limit_hit && now - b->start_ms >= limit_ms) {
    b->limit_hit = true;
    check_done(b);
  } else if (b->limit_hit && now - b->start_ms >= limit_ms + GRACE_MS) {
    abort_run(b, "%" PRIu64 " messages did not reach every subscriber", b->sent - b->completed);
  }
}

/* ---- options ------------------------------------------------------------ */

static void usage(FILE *out) {
  fputs("usage: arqbench --port PORT [--host 127.0.0.1] [--subs 1000] [--msgs 200000]\n"
        "                [--size 128] [--window 1000] [--duration-limit 60]\n"
        "Fan-out benchmark: SUBS subscribers of bench:fanout receive MSGS event\n"
        "envelopes of SIZE bytes from one publisher, with at most WINDOW messages not\n"
        "yet received by every subscriber. Publishing stops after DURATION-LIMIT seconds.\n",
        out);
}

static int parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out) {
  char *end;
  unsigned long long v = strtoull(s, &end, 10);
  if (*s == '\0' || *s == '-' || *end != '\0' || v < min || v > max)
    return ARQ_EINVAL;
  *out = v;
  return 0;
}

static int parse_options(int argc, char **argv, options_t *o) {
  static const struct option longopts[] = {
      {"host", required_argument, NULL, 'h'},   {"port", required_argument, NULL, 'p'},
      {"subs", required_argument, NULL, 'n'},   {"msgs", required_argument, NULL, 'm'},
      {"size", required_argument, NULL, 's'},   {"window", required_argument, NULL, 'w'},
      {"duration-limit", required_argument, NULL, 'd'}, {"help", no_argument, NULL, 'H'},
      {NULL, 0, NULL, 0},
  };
  *o = (options_t){.host = "127.0.0.1", .subs = 1000, .msgs = 200000, .size = 128, .window = 1000,
                   .duration_limit = 60};
  int c;
  uint64_t v;
  while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
    const char *name = NULL;
    switch (c) {
    case 'h':
      o->host = optarg;
      break;
    case 'p':
      if (parse_u64(optarg, 1, 65535, &v) != 0)
        name = "--port";
      o->port = (int)v;
      break;
    case 'n':
      if (parse_u64(optarg, 1, 1000000, &v) != 0)
        name = "--subs";
      o->subs = (unsigned)v;
      break;
    case 'm':
      if (parse_u64(optarg, 1, 1000000000, &v) != 0)
        name = "--msgs";
      o->msgs = v;
      break;
    case 's':
      if (parse_u64(optarg, 1, 16 * 1024 * 1024, &v) != 0)
        name = "--size";
      o->size = (size_t)v;
      break;
    case 'w':
      if (parse_u64(optarg, 1, 100000000, &v) != 0)
        name = "--window";
      o->window = (unsigned)v;
      break;
    case 'd': {
      char *end;
      o->duration_limit = strtod(optarg, &end);
      if (*end != '\0' || !(o->duration_limit > 0) || o->duration_limit > 86400)
        name = "--duration-limit";
      break;
    }
    case 'H':
      usage(stdout);
      exit(0);
    default:
      usage(stderr);
      return ARQ_EINVAL;
    }
    if (name) {
      fprintf(stderr, "arqbench: invalid value '%s' for %s\n", optarg, name);
      return ARQ_EINVAL;
    }
  }
  if (optind < argc || o->port == 0) {
    usage(stderr);
    return ARQ_EINVAL;
  }
  /* The payload text must fit: the largest sequence number and the latest
   * possible send time, two colons. */
  uint64_t latest_ns = (uint64_t)((o->duration_limit + 1) * 1e9);
  size_t need = sizeof ENV_PREFIX - 1 + digits(o->msgs - 1) + 1 + digits(latest_ns) + 1 + sizeof ENV_SUFFIX - 1;
  if (o->size < need) {
    fprintf(stderr, "arqbench: --size must be at least %zu bytes for these --msgs and --duration-limit\n", need);
    return ARQ_EINVAL;
  }
  return 0;
}

static void raise_fd_limit(unsigned need) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
  }
  if (rl.rlim_cur != RLIM_INFINITY && need + 16 > rl.rlim_cur)
    fprintf(stderr, "arqbench: warning: %u connections but the file descriptor limit is %llu\n", need,
            (unsigned long long)rl.rlim_cur);
}

int main(int argc, char **argv) {
  int exit_code = 2;
  bench_t *b = arq_calloc(1, sizeof(*b));
  if (parse_options(argc, argv, &b->opt) != 0)
    goto free_bench;
  const options_t *o = &b->opt;
  if (uv_ip4_addr(o->host, o->port, (struct sockaddr_in *)&b->addr) != 0 &&
      uv_ip6_addr(o->host, o->port, (struct sockaddr_in6 *)&b->addr) != 0) {
    fprintf(stderr, "arqbench: invalid value '%s' for --host: not an IPv4 or IPv6 address\n", o->host);
    goto free_bench;
  }
  raise_fd_limit(o->subs + 1);
  signal(SIGPIPE, SIG_IGN);

  uint8_t hdr[ARQ_WS_MAX_HEADER];
  uint8_t mask[4] = {0};
  b->frame_len = arq_ws_header_encode(hdr, true, ARQ_WS_OP_TEXT, o->size, mask) + o->size;
  uint64_t window_bytes = (uint64_t)o->window * (b->frame_len - 4); /* as queued to one client */
  if (window_bytes > SERVER_DEFAULT_QUEUE)
    fprintf(stderr,
            "arqbench: warning: a full window is %" PRIu64 " bytes per client, over the server's default "
            "outbound queue limit of 1 MiB; expect slow_consumer closes\n",
            window_bytes);
  b->refill = o->window / 4 > BATCH_FRAMES ? BATCH_FRAMES : o->window / 4;
  if (b->refill < 1)
    b->refill = 1;
  b->rng = uv_hrtime() | 1;
  b->npeers = o->subs + 1;
  b->peers = arq_calloc(b->npeers, sizeof(*b->peers));
  b->remaining = arq_calloc(o->msgs, sizeof(*b->remaining));

  b->loop = uv_default_loop();
  uv_timer_init(b->loop, &b->tick);
  b->tick.data = b;
  b->start_ms = uv_now(b->loop);
  b->setup_ns = uv_hrtime(); /* the start; start_publishing() makes it a duration */
  uv_timer_start(&b->tick, on_tick, TICK_MS, TICK_MS);
  connect_more(b);
  uv_run(b->loop, UV_RUN_DEFAULT);

  exit_code = b->abort_reason || b->order_errors || b->unexpected_closes || b->completed != b->sent ? 1 : 0;
  uv_loop_close(b->loop);
  arq_free(b->remaining);
  arq_free(b->peers);
free_bench:
  arq_free(b);
  return exit_code;
}
