/* The Redis connection manager (see redis.h). */
#include "store/redis.h"

#include <arpa/inet.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "obs/log.h"
#include "util/alloc.h"
#include "util/err.h"

#define PING_EVERY_MS 1000
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000

struct arq_redis {
  uv_loop_t *loop;
  arq_redis_url_t url;
  uint64_t timeout_ms;
  arq_redis_state_cb cb;
  void *ud;
  redisAsyncContext *ac; /* NULL unless connecting or connected */
  bool up;
  bool closing;
  bool resolving;
  bool timer_open;
  bool ping_outstanding;
  uint64_t ping_sent_at;
  uint64_t connect_started; /* loop time of the connect in progress */
  unsigned failures;        /* connects failed in a row (only the first is a warning) */
  uint64_t backoff_ms;
  uv_timer_t timer;      /* reconnect backoff while down, pings while up */
  uv_getaddrinfo_t gai;
  char err[256];
  arq_redis_stats_t st;
};

int arq_redis_parse_url(const char *url, arq_redis_url_t *u, char *err, size_t errcap) {
  memset(u, 0, sizeof *u);
  u->port = 6379;
  if (strncmp(url, "redis://", 8) != 0) {
    snprintf(err, errcap, "must start with redis://");
    return ARQ_EINVAL;
  }
  const char *p = url + 8;
  const char *at = strrchr(p, '@');
  if (at) {
    const char *colon = memchr(p, ':', (size_t)(at - p));
    const char *pw = colon ? colon + 1 : p;
    size_t n = (size_t)(at - pw);
    if (n >= sizeof u->password) {
      snprintf(err, errcap, "the password is too long");
      return ARQ_EINVAL;
    }
    memcpy(u->password, pw, n);
    p = at + 1;
  }
  const char *slash = strchr(p, '/');
  const char *hend = slash ? slash : p + strlen(p);
  const char *pcolon = NULL;
  if (*p == '[') { /* [ipv6]:port */
    const char *close = memchr(p, ']', (size_t)(hend - p));
    if (!close) {
      snprintf(err, errcap, "an IPv6 address needs its closing ]");
      return ARQ_EINVAL;
    }
    memcpy(u->host, p + 1, (size_t)(close - p - 1));
    pcolon = close[1] == ':' ? close + 1 : NULL;
  } else {
    pcolon = memchr(p, ':', (size_t)(hend - p));
    size_t n = (size_t)((pcolon ? pcolon : hend) - p);
    if (n == 0 || n >= sizeof u->host) {
      snprintf(err, errcap, "the host is missing or too long");
      return ARQ_EINVAL;
    }
    memcpy(u->host, p, n);
  }
  if (pcolon) {
    char *end;
    long port = strtol(pcolon + 1, &end, 10);
    if (end != hend || port < 1 || port > 65535) {
      snprintf(err, errcap, "the port must be 1-65535");
      return ARQ_EINVAL;
    }
    u->port = (int)port;
  }
  if (slash && slash[1]) {
    char *end;
    long db = strtol(slash + 1, &end, 10);
    if (*end || db < 0 || db > 1000000) {
      snprintf(err, errcap, "the database must be a number");
      return ARQ_EINVAL;
    }
    u->db = (int)db;
  }
  return 0;
}

/* ---- hiredis on libuv ----------------------------------------------------
 *
 * Our own adapter rather than hiredis' adapters/libuv.h: that one (hiredis
 * 0.14) ignores a poll error, and libuv reports a refused non-blocking connect
 * as exactly that (UV_EBADF with no events), so a failed connect was never
 * noticed and the connection hung in "connecting" forever. Here an error
 * makes hiredis look at the socket itself (its write handler checks
 * SO_ERROR while connecting), which ends in the connect or disconnect
 * callback as it should.
 */
typedef struct uv_events {
  redisAsyncContext *ac; /* NULL once hiredis has let go */
  uv_poll_t poll;
  int events;
} uv_events_t;

static void ev_poll(uv_poll_t *h, int status, int events) {
  uv_events_t *e = h->data;
  if (status != 0)
    events = e->events | UV_WRITABLE;
  if (e->ac && (events & UV_READABLE))
    redisAsyncHandleRead(e->ac);
  if (e->ac && (events & UV_WRITABLE))
    redisAsyncHandleWrite(e->ac);
}

static void ev_update(uv_events_t *e, int add, int del) {
  e->events = (e->events | add) & ~del;
  if (e->events)
    uv_poll_start(&e->poll, e->events, ev_poll);
  else
    uv_poll_stop(&e->poll);
}

static void ev_add_read(void *d) { ev_update(d, UV_READABLE, 0); }
static void ev_del_read(void *d) { ev_update(d, 0, UV_READABLE); }
static void ev_add_write(void *d) { ev_update(d, UV_WRITABLE, 0); }
static void ev_del_write(void *d) { ev_update(d, 0, UV_WRITABLE); }
static void ev_closed(uv_handle_t *h) { arq_free(h->data); }

static void ev_cleanup(void *d) {
  uv_events_t *e = d;
  e->ac = NULL;
  uv_close((uv_handle_t *)&e->poll, ev_closed);
}

static int ev_attach(redisAsyncContext *ac, uv_loop_t *loop) {
  uv_events_t *e = arq_calloc(1, sizeof *e);
  if (uv_poll_init_socket(loop, &e->poll, ac->c.fd) != 0) {
    arq_free(e);
    return REDIS_ERR;
  }
  e->ac = ac;
  e->poll.data = e;
  ac->ev.data = e;
  ac->ev.addRead = ev_add_read;
  ac->ev.delRead = ev_del_read;
  ac->ev.addWrite = ev_add_write;
  ac->ev.delWrite = ev_del_write;
  ac->ev.cleanup = ev_cleanup;
  return REDIS_OK;
}

/* ---- the connection manager ---------------------------------------------- */

static void schedule_reconnect(arq_redis_t *r);
static void start_connect(arq_redis_t *r);
static void on_timer(uv_timer_t *t);

static void set_error(arq_redis_t *r, const char *what, const char *detail) {
  snprintf(r->err, sizeof r->err, "%s%s%.160s", what, detail && detail[0] ? ": " : "", detail ? detail : "");
}

static void on_reply_checked(redisAsyncContext *ac, void *reply, void *privdata) {
  arq_redis_t *r = ac->data;
  redisReply *rep = reply;
  if (r && rep && rep->type == REDIS_REPLY_ERROR) {
    r->st.errors++;
    arq_log(ARQ_LOG_WARN, "redis", "command failed", ARQ_LS("command", (const char *)privdata),
            ARQ_LS("error", rep->str));
  }
}

static void on_pong(redisAsyncContext *ac, void *reply, void *privdata) {
  arq_redis_t *r = ac->data;
  if (r && reply)
    r->ping_outstanding = false;
}

/* The first PING answered: the connection is usable. Until then a TCP
 * connection to a Redis that does not answer (stopped, overloaded) does not
 * count as up. */
static void on_ready(redisAsyncContext *ac, void *reply, void *privdata) {
  arq_redis_t *r = ac->data;
  redisReply *rep = reply;
  if (!r || !rep || r->closing)
    return; /* the connection went: the disconnect callback deals with it */
  if (rep->type == REDIS_REPLY_ERROR) {
    r->st.errors++;
    set_error(r, "Redis refused the connection", rep->str);
    return; /* the connect timeout drops it and retries */
  }
  r->up = true;
  r->failures = 0;
  r->err[0] = '\0';
  r->st.connects++;
  r->backoff_ms = 0;
  r->ping_outstanding = false;
  arq_log(ARQ_LOG_INFO, "redis", "connected", ARQ_LS("host", r->url.host), ARQ_LI("port", r->url.port));
  uint64_t every = r->timeout_ms / 2 < PING_EVERY_MS ? (r->timeout_ms / 2 ? r->timeout_ms / 2 : 1) : PING_EVERY_MS;
  uv_timer_stop(&r->timer);
  uv_timer_start(&r->timer, on_timer, every, every);
  if (r->cb)
    r->cb(r->ud, true);
}

static void on_connect(const redisAsyncContext *ac, int status) {
  arq_redis_t *r = ac->data;
  if (!r)
    return;
  if (status != REDIS_OK) {
    /* hiredis frees the context after this callback. */
    r->ac = NULL;
    set_error(r, "cannot connect", ac->errstr);
    arq_log(r->failures++ ? ARQ_LOG_DEBUG : ARQ_LOG_WARN, "redis", "cannot connect", ARQ_LS("host", r->url.host),
            ARQ_LI("port", r->url.port), ARQ_LS("error", ac->errstr));
    schedule_reconnect(r);
    return;
  }
  redisAsyncContext *c = (redisAsyncContext *)ac;
  if (r->url.password[0])
    redisAsyncCommand(c, on_reply_checked, "AUTH", "AUTH %s", r->url.password);
  if (r->url.db)
    redisAsyncCommand(c, on_reply_checked, "SELECT", "SELECT %d", r->url.db);
  redisAsyncCommand(c, on_ready, NULL, "PING");
}

static void on_disconnect(const redisAsyncContext *ac, int status) {
  arq_redis_t *r = ac->data;
  if (!r)
    return;
  bool was_up = r->up;
  r->ac = NULL;
  r->up = false;
  r->ping_outstanding = false;
  if (status != REDIS_OK || !r->err[0])
    set_error(r, "connection lost", status != REDIS_OK ? ac->errstr : "closed");
  if (r->closing)
    return;
  r->st.disconnects++;
  arq_log(ARQ_LOG_WARN, "redis", "disconnected", ARQ_LS("host", r->url.host), ARQ_LI("port", r->url.port),
          ARQ_LS("error", r->err));
  schedule_reconnect(r);
  if (was_up && r->cb)
    r->cb(r->ud, false);
}

static void connect_ip(arq_redis_t *r, const char *ip) {
  redisAsyncContext *ac = redisAsyncConnect(ip, r->url.port);
  if (!ac || ac->err) {
    set_error(r, "cannot connect", ac ? ac->errstr : "out of memory");
    if (ac)
      redisAsyncFree(ac);
    schedule_reconnect(r);
    return;
  }
  ac->data = r;
  if (ev_attach(ac, r->loop) != REDIS_OK) {
    set_error(r, "cannot attach to the event loop", NULL);
    ac->data = NULL;
    redisAsyncFree(ac);
    schedule_reconnect(r);
    return;
  }
  redisAsyncSetConnectCallback(ac, on_connect);
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
  r->ac = ac;
  /* The connect and the first PING must complete within the timeout (a
   * dropped SYN would otherwise wait for the kernel's minutes). */
  r->connect_started = uv_now(r->loop);
  uv_timer_stop(&r->timer);
  uv_timer_start(&r->timer, on_timer, r->timeout_ms, 0);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  arq_redis_t *r = req->data;
  r->resolving = false;
  if (r->closing) {
    uv_freeaddrinfo(res);
    if (!r->timer_open)
      arq_free(r);
    return;
  }
  char ip[64] = "";
  if (status == 0 && res) {
    if (res->ai_family == AF_INET6)
      uv_ip6_name((struct sockaddr_in6 *)res->ai_addr, ip, sizeof ip);
    else
      uv_ip4_name((struct sockaddr_in *)res->ai_addr, ip, sizeof ip);
  }
  uv_freeaddrinfo(res);
  if (!ip[0]) {
    set_error(r, "cannot resolve", status ? uv_strerror(status) : r->url.host);
    schedule_reconnect(r);
    return;
  }
  connect_ip(r, ip);
}

static void start_connect(arq_redis_t *r) {
  unsigned char buf[sizeof(struct in6_addr)];
  if (inet_pton(AF_INET, r->url.host, buf) == 1 || inet_pton(AF_INET6, r->url.host, buf) == 1) {
    connect_ip(r, r->url.host);
    return;
  }
  /* A name is resolved on a libuv worker thread, never on the loop. */
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
  r->gai.data = r;
  if (uv_getaddrinfo(r->loop, &r->gai, on_resolved, r->url.host, NULL, &hints) != 0) {
    set_error(r, "cannot resolve", r->url.host);
    schedule_reconnect(r);
    return;
  }
  r->resolving = true;
}

static void on_timer(uv_timer_t *t) {
  arq_redis_t *r = t->data;
  if (r->closing)
    return;
  uint64_t now = uv_now(r->loop);
  if (!r->ac && !r->resolving) {
    start_connect(r);
    return;
  }
  if (r->ac && !r->up) {
    if (now - r->connect_started >= r->timeout_ms) {
      redisAsyncContext *ac = r->ac;
      r->ac = NULL;
      ac->data = NULL; /* its callbacks now ignore it */
      redisAsyncFree(ac);
      r->st.timeouts++;
      if (!r->err[0] || strncmp(r->err, "Redis refused", 13) != 0)
        set_error(r, "cannot connect", "no answer within the timeout");
      arq_log(r->failures++ ? ARQ_LOG_DEBUG : ARQ_LOG_WARN, "redis", "cannot connect", ARQ_LS("host", r->url.host),
              ARQ_LI("port", r->url.port), ARQ_LS("error", r->err));
      schedule_reconnect(r);
    }
    return;
  }
  if (!r->up)
    return;
  if (r->ping_outstanding) {
    if (now - r->ping_sent_at >= r->timeout_ms) {
      /* A connection that stopped answering: drop it, which answers every
       * pending command with a NULL reply, and reconnect. */
      r->st.timeouts++;
      set_error(r, "Redis did not answer within the timeout", NULL);
      /* Not redisAsyncDisconnect(): that waits for the replies that are not
       * coming. Freeing runs the disconnect callback at once. */
      redisAsyncFree(r->ac);
    }
    return;
  }
  if (redisAsyncCommand(r->ac, on_pong, NULL, "PING") == REDIS_OK) {
    r->ping_outstanding = true;
    r->ping_sent_at = now;
  }
}

static void schedule_reconnect(arq_redis_t *r) {
  if (r->closing)
    return;
  r->backoff_ms = r->backoff_ms ? r->backoff_ms * 2 : BACKOFF_MIN_MS;
  if (r->backoff_ms > BACKOFF_MAX_MS)
    r->backoff_ms = BACKOFF_MAX_MS;
  uv_timer_stop(&r->timer);
  uv_timer_start(&r->timer, on_timer, r->backoff_ms, 0);
}

arq_redis_t *arq_redis_new(uv_loop_t *loop, const char *url, uint64_t timeout_ms, arq_redis_state_cb cb, void *ud) {
  arq_redis_t *r = arq_calloc(1, sizeof *r);
  char err[160];
  arq_redis_parse_url(url, &r->url, err, sizeof err);
  r->loop = loop;
  r->timeout_ms = timeout_ms ? timeout_ms : 1;
  r->cb = cb;
  r->ud = ud;
  uv_timer_init(loop, &r->timer);
  r->timer.data = r;
  r->timer_open = true;
  set_error(r, "not connected yet", NULL);
  start_connect(r);
  return r;
}

int arq_redis_command(arq_redis_t *r, redisCallbackFn *fn, void *privdata, const char *fmt, ...) {
  if (!r->up || !r->ac)
    return ARQ_ECLOSED;
  va_list ap;
  va_start(ap, fmt);
  int rc = redisvAsyncCommand(r->ac, fn, privdata, fmt, ap);
  va_end(ap);
  if (rc != REDIS_OK) {
    r->st.errors++;
    return ARQ_EIO;
  }
  return 0;
}

int arq_redis_argv(arq_redis_t *r, redisCallbackFn *fn, void *privdata, int argc, const char **argv,
                   const size_t *lens) {
  if (!r->up || !r->ac)
    return ARQ_ECLOSED;
  if (redisAsyncCommandArgv(r->ac, fn, privdata, argc, argv, lens) != REDIS_OK) {
    r->st.errors++;
    return ARQ_EIO;
  }
  return 0;
}

bool arq_redis_up(const arq_redis_t *r) { return r->up; }

const char *arq_redis_error(const arq_redis_t *r) { return r->err; }

const arq_redis_stats_t *arq_redis_stats(const arq_redis_t *r) { return &r->st; }

static void on_timer_closed(uv_handle_t *h) {
  arq_redis_t *r = h->data;
  r->timer_open = false;
  if (!r->resolving)
    arq_free(r);
}

void arq_redis_close(arq_redis_t *r) {
  if (!r || r->closing)
    return;
  r->closing = true;
  /* What is queued goes out first (a non-blocking write: whatever the
   * socket takes now), e.g. a node's last words at shutdown. A failing write
   * ends the connection there (the disconnect callback clears r->ac). */
  if (r->ac && r->up)
    redisAsyncHandleWrite(r->ac);
  if (r->ac) {
    redisAsyncContext *ac = r->ac;
    r->ac = NULL;
    /* Pending callbacks run now with NULL replies; they must not use 'r'. */
    ac->data = NULL;
    redisAsyncFree(ac);
  }
  r->up = false;
  if (r->resolving)
    uv_cancel((uv_req_t *)&r->gai);
  uv_close((uv_handle_t *)&r->timer, on_timer_closed);
}
