/* Unit tests for bus/: the message bus without sockets.
 *
 * A "world" plays the network shell. Each fake connection (conn_t) records
 * every frame the bus queues to it, as the JSON text after the WebSocket
 * header (the header is checked and stripped using its length field), and
 * the close code and reason when the bus closes it. A connection marked
 * 'slow' makes the next send fail the way the shell fails a slow consumer:
 * it calls arq_bus_disconnect() from inside send() and refuses the frame.
 *
 * The tests feed JSON with arq_bus_receive() and assert exactly what each
 * connection received, in order: next() takes the next recorded message,
 * none() asserts there is no other. JSON is written with single quotes; J()
 * turns them into double quotes.
 *
 * The world also plays the telemetry server: it records every telemetry
 * envelope the bus reports (tel_next() takes the next one, tel_none() asserts
 * there is no other), and answers the describe hook when a test asks for it.
 *
 * Every test frees everything (the suite runs under ASan/LeakSanitizer), and
 * the world counts contract violations: a send or close to a connection the
 * bus was already done with, a frame that is not one valid text frame of
 * UTF-8 JSON, or a telemetry report of a kind outside the mask or that is not
 * a valid telemetry envelope.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bus/bus.h"
#include "bus/envelope.h"
#include "bus/history.h"
#include "util/err.h"
#include "util/hist.h"
#include "util/rcbuf.h"
#include "util/time.h"
#include "wire/utf8.h"

#define MAX_CONNS 16
#define MAX_MSGS 256
#define MAX_TEL 512
#define TEL_ALL ((1u << ARQ_TEL_NEVENTS) - 1)

typedef struct world world_t;

typedef struct conn {
  world_t *w;
  int index;
  arq_client_t *client; /* NULL once the bus let go of it */
  char *msgs[MAX_MSGS]; /* JSON texts received, owned */
  size_t nmsgs, next;
  json_t *cur;          /* the last message next() returned */
  bool closed;          /* closed by the bus, or by the shell as slow */
  bool slow;            /* the next send fails as a slow consumer */
  uint16_t close_code;
  char why[128];
} conn_t;

/* One telemetry report: its kind and the envelope as JSON text (owned). */
typedef struct tel {
  arq_tel_event_t ev;
  char *text;
} tel_t;

struct world {
  arq_bus_t *bus;
  conn_t conns[MAX_CONNS];
  int nconns;
  int violations;
  unsigned long sends;
  uint32_t tel_mask;        /* what the test set with set_mask() */
  tel_t tel[MAX_TEL];       /* telemetry reported, in order */
  size_t ntel, tel_next;
  json_t *tel_cur;          /* the last report tel_next() returned */
  unsigned long tel_calls;  /* calls of the telemetry callback */
  bool with_describe;       /* start() installs the describe hook */
  unsigned long describes;  /* calls of the describe hook */
};

/* ---- JSON helpers ---- */

static char *J(const char *s) {
  char *out = strdup(s);
  assert_non_null(out);
  for (char *p = out; *p; p++)
    if (*p == '\'')
      *p = '"';
  return out;
}

/* Follows a dotted path ("payload.unknown.0") through objects and arrays. */
static json_t *jget(json_t *o, const char *path) {
  char buf[256];
  snprintf(buf, sizeof buf, "%s", path);
  char *save = NULL;
  for (char *tok = strtok_r(buf, ".", &save); tok && o; tok = strtok_r(NULL, ".", &save))
    o = json_is_array(o) ? json_array_get(o, (size_t)atoi(tok)) : json_object_get(o, tok);
  return o;
}

static const char *jstr(json_t *o, const char *path) {
  json_t *v = jget(o, path);
  return json_is_string(v) ? json_string_value(v) : NULL;
}

static long long jint(json_t *o, const char *path) {
  json_t *v = jget(o, path);
  assert_true(json_is_integer(v));
  return (long long)json_integer_value(v);
}

static bool jbool(json_t *o, const char *path) {
  json_t *v = jget(o, path);
  assert_true(json_is_boolean(v));
  return json_is_true(v);
}

/* ---- the fake shell ---- */

static bool fake_send(void *ud, void *connp, arq_rcbuf_t *frame) {
  world_t *w = ud;
  conn_t *c = connp;
  w->sends++;
  if (c->closed) {
    print_error("send to closed connection %d\n", c->index);
    w->violations++;
    return false;
  }
  if (c->slow) {
    /* The shell closes a slow consumer from inside send(). */
    c->slow = false;
    c->closed = true;
    c->close_code = 0;
    snprintf(c->why, sizeof c->why, "slow consumer");
    arq_client_t *cl = c->client;
    c->client = NULL;
    if (cl)
      arq_bus_disconnect(w->bus, cl);
    return false;
  }
  /* One unmasked final text frame, its length field telling the rest. */
  size_t hl = 2, len = frame->data[1] & 0x7f;
  if (frame->len < 2 || frame->data[0] != 0x81 || (frame->data[1] & 0x80)) {
    w->violations++;
    return false;
  }
  if (len == 126) {
    hl = 4;
    len = ((size_t)frame->data[2] << 8) | frame->data[3];
  } else if (len == 127) {
    hl = 10;
    len = 0;
    for (int i = 2; i < 10; i++)
      len = (len << 8) | frame->data[i];
  }
  if (hl + len != frame->len || arq_utf8_validate(frame->data + hl, len) != 0) {
    print_error("bad frame to connection %d\n", c->index);
    w->violations++;
    return false;
  }
  char *text = malloc(len + 1);
  memcpy(text, frame->data + hl, len);
  text[len] = '\0';
  json_t *check = json_loads(text, 0, NULL);
  if (!json_is_object(check)) {
    print_error("frame is not a JSON object: %s\n", text);
    w->violations++;
  }
  json_decref(check);
  if (c->nmsgs == MAX_MSGS) {
    w->violations++;
    free(text);
    return true;
  }
  c->msgs[c->nmsgs++] = text;
  return true;
}

static void fake_close(void *ud, void *connp, uint16_t code, const char *why) {
  world_t *w = ud;
  conn_t *c = connp;
  if (c->closed) {
    print_error("close of closed connection %d\n", c->index);
    w->violations++;
  }
  c->closed = true;
  c->close_code = code;
  snprintf(c->why, sizeof c->why, "%s", why);
  c->client = NULL; /* the bus already disconnected it */
}

/* The telemetry server: checks and records what the bus reports. */
static void fake_telemetry(void *ud, arq_tel_event_t ev, json_t *env) {
  world_t *w = ud;
  w->tel_calls++;
  if ((unsigned)ev >= ARQ_TEL_NEVENTS || !(w->tel_mask & (1u << ev))) {
    print_error("telemetry %d reported outside the mask %#x\n", (int)ev, w->tel_mask);
    w->violations++;
    return;
  }
  char *text = json_dumps(env, JSON_COMPACT);
  assert_non_null(text);
  /* What the telemetry port sends must be a valid telemetry envelope of the
   * kind it is reported as (client telemetry keeps the client's eventType). */
  arq_env_t e;
  arq_env_error_t err;
  if (arq_env_parse(&e, text, strlen(text), &err) != 0) {
    print_error("telemetry %s is not a valid envelope (%s): %s\n", arq_tel_name(ev), err.message, text);
    w->violations++;
  } else {
    if (e.type != ARQ_MSG_TELEMETRY || !e.event_type ||
        (ev != ARQ_TEL_CLIENT_TELEMETRY && strcmp(e.event_type, arq_tel_name(ev)) != 0)) {
      print_error("telemetry %s has the wrong type or eventType: %s\n", arq_tel_name(ev), text);
      w->violations++;
    }
    arq_env_free(&e);
  }
  if (w->ntel == MAX_TEL) {
    w->violations++;
    free(text);
    return;
  }
  w->tel[w->ntel].ev = ev;
  w->tel[w->ntel++].text = text;
}

static void fake_describe(void *ud, json_t *server) {
  world_t *w = ud;
  w->describes++;
  json_object_set_new(server, "connections", json_integer(7));
  json_object_set_new(server, "shell", json_string("fake"));
}

static const char *const bootstrap[] = {"science:general", "science:explore", NULL};

/* Options for tests about something else than the telemetry and dashboard
 * channels: without them, so that counts of rooms and channels, and history,
 * are the test's own. */
static arq_bus_opts_t opts(void) {
  arq_bus_opts_t o;
  arq_bus_opts_defaults(&o);
  o.server_version = "test-1";
  o.bootstrap = bootstrap;
  o.seed = 42;
  o.telemetry_channel = NULL;
  o.dashboard_channel = NULL;
  return o;
}

/* The same with the documented default telemetry and dashboard channels. */
static arq_bus_opts_t opts_integriguard(void) {
  arq_bus_opts_t o = opts();
  arq_bus_opts_t d;
  arq_bus_opts_defaults(&d);
  o.telemetry_channel = d.telemetry_channel;
  o.dashboard_channel = d.dashboard_channel;
  return o;
}

#define TEL_CHANNEL "integriguard:telemetry-stream"
#define DASH_CHANNEL "integriguard:dashboard-events"

static void start(world_t *w, const arq_bus_opts_t *o) {
  arq_bus_io_t io = {.send = fake_send,
                     .close = fake_close,
                     .telemetry = fake_telemetry,
                     .describe = w->with_describe ? fake_describe : NULL,
                     .ud = w};
  char err[256] = "";
  w->bus = arq_bus_new(o, &io, arq_history_mem_new(o->history_size), err, sizeof err);
  if (!w->bus)
    print_error("arq_bus_new: %s\n", err);
  assert_non_null(w->bus);
}

static void start_default(world_t *w) {
  arq_bus_opts_t o = opts();
  start(w, &o);
}

static int setup(void **state) {
  world_t *w = calloc(1, sizeof *w);
  assert_non_null(w);
  *state = w;
  return 0;
}

static int teardown(void **state) {
  world_t *w = *state;
  for (int i = 0; i < w->nconns; i++) {
    conn_t *c = &w->conns[i];
    if (c->client) {
      arq_client_t *cl = c->client;
      c->client = NULL;
      c->closed = true;
      arq_bus_disconnect(w->bus, cl);
    }
  }
  if (w->bus)
    arq_bus_free(w->bus);
  int violations = w->violations;
  for (int i = 0; i < w->nconns; i++) {
    for (size_t k = 0; k < w->conns[i].nmsgs; k++)
      free(w->conns[i].msgs[k]);
    json_decref(w->conns[i].cur);
  }
  for (size_t k = 0; k < w->ntel; k++)
    free(w->tel[k].text);
  json_decref(w->tel_cur);
  free(w);
  assert_int_equal(violations, 0);
  return 0;
}

/* Roles and rooms from a credential, as the shell passes them. */
static conn_t *connect_as(world_t *w, const char *query, unsigned roles, const char *rooms) {
  assert_true(w->nconns < MAX_CONNS);
  conn_t *c = &w->conns[w->nconns];
  c->w = w;
  c->index = w->nconns++;
  arq_client_params_t p;
  char err[256] = "";
  int rc = arq_bus_parse_params(query, strlen(query), &p, err, sizeof err);
  if (rc != 0)
    print_error("params %s: %s\n", query, err);
  assert_int_equal(rc, 0);
  p.roles = roles;
  p.rooms = rooms;
  c->client = arq_bus_connect(w->bus, c, &p, "127.0.0.1:1234");
  assert_non_null(c->client);
  return c;
}

/* Connects a client with the upgrade query 'query'. */
static conn_t *connect_q(world_t *w, const char *query) { return connect_as(w, query, 0, NULL); }

/* Sends 'json' (single-quoted) from 'c'. */
static void say(conn_t *c, const char *json) {
  assert_non_null(c->client);
  char *t = J(json);
  arq_bus_receive(c->w->bus, c->client, t, strlen(t), false);
  free(t);
}

static void say_raw(conn_t *c, const char *data, size_t len, bool binary) {
  assert_non_null(c->client);
  char *p = malloc(len ? len : 1);
  memcpy(p, data, len);
  arq_bus_receive(c->w->bus, c->client, p, len, binary);
  free(p);
}

static void disconnect(conn_t *c) {
  assert_non_null(c->client);
  arq_client_t *cl = c->client;
  c->client = NULL;
  c->closed = true;
  arq_bus_disconnect(c->w->bus, cl);
}

static size_t pending(const conn_t *c) { return c->nmsgs - c->next; }

/* Returns the next message 'c' received (borrowed until the next call). */
static json_t *next(conn_t *c) {
  if (c->next >= c->nmsgs)
    print_error("connection %d: no more messages (had %zu)\n", c->index, c->nmsgs);
  assert_true(c->next < c->nmsgs);
  json_decref(c->cur);
  c->cur = json_loads(c->msgs[c->next++], 0, NULL);
  assert_non_null(c->cur);
  return c->cur;
}

static void none(conn_t *c) {
  if (c->next < c->nmsgs)
    print_error("connection %d: unexpected %s\n", c->index, c->msgs[c->next]);
  assert_int_equal(pending(c), 0);
}

static void drain(conn_t *c) { c->next = c->nmsgs; }

static void expect_str(json_t *m, const char *path, const char *want) {
  const char *got = jstr(m, path);
  if (!got || strcmp(got, want) != 0) {
    char *s = json_dumps(m, JSON_COMPACT);
    print_error("%s: want \"%s\" in %s\n", path, want, s);
    free(s);
  }
  assert_non_null(got);
  assert_string_equal(got, want);
}

/* The next message must be a system notification 'event'. */
static json_t *expect_note(conn_t *c, const char *event) {
  json_t *m = next(c);
  expect_str(m, "type", "system");
  expect_str(m, "payload.event", event);
  assert_null(jget(m, "correlation_id"));
  assert_true(arq_env_valid_id(jstr(m, "id")));
  assert_true(arq_env_valid_timestamp(jstr(m, "timestamp")));
  return m;
}

/* The next message must be the reply to 'command' for request 'corr' (NULL:
 * any valid id, the one the server assigned). */
static json_t *expect_reply(conn_t *c, const char *command, const char *corr) {
  json_t *m = next(c);
  expect_str(m, "type", "system");
  expect_str(m, "command", command);
  if (corr)
    expect_str(m, "correlation_id", corr);
  else
    assert_true(arq_env_valid_id(jstr(m, "correlation_id")));
  assert_true(json_is_object(jget(m, "payload")));
  return m;
}

#define ANY_ID "*"

/* The next message must be an error with 'code' for request 'corr' (NULL:
 * no correlation_id; ANY_ID: any valid id, the one the server assigned). */
static json_t *expect_error(conn_t *c, const char *code, const char *corr) {
  json_t *m = next(c);
  expect_str(m, "type", "error");
  expect_str(m, "payload.code", code);
  assert_non_null(jstr(m, "payload.message"));
  assert_true(strlen(jstr(m, "payload.message")) > 0);
  assert_true(arq_env_valid_id(jstr(m, "id")));
  if (corr && strcmp(corr, ANY_ID) == 0)
    assert_true(arq_env_valid_id(jstr(m, "correlation_id")));
  else if (corr)
    expect_str(m, "correlation_id", corr);
  else
    assert_null(jget(m, "correlation_id"));
  return m;
}

static json_t *expect_event(conn_t *c, const char *from) {
  json_t *m = next(c);
  expect_str(m, "type", "event");
  expect_str(m, "from", from);
  return m;
}

static void expect_welcome(conn_t *c) { expect_note(c, "welcome"); }

/* Runs a command and returns its reply payload's JSON (the next message). */
static json_t *command(conn_t *c, const char *json) {
  say(c, json);
  return next(c);
}

static bool has_channel(conn_t *c, const char *key) {
  json_t *m = command(c, "{'type':'command','command':'list_channels'}");
  json_t *list = jget(m, "payload.channels");
  assert_true(json_is_array(list));
  size_t i;
  json_t *ch;
  json_array_foreach(list, i, ch) {
    char k[160];
    snprintf(k, sizeof k, "%s:%s", jstr(ch, "room"), jstr(ch, "channel"));
    if (strcmp(k, key) == 0)
      return true;
  }
  return false;
}

static arq_bus_stats_t stats(world_t *w) {
  arq_bus_stats_t s;
  arq_bus_stats(w->bus, &s);
  return s;
}

/* ---- telemetry helpers ---- */

static void set_mask(world_t *w, uint32_t mask) {
  w->tel_mask = mask;
  arq_bus_set_telemetry_mask(w->bus, mask);
}

/* Returns the next telemetry report, which must be of kind 'ev' (borrowed
 * until the next call). */
static json_t *tel_next(world_t *w, arq_tel_event_t ev) {
  if (w->tel_next >= w->ntel)
    print_error("no more telemetry (want %s, had %zu)\n", arq_tel_name(ev), w->ntel);
  assert_true(w->tel_next < w->ntel);
  const tel_t *t = &w->tel[w->tel_next++];
  if (t->ev != ev)
    print_error("telemetry: want %s, got %s: %s\n", arq_tel_name(ev), arq_tel_name(t->ev), t->text);
  assert_int_equal(t->ev, ev);
  json_decref(w->tel_cur);
  w->tel_cur = json_loads(t->text, 0, NULL);
  assert_non_null(w->tel_cur);
  return w->tel_cur;
}

static void tel_none(world_t *w) {
  if (w->tel_next < w->ntel)
    print_error("unexpected telemetry %s: %s\n", arq_tel_name(w->tel[w->tel_next].ev), w->tel[w->tel_next].text);
  assert_int_equal(w->ntel - w->tel_next, 0);
}

/* Asserts the top-level keys of 'o', in order ("a,b,c"). */
static void expect_keys(json_t *o, const char *want) {
  char got[512] = "";
  const char *k;
  json_t *v;
  json_object_foreach(o, k, v) {
    if (got[0])
      strcat(got, ",");
    strcat(got, k);
  }
  assert_string_equal(got, want);
}

/* A message stored in a channel's history carries the server's "position"
 * as its last member; the telemetry stream reports the same envelope without
 * it. Asserts that 'got' (as delivered or stored) is 'reported' plus a valid
 * position, and returns that position. */
static unsigned long long expect_positioned(json_t *got, json_t *reported) {
  const char *k, *last = NULL;
  json_t *v;
  json_object_foreach(got, k, v) last = k;
  assert_non_null(last);
  assert_string_equal(last, "position");
  const char *pos = jstr(got, "position");
  assert_non_null(pos);
  assert_true(arq_env_valid_position(pos));
  assert_true(pos[0] != '0'); /* decimal from 1, no leading zero */
  for (const char *p = pos; *p; p++)
    assert_true(*p >= '0' && *p <= '9'); /* memory mode: plain decimal */
  assert_null(jget(reported, "position"));
  json_t *bare = json_deep_copy(got);
  json_object_del(bare, "position");
  bool same = json_equal(bare, reported);
  if (!same) {
    char *x = json_dumps(got, JSON_COMPACT), *y = json_dumps(reported, JSON_COMPACT);
    print_error("stored/delivered %s\nreported %s\n", x, y);
    free(x);
    free(y);
  }
  json_decref(bare);
  assert_true(same);
  return strtoull(pos, NULL, 10);
}

/* The next report must be a bus telemetry event 'ev' in the documented
 * shape; returns it (borrowed like tel_next's). */
static json_t *expect_tel(world_t *w, arq_tel_event_t ev) {
  json_t *m = tel_next(w, ev);
  expect_str(m, "version", "1.0");
  expect_str(m, "type", "telemetry");
  expect_str(m, "eventType", arq_tel_name(ev));
  assert_true(arq_env_valid_id(jstr(m, "id")));
  assert_true(arq_env_valid_timestamp(jstr(m, "timestamp")));
  assert_true(json_is_object(jget(m, "payload")));
  expect_keys(m, "version,id,type,eventType,payload,timestamp");
  return m;
}

/* The counter part of a server-generated id ("arq_" + 11 hex digits of
 * time + 6 of process + 7 of counter): how many ids the bus made before. */
static unsigned long id_counter(const char *id) {
  assert_non_null(id);
  assert_int_equal(strlen(id), 28);
  return strtoul(id + 21, NULL, 16);
}

/* The index of command 'name' in the per-command histograms. */
static size_t command_index(const char *name) {
  for (size_t i = 0; arq_bus_command_name(i); i++)
    if (strcmp(arq_bus_command_name(i), name) == 0)
      return i;
  fail_msg("no command %s", name);
  return 0;
}

static uint64_t hist_buckets(const arq_hist_t *h) {
  uint64_t n = 0;
  for (int i = 0; i < ARQ_HIST_NBOUNDS; i++)
    n += h->buckets[i];
  return n;
}

/* What arq_bus_history() answered. */
typedef struct http_answer {
  int calls;
  int status;
  json_t *body; /* owned copy */
} http_answer_t;

static void http_done(void *ud, int status, json_t *body) {
  http_answer_t *a = ud;
  a->calls++;
  a->status = status;
  json_decref(a->body);
  a->body = json_deep_copy(body);
}

/* Runs arq_bus_history and returns its answer's body (owned by 'a'). */
static json_t *http_history(world_t *w, http_answer_t *a, const char *room, const char *channel, long long limit,
                            const char *since) {
  int before = a->calls;
  arq_bus_history(w->bus, room, channel, limit, since, http_done, a);
  assert_int_equal(a->calls, before + 1); /* the in-memory backend answers at once, exactly once */
  assert_non_null(a->body);
  return a->body;
}

/* ================= connecting ================= */

static void test_welcome_first(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "");
  json_t *m = next(a);
  expect_str(m, "type", "system");
  expect_str(m, "version", "1.0");
  expect_str(m, "payload.event", "welcome");
  expect_str(m, "payload.client_type", "human");
  expect_str(m, "payload.protocol_version", "1.0");
  expect_str(m, "payload.server_version", "test-1");
  assert_int_equal(strncmp(jstr(m, "payload.client_id"), "client-", 7), 0);
  assert_string_equal(jstr(m, "payload.client_id"), arq_client_id(a->client));
  assert_int_equal(json_array_size(jget(m, "payload.subscriptions")), 0);
  assert_false(jbool(m, "payload.echo"));
  assert_int_equal(jint(m, "payload.heartbeat_interval_ms"), 25000);
  assert_int_equal(jint(m, "payload.limits.max_malformed"), 10);
  assert_int_equal(jint(m, "payload.limits.max_recipients"), 100);
  assert_int_equal(jint(m, "payload.limits.history_size"), 500);
  assert_true(arq_env_valid_id(jstr(m, "id")));
  assert_true(arq_env_valid_timestamp(jstr(m, "timestamp")));
  assert_null(jget(m, "correlation_id"));
  none(a);

  conn_t *b = connect_q(w, "client_id=bob&client_type=ai-agent&screen_name=Bob+the%20Bot&echo=true"
                           "&channel=science:general");
  m = next(b);
  expect_str(m, "payload.event", "welcome");
  expect_str(m, "payload.client_id", "bob");
  expect_str(m, "payload.client_type", "ai-agent");
  assert_true(jbool(m, "payload.echo"));
  assert_int_equal(json_array_size(jget(m, "payload.subscriptions")), 1);
  expect_str(m, "payload.subscriptions.0", "science:general");
  none(b);
  none(a); /* not in the channel */

  conn_t *c = connect_q(w, "client_id=carol&room=science&channel=general");
  expect_welcome(c);
  none(c);
  m = expect_note(b, "client_joined");
  expect_str(m, "room", "science");
  expect_str(m, "channel", "general");
  expect_str(m, "payload.client_id", "carol");
  expect_str(m, "payload.client_type", "human");
  assert_int_equal(jint(m, "payload.members"), 2);
  none(b);
  assert_string_equal(arq_client_id(c->client), "carol");

  /* The joined notification carries the screen name when there is one. */
  conn_t *d = connect_q(w, "client_id=dave&screen_name=Dave&channel=science:general");
  expect_welcome(d);
  m = expect_note(b, "client_joined");
  expect_str(m, "payload.screen_name", "Dave");
  assert_int_equal(jint(m, "payload.members"), 3);
  expect_note(c, "client_joined");
  none(c);
}

static void test_generated_ids_unique(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, ""), *b = connect_q(w, "");
  assert_string_not_equal(arq_client_id(a->client), arq_client_id(b->client));
  json_t *m = next(a);
  char ida[64];
  snprintf(ida, sizeof ida, "%s", jstr(m, "id"));
  m = next(b);
  assert_string_not_equal(ida, jstr(m, "id"));
}

static void test_disconnect_tells_each_channel(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  say(a, "{'type':'command','command':'join_channel','channel':'science:explore'}");
  say(b, "{'type':'command','command':'join_channel','channel':'science:explore'}");
  drain(a);
  drain(b);
  disconnect(a);
  json_t *m1 = json_deep_copy(expect_note(b, "client_left"));
  json_t *m2 = expect_note(b, "client_left");
  expect_str(m1, "payload.client_id", "alice");
  expect_str(m1, "payload.reason", "disconnected");
  assert_int_equal(jint(m1, "payload.members"), 1);
  expect_str(m2, "payload.client_id", "alice");
  assert_string_not_equal(jstr(m1, "channel"), jstr(m2, "channel"));
  json_decref(m1);
  none(b);
  assert_int_equal(stats(w).clients, 1);
  assert_int_equal(pending(a), 0); /* nothing after the disconnect */
}

/* ================= join and leave ================= */

static void test_join_and_leave(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob");
  drain(a);
  drain(b);

  json_t *m = command(b, "{'type':'command','command':'join_channel','room':'science','channel':'general',"
                         "'id':'arq_j1'}");
  expect_str(m, "type", "system");
  expect_str(m, "command", "join_channel");
  expect_str(m, "correlation_id", "arq_j1");
  expect_str(m, "payload.room", "science");
  expect_str(m, "payload.channel", "general");
  assert_true(jbool(m, "payload.joined"));
  assert_false(jbool(m, "payload.created"));
  assert_true(jbool(m, "payload.bootstrap"));
  assert_int_equal(jint(m, "payload.members"), 2);
  none(b);
  m = expect_note(a, "client_joined");
  expect_str(m, "payload.client_id", "bob");
  assert_int_equal(jint(m, "payload.members"), 2);
  none(a);

  /* Joining again changes nothing and tells nobody. */
  m = command(b, "{'type':'command','command':'join_channel','channel':'science:general','id':'arq_j2'}");
  expect_str(m, "correlation_id", "arq_j2");
  assert_false(jbool(m, "payload.joined"));
  none(a);

  /* A new channel is created by joining it. */
  m = command(b, "{'type':'command','command':'join_channel','room':'art:studio','id':'arq_j3'}");
  expect_str(m, "command", "join_channel");
  assert_true(jbool(m, "payload.joined"));
  assert_true(jbool(m, "payload.created"));
  assert_false(jbool(m, "payload.bootstrap"));
  assert_int_equal(jint(m, "payload.members"), 1);

  /* Arguments in the payload, split or joined. */
  m = command(b, "{'type':'command','command':'join_channel','id':'arq_j4',"
                 "'payload':{'room':'science','channel':'explore'}}");
  expect_str(m, "correlation_id", "arq_j4");
  expect_str(m, "payload.channel", "explore");
  assert_true(jbool(m, "payload.joined"));
  m = command(b, "{'type':'command','command':'join_channel','id':'arq_j5','payload':{'channel':'science:explore'}}");
  expect_str(m, "payload.room", "science");
  expect_str(m, "payload.channel", "explore");
  assert_false(jbool(m, "payload.joined"));

  /* Leaving. */
  m = command(b, "{'type':'command','command':'leave_channel','channel':'science:general','id':'arq_l1'}");
  expect_str(m, "type", "system");
  expect_str(m, "command", "leave_channel");
  expect_str(m, "correlation_id", "arq_l1");
  assert_true(jbool(m, "payload.left"));
  assert_int_equal(jint(m, "payload.members"), 1);
  m = expect_note(a, "client_left");
  expect_str(m, "room", "science");
  expect_str(m, "channel", "general");
  expect_str(m, "payload.client_id", "bob");
  expect_str(m, "payload.reason", "left");
  assert_int_equal(jint(m, "payload.members"), 1);
  none(a);

  say(b, "{'type':'command','command':'leave_channel','channel':'science:general','id':'arq_l2'}");
  m = expect_error(b, "not_found", "arq_l2");
  expect_str(m, "command", "leave_channel");
  say(b, "{'type':'command','command':'leave_channel','channel':'nowhere:here','id':'arq_l3'}");
  m = expect_error(b, "not_found", "arq_l3");
  expect_str(m, "payload.room", "nowhere");
  expect_str(m, "payload.channel", "here");
  none(b);
  none(a);
}

/* A member learns the same about a client whichever way it joins or
 * leaves: with its screen name. */
static void test_presence_fields_consistent(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&screen_name=Bob");
  drain(a);
  drain(b);
  say(b, "{'type':'command','command':'join_channel','channel':'science:general'}");
  json_t *m = expect_note(a, "client_joined");
  expect_str(m, "payload.client_id", "bob");
  int missing = jstr(m, "payload.screen_name") == NULL;
  say(b, "{'type':'command','command':'leave_channel','channel':'science:general'}");
  m = expect_note(a, "client_left");
  expect_str(m, "payload.client_id", "bob");
  missing += jstr(m, "payload.screen_name") == NULL;
  /* Connecting and disconnecting do carry it. */
  conn_t *c = connect_q(w, "client_id=carol&screen_name=Carol&channel=science:general");
  m = expect_note(a, "client_joined");
  expect_str(m, "payload.screen_name", "Carol");
  disconnect(c);
  m = expect_note(a, "client_left");
  expect_str(m, "payload.screen_name", "Carol");
  none(a);
  assert_int_equal(missing, 0); /* BUG: commands.c cmd_join/cmd_leave build their own fields without screen_name */
}

static void test_join_argument_errors(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice");
  drain(a);
  static const char *const bad[] = {
      "{'type':'command','command':'join_channel','id':'arq_x'}",
      "{'type':'command','command':'join_channel','room':'science','id':'arq_x'}",
      "{'type':'command','command':'join_channel','id':'arq_x','payload':{'room':'science'}}",
      "{'type':'command','command':'join_channel','id':'arq_x','payload':{'room':5,'channel':'x'}}",
      "{'type':'command','command':'join_channel','id':'arq_x','payload':{'channel':'bad name'}}",
      "{'type':'command','command':'join_channel','id':'arq_x','payload':{'channel':'explore'}}",
      "{'type':'command','command':'leave_channel','id':'arq_x'}",
      "{'type':'command','command':'channel_info','id':'arq_x'}",
      "{'type':'command','command':'history','id':'arq_x','room':'science'}",
      "{'type':'command','command':'create_channel','id':'arq_x'}",
      "{'type':'command','command':'delete_channel','id':'arq_x'}",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    say(a, bad[i]);
    json_t *m = expect_error(a, "invalid_argument", "arq_x");
    assert_non_null(jstr(m, "command"));
  }
  none(a);
  /* Argument errors do not count as malformed messages. */
  for (int i = 0; i < 20; i++)
    say(a, bad[0]);
  assert_false(a->closed);
}

/* ================= events ================= */

static void test_event_reaches_members_only(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  conn_t *c = connect_q(w, "client_id=carol&channel=science:explore");
  conn_t *d = connect_q(w, "client_id=dave");
  for (int i = 0; i < 4; i++)
    drain(&w->conns[i]);

  say(a, "{'type':'event','room':'science','channel':'general','id':'arq_e1','payload':{'message':'hello'}}");
  json_t *m = expect_event(b, "alice");
  expect_str(m, "version", "1.0");
  expect_str(m, "id", "arq_e1");
  expect_str(m, "room", "science");
  expect_str(m, "channel", "general");
  expect_str(m, "payload.message", "hello");
  assert_true(arq_env_valid_timestamp(jstr(m, "timestamp")));
  none(a); /* not the sender */
  none(b);
  none(c);
  none(d);

  /* The short form, a server id, the sender's own timestamp, and no
   * spoofing of 'from'. */
  say(a, "{'type':'event','channel':'science:general','from':'mallory','timestamp':'2024-02-29T00:00:00Z',"
         "'metadata':{'k':'v'},'correlation_id':'c-1'}");
  m = expect_event(b, "alice");
  assert_true(arq_env_valid_id(jstr(m, "id")));
  assert_string_not_equal(jstr(m, "id"), "arq_e1");
  expect_str(m, "timestamp", "2024-02-29T00:00:00Z");
  expect_str(m, "metadata.k", "v");
  expect_str(m, "correlation_id", "c-1");
  assert_true(json_is_object(jget(m, "payload")));
  none(a);

  /* A client may publish to a channel it is not in. */
  say(d, "{'type':'event','channel':'science:general','id':'arq_e3'}");
  expect_event(a, "dave");
  expect_event(b, "dave");
  none(c);
  none(d);

  /* The initial channel is the default target. */
  say(a, "{'type':'event','payload':{'n':1}}");
  m = expect_event(b, "alice");
  expect_str(m, "room", "science");
  expect_str(m, "channel", "general");
  none(c);
  /* Without one, an event needs a target. */
  say(d, "{'type':'event','id':'arq_e4'}");
  expect_error(d, "invalid_envelope", "arq_e4");
  none(a);
  none(b);
}

static void test_echo(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&echo=true&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  drain(a);
  drain(b);
  say(a, "{'type':'event','channel':'science:general','id':'arq_e1'}");
  json_t *m = expect_event(a, "alice");
  expect_str(m, "id", "arq_e1");
  expect_event(b, "alice");
  none(a);
  none(b);
  /* Room-wide too, once. */
  say(a, "{'type':'command','command':'join_channel','channel':'science:explore'}");
  drain(a);
  say(a, "{'type':'event','room':'science','id':'arq_e2'}");
  expect_event(a, "alice");
  expect_event(b, "alice");
  none(a);
  none(b);
}

static void test_room_wide_event_once(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  conn_t *c = connect_q(w, "client_id=carol&channel=art:studio");
  conn_t *d = connect_q(w, "client_id=dave");
  say(a, "{'type':'command','command':'join_channel','channel':'science:explore'}");
  say(a, "{'type':'command','command':'join_channel','channel':'science:lab'}");
  say(b, "{'type':'command','command':'join_channel','channel':'science:explore'}");
  for (int i = 0; i < 4; i++)
    drain(&w->conns[i]);

  say(d, "{'type':'event','room':'science','id':'arq_rw','payload':{'m':1}}");
  json_t *m = expect_event(a, "dave");
  expect_str(m, "room", "science");
  assert_null(jget(m, "channel"));
  none(a); /* in three channels of the room, once */
  expect_event(b, "dave");
  none(b);
  none(c);
  none(d);

  /* From a member: everyone else once, not the sender. */
  say(a, "{'type':'event','room':'science'}");
  expect_event(b, "alice");
  none(b);
  none(a);
  /* Twice in a row: the dedup is per message. */
  say(a, "{'type':'event','room':'science'}");
  say(a, "{'type':'event','room':'science'}");
  expect_event(b, "alice");
  expect_event(b, "alice");
  none(b);

  /* A room nobody is in: nothing, no error. */
  say(d, "{'type':'event','room':'empty'}");
  none(d);
  none(a);
  none(c);
}

static void test_version_1_1_fields_forwarded(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  drain(a);
  drain(b);
  say(a, "{'version':'1.1','type':'event','channel':'science:general','x-trace':'abc','extra':{'n':[1]}}");
  json_t *m = expect_event(b, "alice");
  expect_str(m, "version", "1.1");
  expect_str(m, "x-trace", "abc");
  assert_int_equal(jint(m, "extra.n.0"), 1);
  /* 1.0 stays strict. */
  say(a, "{'type':'event','channel':'science:general','x-trace':'abc','id':'arq_v'}");
  expect_error(a, "invalid_envelope", "arq_v");
  none(b);
}

/* ================= private ================= */

static void test_private(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice");
  conn_t *b = connect_q(w, "client_id=bob");
  conn_t *c = connect_q(w, "client_id=carol");
  for (int i = 0; i < 3; i++)
    drain(&w->conns[i]);

  say(a, "{'type':'private','to':['bob'],'id':'arq_p1','payload':{'secret':42}}");
  json_t *m = next(b);
  expect_str(m, "type", "private");
  expect_str(m, "from", "alice");
  expect_str(m, "id", "arq_p1");
  expect_str(m, "to.0", "bob");
  assert_int_equal(jint(m, "payload.secret"), 42);
  none(a);
  none(b);
  none(c);

  /* Known recipients get it once; the sender hears about the others. */
  say(a, "{'type':'private','to':['bob','ghost','bob','carol'],'id':'arq_p2'}");
  expect_str(next(b), "id", "arq_p2");
  none(b);
  expect_str(next(c), "id", "arq_p2");
  none(c);
  m = expect_error(a, "not_found", "arq_p2");
  assert_int_equal(json_array_size(jget(m, "payload.unknown")), 1);
  expect_str(m, "payload.unknown.0", "ghost");
  none(a);
}

static void test_private_without_id_has_no_correlation(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice");
  conn_t *b = connect_q(w, "client_id=bob");
  drain(a);
  drain(b);
  say(a, "{'type':'private','to':['bob','ghost']}");
  json_t *m = next(b);
  assert_true(arq_env_valid_id(jstr(m, "id")));
  /* The sender never saw the id the server gave its message: the error
   * names no correlation_id rather than one the sender cannot match. */
  m = expect_error(a, "not_found", NULL);
  assert_int_equal(json_array_size(jget(m, "payload.unknown")), 1);
  none(a);
  none(b);
}

/* ================= commands ================= */

static void test_ping_pong(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice");
  drain(a);
  say(a, "{'type':'command','command':'ping','id':'arq_ping','payload':{'data':{'n':1}}}");
  json_t *m = expect_reply(a, "pong", "arq_ping");
  assert_true(arq_env_valid_timestamp(jstr(m, "payload.server_time")));
  assert_int_equal(jint(m, "payload.data.n"), 1);
  /* A command without an id gets one, and its reply names it. */
  say(a, "{'type':'command','command':'ping'}");
  m = expect_reply(a, "pong", NULL);
  assert_null(jget(m, "payload.data"));
  none(a);
}

static void test_status(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&client_type=service&screen_name=Al&channel=science:general");
  connect_q(w, "client_id=bob&client_type=dashboard");
  drain(a);
  say(a, "{'type':'event','channel':'science:general'}");
  say(a, "{'type':'command','command':'status','id':'arq_s'}");
  json_t *m = expect_reply(a, "status", "arq_s");
  expect_str(m, "payload.server.name", "arqonbus");
  expect_str(m, "payload.server.version", "test-1");
  assert_int_equal(jint(m, "payload.clients.total"), 2);
  assert_int_equal(jint(m, "payload.clients.by_type.service"), 1);
  assert_int_equal(jint(m, "payload.clients.by_type.dashboard"), 1);
  assert_int_equal(jint(m, "payload.clients.by_type.human"), 0);
  assert_int_equal(jint(m, "payload.rooms"), 1);
  assert_int_equal(jint(m, "payload.channels"), 2);
  assert_int_equal(jint(m, "payload.history.messages"), 1);
  expect_str(m, "payload.you.client_id", "alice");
  expect_str(m, "payload.you.client_type", "service");
  expect_str(m, "payload.you.screen_name", "Al");
  expect_str(m, "payload.you.subscriptions.0", "science:general");
  assert_int_equal(jint(m, "payload.you.messages_sent"), 2);
  none(a);
}

static const char *const admins[] = {"root", NULL};

static void test_create_channel(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:explore");
  conn_t *c = connect_q(w, "client_id=carol&channel=art:studio");
  conn_t *d = connect_q(w, "client_id=dave");
  for (int i = 0; i < 4; i++)
    drain(&w->conns[i]);

  say(d, "{'type':'command','command':'create_channel','channel':'science:lab','id':'arq_c1'}");
  json_t *m = expect_reply(d, "create_channel", "arq_c1");
  expect_str(m, "payload.room", "science");
  expect_str(m, "payload.channel", "lab");
  assert_int_equal(jint(m, "payload.members"), 0);
  assert_false(jbool(m, "payload.bootstrap"));
  none(d);
  m = expect_note(a, "channel_created");
  expect_str(m, "payload.by", "dave");
  expect_str(m, "room", "science");
  expect_str(m, "channel", "lab");
  none(a);
  expect_note(b, "channel_created");
  none(b);
  none(c);
  assert_true(has_channel(d, "science:lab"));

  say(d, "{'type':'command','command':'create_channel','room':'science','channel':'lab','id':'arq_c2'}");
  m = expect_error(d, "already_exists", "arq_c2");
  expect_str(m, "command", "create_channel");
  expect_str(m, "payload.room", "science");
  expect_str(m, "payload.channel", "lab");
  say(d, "{'type':'command','command':'create_channel','channel':'science:general','id':'arq_c3'}");
  expect_error(d, "already_exists", "arq_c3");
  none(a);

  /* A channel of a new room: nobody to tell. */
  say(d, "{'type':'command','command':'create_channel','channel':'music:jazz','id':'arq_c4'}");
  expect_reply(d, "create_channel", "arq_c4");
  none(d);
  none(c);
}

/* A client in several channels of the room hears of a new channel once, as a
 * room-wide event reaches it once. */
static void test_channel_created_told_once(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *d = connect_q(w, "client_id=dave");
  say(a, "{'type':'command','command':'join_channel','channel':'science:explore'}");
  drain(a);
  drain(d);
  say(d, "{'type':'command','command':'create_channel','channel':'science:lab'}");
  expect_reply(d, "create_channel", NULL);
  expect_note(a, "channel_created");
  none(a); /* BUG: commands.c cmd_create notifies per channel: alice gets it twice */
}

static void test_admins_restrict_privileged(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.admins = admins;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice");
  conn_t *r = connect_q(w, "client_id=root");
  drain(a);
  drain(r);
  say(a, "{'type':'command','command':'create_channel','channel':'science:lab','id':'arq_a1'}");
  json_t *m = expect_error(a, "forbidden", "arq_a1");
  expect_str(m, "command", "create_channel");
  say(r, "{'type':'command','command':'create_channel','channel':'science:lab','id':'arq_a2'}");
  expect_reply(r, "create_channel", "arq_a2");
  say(a, "{'type':'command','command':'delete_channel','channel':'science:lab','id':'arq_a3'}");
  expect_error(a, "forbidden", "arq_a3");
  /* Unprivileged commands stay open. */
  say(a, "{'type':'command','command':'join_channel','channel':'science:lab','id':'arq_a4'}");
  expect_reply(a, "join_channel", "arq_a4");
  say(r, "{'type':'command','command':'delete_channel','channel':'science:lab','id':'arq_a5'}");
  expect_reply(r, "delete_channel", "arq_a5");
  expect_note(a, "channel_deleted");
  none(a);
  none(r);
}

static void test_delete_channel(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *r = connect_q(w, "client_id=root");
  conn_t *a = connect_q(w, "client_id=alice");
  conn_t *b = connect_q(w, "client_id=bob");
  conn_t *c = connect_q(w, "client_id=carol&channel=science:general");
  say(r, "{'type':'command','command':'create_channel','channel':'science:lab'}");
  say(a, "{'type':'command','command':'join_channel','channel':'science:lab'}");
  say(b, "{'type':'command','command':'join_channel','channel':'science:lab'}");
  say(a, "{'type':'event','channel':'science:lab'}");
  for (int i = 0; i < 4; i++)
    drain(&w->conns[i]);

  say(r, "{'type':'command','command':'delete_channel','channel':'science:lab','id':'arq_d1'}");
  json_t *m = expect_note(a, "channel_deleted");
  expect_str(m, "room", "science");
  expect_str(m, "channel", "lab");
  expect_str(m, "payload.by", "root");
  expect_str(m, "payload.reason", "deleted");
  none(a);
  expect_note(b, "channel_deleted");
  none(b);
  none(c);
  m = expect_reply(r, "delete_channel", "arq_d1");
  assert_true(jbool(m, "payload.deleted"));
  assert_int_equal(jint(m, "payload.removed_members"), 2);
  none(r);

  /* Gone: no info, no membership, no history, no delivery. */
  say(r, "{'type':'command','command':'channel_info','channel':'science:lab','id':'arq_d2'}");
  expect_error(r, "not_found", "arq_d2");
  m = command(a, "{'type':'command','command':'status'}");
  assert_int_equal(json_array_size(jget(m, "payload.you.subscriptions")), 0);
  say(a, "{'type':'command','command':'leave_channel','channel':'science:lab','id':'arq_d3'}");
  expect_error(a, "not_found", "arq_d3");
  say(c, "{'type':'event','channel':'science:lab'}");
  none(a);
  none(b);
  m = command(r, "{'type':'command','command':'history','channel':'science:lab','payload':{'limit':10}}");
  assert_int_equal(jint(m, "payload.count"), 1); /* carol's, not alice's earlier one */
  expect_str(m, "payload.messages.0.from", "carol");

  /* Bootstrap channels stay, and their members hear nothing. */
  say(r, "{'type':'command','command':'delete_channel','channel':'science:general','id':'arq_d4'}");
  m = expect_error(r, "forbidden", "arq_d4");
  expect_str(m, "payload.channel", "general");
  none(c);
  say(r, "{'type':'command','command':'delete_channel','channel':'no:where','id':'arq_d5'}");
  expect_error(r, "not_found", "arq_d5");

  /* The deleter may be a member: told like the others, then answered. */
  say(r, "{'type':'command','command':'join_channel','channel':'x:y'}");
  drain(r);
  say(r, "{'type':'command','command':'delete_channel','channel':'x:y','id':'arq_d6'}");
  expect_note(r, "channel_deleted");
  m = expect_reply(r, "delete_channel", "arq_d6");
  assert_int_equal(jint(m, "payload.removed_members"), 1);
  assert_false(has_channel(r, "x:y"));
  none(r);
}

static void test_list_channels(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=art:studio");
  drain(a);
  say(a, "{'type':'command','command':'join_channel','channel':'science:alpha'}");
  drain(a);
  say(a, "{'type':'command','command':'list_channels','id':'arq_ls'}");
  json_t *m = expect_reply(a, "list_channels", "arq_ls");
  assert_int_equal(jint(m, "payload.count"), 4);
  static const char *const want[] = {"art:studio", "science:alpha", "science:explore", "science:general"};
  for (int i = 0; i < 4; i++) {
    char k[160], p[64];
    snprintf(p, sizeof p, "payload.channels.%d", i);
    json_t *ch = jget(m, p);
    snprintf(k, sizeof k, "%s:%s", jstr(ch, "room"), jstr(ch, "channel"));
    assert_string_equal(k, want[i]);
  }
  assert_true(jbool(m, "payload.channels.3.bootstrap"));
  assert_false(jbool(m, "payload.channels.0.bootstrap"));
  assert_int_equal(jint(m, "payload.channels.0.members"), 1);
  assert_null(jget(m, "payload.room"));

  say(a, "{'type':'command','command':'list_channels','room':'science','id':'arq_ls2'}");
  m = expect_reply(a, "list_channels", "arq_ls2");
  assert_int_equal(jint(m, "payload.count"), 3);
  expect_str(m, "payload.room", "science");
  say(a, "{'type':'command','command':'list_channels','payload':{'room':'art'}}");
  m = expect_reply(a, "list_channels", NULL);
  assert_int_equal(jint(m, "payload.count"), 1);
  say(a, "{'type':'command','command':'list_channels','room':'nothing'}");
  m = expect_reply(a, "list_channels", NULL);
  assert_int_equal(jint(m, "payload.count"), 0);
  none(a);
}

static void test_channel_info(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&screen_name=Alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&client_type=service&channel=science:general");
  say(a, "{'type':'event','channel':'science:general'}");
  say(a, "{'type':'event','channel':'science:general'}");
  drain(a);
  drain(b);
  say(b, "{'type':'command','command':'channel_info','channel':'science:general','id':'arq_i'}");
  json_t *m = expect_reply(b, "channel_info", "arq_i");
  assert_int_equal(jint(m, "payload.members"), 2);
  assert_int_equal(jint(m, "payload.messages"), 2);
  assert_int_equal(jint(m, "payload.history"), 2);
  assert_int_equal(jint(m, "payload.history_capacity"), 500);
  assert_true(jbool(m, "payload.bootstrap"));
  assert_true(arq_env_valid_timestamp(jstr(m, "payload.created_at")));
  json_t *list = jget(m, "payload.member_list");
  assert_int_equal(json_array_size(list), 2);
  int seen = 0;
  for (size_t i = 0; i < 2; i++) {
    json_t *e = json_array_get(list, i);
    if (strcmp(jstr(e, "client_id"), "alice") == 0) {
      expect_str(e, "screen_name", "Alice");
      seen |= 1;
    } else {
      expect_str(e, "client_id", "bob");
      expect_str(e, "client_type", "service");
      assert_null(jget(e, "screen_name"));
      seen |= 2;
    }
  }
  assert_int_equal(seen, 3);
  say(b, "{'type':'command','command':'channel_info','channel':'science:nothing','id':'arq_i2'}");
  expect_error(b, "not_found", "arq_i2");
  none(b);
  none(a);
}

static void test_help(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice");
  drain(a);
  say(a, "{'type':'command','command':'help','id':'arq_h'}");
  json_t *m = expect_reply(a, "help", "arq_h");
  json_t *list = jget(m, "payload.commands");
  static const char *const names[] = {"status",        "create_channel", "delete_channel", "join_channel",
                                      "leave_channel", "list_channels",  "channel_info",   "ping",
                                      "history",       "help",           "authenticate"};
  assert_int_equal(json_array_size(list), sizeof names / sizeof names[0]);
  for (size_t i = 0; i < json_array_size(list); i++) {
    json_t *e = json_array_get(list, i);
    assert_string_equal(jstr(e, "name"), names[i]);
    assert_non_null(jstr(e, "description"));
    assert_non_null(jstr(e, "arguments"));
    bool priv = strcmp(names[i], "create_channel") == 0 || strcmp(names[i], "delete_channel") == 0 ||
                strcmp(names[i], "status") == 0;
    assert_int_equal(jbool(e, "privileged"), priv);
  }
  none(a);
}

static void test_unknown_command(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.max_malformed = 2;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice");
  drain(a);
  say(a, "{'type':'command','command':'fly','id':'arq_u'}");
  json_t *m = expect_error(a, "unknown_command", "arq_u");
  expect_str(m, "command", "fly");
  assert_non_null(strstr(jstr(m, "payload.message"), "fly"));
  say(a, "{'type':'command','command':'Ping','id':'arq_u2'}"); /* names are case-sensitive */
  expect_error(a, "unknown_command", "arq_u2");
  /* Not malformed: no close however many. */
  for (int i = 0; i < 5; i++)
    say(a, "{'type':'command','command':'fly'}");
  assert_false(a->closed);
  for (int i = 0; i < 5; i++)
    expect_error(a, "unknown_command", ANY_ID); /* the id the server gave the request */
  none(a);
}

static void test_forbidden_types(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.max_malformed = 2;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  drain(a);
  drain(b);
  say(a, "{'type':'system','id':'arq_t2','channel':'science:general','payload':{'event':'welcome'}}");
  expect_error(a, "forbidden", "arq_t2");
  say(a, "{'type':'error','channel':'science:general'}");
  expect_error(a, "forbidden", NULL);
  none(b); /* nothing was forwarded */
  assert_false(a->closed); /* and it is not malformed */
  none(a);
  /* Telemetry is accepted now: no error, and it goes to the telemetry
   * channel (none here), not to the channel it names. */
  say(a, "{'type':'telemetry','id':'arq_t1','eventType':'cpu','channel':'science:general','payload':{'cpu':1}}");
  none(a);
  none(b);
  assert_int_equal(stats(w).received[ARQ_MSG_TELEMETRY], 1);
}

/* ================= history ================= */

static void send_events(conn_t *a, int n) {
  for (int i = 1; i <= n; i++) {
    char json[160];
    snprintf(json, sizeof json, "{'type':'event','channel':'science:general','id':'arq_h%d','payload':{'n':%d}}", i,
             i);
    say(a, json);
  }
}

/* Asserts the history reply 'm' holds the events arq_h'first'.. 'n' of them. */
static void expect_history(json_t *m, int first, int n) {
  assert_int_equal(jint(m, "payload.count"), n);
  json_t *msgs = jget(m, "payload.messages");
  assert_int_equal(json_array_size(msgs), n);
  for (int i = 0; i < n; i++) {
    char want[32];
    snprintf(want, sizeof want, "arq_h%d", first + i);
    json_t *e = json_array_get(msgs, (size_t)i);
    expect_str(e, "id", want);
    expect_str(e, "type", "event");
    expect_str(e, "from", "alice");
    expect_str(e, "channel", "general");
    assert_int_equal(jint(e, "payload.n"), first + i);
  }
}

static void test_history(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.history_size = 5;
  o.history_default_limit = 3;
  o.history_max_limit = 4;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob");
  send_events(a, 7); /* the ring keeps 3..7 */
  drain(a);
  drain(b);

  say(b, "{'type':'command','command':'history','channel':'science:general','id':'arq_q1'}");
  json_t *m = expect_reply(b, "history", "arq_q1");
  expect_history(m, 5, 3); /* the default limit, newest */
  assert_int_equal(jint(m, "payload.limit"), 3);
  assert_true(jbool(m, "payload.more"));
  expect_str(m, "payload.room", "science");
  expect_str(m, "payload.channel", "general");
  assert_null(jget(m, "payload.since"));
  assert_null(jget(m, "payload.gap"));

  say(b, "{'type':'command','command':'history','channel':'science:general','payload':{'limit':100}}");
  m = expect_reply(b, "history", NULL);
  expect_history(m, 4, 4); /* capped at history_max_limit */
  assert_int_equal(jint(m, "payload.limit"), 4);
  assert_true(jbool(m, "payload.more"));

  say(b, "{'type':'command','command':'history','channel':'science:general','payload':{'limit':1}}");
  m = expect_reply(b, "history", NULL);
  expect_history(m, 7, 1);

  say(b, "{'type':'command','command':'history','channel':'science:general','payload':{'since':'arq_h5'}}");
  m = expect_reply(b, "history", NULL);
  expect_history(m, 6, 2);
  expect_str(m, "payload.since", "arq_h5");
  assert_false(jbool(m, "payload.gap"));
  assert_false(jbool(m, "payload.more"));

  say(b, "{'type':'command','command':'history','channel':'science:general','payload':{'since':'arq_h4','limit':2}}");
  m = expect_reply(b, "history", NULL);
  expect_history(m, 5, 2);
  assert_false(jbool(m, "payload.gap"));
  assert_true(jbool(m, "payload.more"));

  /* arq_h1 was overwritten: a gap, and the oldest retained follow. */
  say(b, "{'type':'command','command':'history','channel':'science:general','payload':{'since':'arq_h1'}}");
  m = expect_reply(b, "history", NULL);
  expect_history(m, 3, 3);
  assert_true(jbool(m, "payload.gap"));
  assert_true(jbool(m, "payload.more"));

  say(b, "{'type':'command','command':'history','channel':'science:general','payload':{'since':'arq_never'}}");
  m = expect_reply(b, "history", NULL);
  assert_true(jbool(m, "payload.gap"));

  /* A channel without messages. */
  say(b, "{'type':'command','command':'history','channel':'science:explore'}");
  m = expect_reply(b, "history", NULL);
  assert_int_equal(jint(m, "payload.count"), 0);
  assert_false(jbool(m, "payload.more"));

  /* Bad arguments. */
  static const char *const bad[] = {"{'limit':0}", "{'limit':-1}", "{'limit':'3'}", "{'limit':2.5}",
                                    "{'limit':null}", "{'since':'nope'}", "{'since':5}", "{'since':''}"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char json[256];
    snprintf(json, sizeof json, "{'type':'command','command':'history','channel':'science:general','id':'arq_b',"
             "'payload':%s}", bad[i]);
    say(b, json);
    json_t *e = expect_error(b, "invalid_argument", "arq_b");
    expect_str(e, "command", "history");
  }
  none(b);
  assert_int_equal(stats(w).history_messages, 5);
}

static void test_history_capped_by_size(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.history_size = 5;
  o.history_default_limit = 50;
  o.history_max_limit = 100;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  send_events(a, 9);
  drain(a);
  say(a, "{'type':'command','command':'history','channel':'science:general','payload':{'limit':8}}");
  json_t *m = expect_reply(a, "history", NULL);
  expect_history(m, 5, 5);
  assert_int_equal(jint(m, "payload.limit"), 5);
  assert_false(jbool(m, "payload.more"));
  say(a, "{'type':'command','command':'history','channel':'science:general'}");
  m = expect_reply(a, "history", NULL);
  expect_history(m, 5, 5);
  none(a);
}

/* ================= malformed messages ================= */

static void test_malformed_streak_closes(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.max_malformed = 3;
  o.max_envelope_size = 200;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  drain(a);
  drain(b);

  say(a, "not json");
  expect_error(a, "invalid_json", NULL);
  say(a, "{'type':'chat','id':'arq_m2'}");
  expect_error(a, "unknown_type", "arq_m2");
  /* A good message ends the streak. */
  say(a, "{'type':'command','command':'ping','id':'arq_ok'}");
  expect_reply(a, "pong", "arq_ok");
  say_raw(a, "\x01\x02", 2, true);
  expect_error(a, "unsupported_frame", NULL);
  char big[256];
  memset(big, ' ', sizeof big);
  memcpy(big, "{\"type\":\"event\"}", 16);
  say_raw(a, big, 201, false);
  json_t *m = expect_error(a, "payload_too_large", NULL);
  assert_non_null(strstr(jstr(m, "payload.message"), "200"));
  say_raw(a, big, 200, false); /* exactly the limit: fine (an event to the default channel) */
  expect_event(b, "alice");
  assert_false(a->closed);
  /* Three in a row: error, then close 1008. */
  say(a, "{'version':'2.0','type':'event'}");
  expect_error(a, "unsupported_version", NULL);
  say(a, "[1]");
  expect_error(a, "invalid_envelope", NULL);
  assert_false(a->closed);
  say(a, "{");
  expect_error(a, "invalid_json", NULL);
  none(a);
  assert_true(a->closed);
  assert_int_equal(a->close_code, 1008);
  assert_non_null(strstr(a->why, "malformed"));
  a->client = NULL; /* the bus already let go */

  m = expect_note(b, "client_left");
  expect_str(m, "payload.client_id", "alice");
  expect_str(m, "payload.reason", "disconnected");
  none(b);
  arq_bus_stats_t s = stats(w);
  assert_int_equal(s.malformed_closes, 1);
  assert_int_equal(s.clients, 1);
  assert_int_equal(s.errors[ARQ_CODE_INVALID_JSON], 2);
  assert_int_equal(s.errors[ARQ_CODE_UNKNOWN_TYPE], 1);
  assert_int_equal(s.errors[ARQ_CODE_UNSUPPORTED_FRAME], 1);
  assert_int_equal(s.errors[ARQ_CODE_PAYLOAD_TOO_LARGE], 1);
  assert_int_equal(s.errors[ARQ_CODE_UNSUPPORTED_VERSION], 1);
  assert_int_equal(s.errors[ARQ_CODE_INVALID_ENVELOPE], 1);
}

static void test_malformed_never_closes_with_zero(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.max_malformed = 0;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice");
  drain(a);
  for (int i = 0; i < 50; i++)
    say(a, "garbage");
  assert_false(a->closed);
  assert_int_equal(pending(a), 50);
  assert_int_equal(stats(w).malformed_closes, 0);
}

/* ================= replacing and slow consumers ================= */

static void test_duplicate_client_id_replaces(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a1 = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  drain(a1);
  drain(b);
  conn_t *a2 = connect_q(w, "client_id=alice&channel=science:explore");
  assert_true(a1->closed);
  assert_int_equal(a1->close_code, 4001);
  assert_non_null(strstr(a1->why, "replaced"));
  none(a1);
  expect_welcome(a2);
  none(a2);
  assert_int_equal(stats(w).clients, 2);
  drain(b);

  /* Only the new connection is alice now. */
  say(b, "{'type':'private','to':['alice'],'id':'arq_r1'}");
  expect_str(next(a2), "id", "arq_r1");
  none(a1);
  none(b);
  json_t *m = command(b, "{'type':'command','command':'channel_info','channel':'science:general'}");
  assert_int_equal(jint(m, "payload.members"), 1); /* the old membership went with the old connection */
  m = command(b, "{'type':'command','command':'channel_info','channel':'science:explore'}");
  assert_int_equal(jint(m, "payload.members"), 1);
  expect_str(m, "payload.member_list.0.client_id", "alice");

  /* A replacement without any channel. */
  conn_t *c1 = connect_q(w, "client_id=carol");
  conn_t *c2 = connect_q(w, "client_id=carol");
  assert_int_equal(c1->close_code, 4001);
  expect_welcome(c2);
  assert_int_equal(stats(w).clients, 3);
}

/* Members of the channel a replaced client rejoins must end up seeing it as
 * present: no client_left about it after its client_joined. */
static void test_replaced_client_presence(void **state) {
  world_t *w = *state;
  start_default(w);
  connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  drain(b);
  connect_q(w, "client_id=alice&channel=science:general");
  /* bob's view: 'alice' is in the channel, with 2 members. */
  const char *last = NULL;
  long long members = -1;
  while (pending(b) > 0) {
    json_t *m = next(b);
    if (jstr(m, "payload.client_id") && strcmp(jstr(m, "payload.client_id"), "alice") == 0) {
      last = strcmp(jstr(m, "payload.event"), "client_joined") == 0 ? "client_joined" : "client_left";
      members = jint(m, "payload.members");
    }
  }
  assert_non_null(last);
  if (strcmp(last, "client_joined") != 0)
    print_error("bob's last news of alice is %s (members %lld) although alice is connected\n", last, members);
  assert_string_equal(last, "client_joined"); /* BUG: bus.c sends client_left for the replaced one afterwards */
  assert_int_equal(members, 2);
}

static void test_slow_consumer_in_send(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  conn_t *c = connect_q(w, "client_id=carol&channel=science:general");
  conn_t *d = connect_q(w, "client_id=dave&channel=science:general");
  for (int i = 0; i < 4; i++)
    drain(&w->conns[i]);

  c->slow = true;
  say(a, "{'type':'event','channel':'science:general','id':'arq_s1'}");
  assert_true(c->closed);
  none(c);
  expect_event(b, "alice");
  json_t *m = expect_note(b, "client_left");
  expect_str(m, "payload.client_id", "carol");
  expect_str(m, "payload.reason", "disconnected");
  assert_int_equal(jint(m, "payload.members"), 3);
  none(b);
  expect_event(d, "alice");
  expect_note(d, "client_left");
  none(d);
  expect_note(a, "client_left");
  none(a);
  assert_int_equal(stats(w).clients, 3);

  /* Later traffic never reaches carol's connection. */
  say(a, "{'type':'event','channel':'science:general'}");
  expect_event(b, "alice");
  expect_event(d, "alice");
  none(c);

  /* Two slow consumers in one notification: the removal of one tells the
   * channel, whose notification makes the other one slow too. */
  b->slow = true;
  d->slow = true;
  say(a, "{'type':'event','channel':'science:general'}");
  assert_true(b->closed);
  assert_true(d->closed);
  /* alice hears of both. */
  m = expect_note(a, "client_left");
  json_t *m2 = json_deep_copy(m);
  m = expect_note(a, "client_left");
  assert_string_not_equal(jstr(m2, "payload.client_id"), jstr(m, "payload.client_id"));
  json_decref(m2);
  none(a);
  assert_int_equal(stats(w).clients, 1);
  m = command(a, "{'type':'command','command':'channel_info','channel':'science:general'}");
  assert_int_equal(jint(m, "payload.members"), 1);
}

static void test_slow_sender_and_reply(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&echo=true&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  drain(a);
  drain(b);
  /* The sender itself is slow when its echo is queued. */
  a->slow = true;
  say(a, "{'type':'event','channel':'science:general','id':'arq_x'}");
  assert_true(a->closed);
  expect_event(b, "alice");
  expect_note(b, "client_left");
  none(b);
  none(a);

  /* Slow on the reply to its own command. */
  conn_t *c = connect_q(w, "client_id=carol&channel=science:general");
  drain(b);
  drain(c);
  c->slow = true;
  say(c, "{'type':'command','command':'ping'}");
  assert_true(c->closed);
  none(c);
  json_t *m = expect_note(b, "client_left");
  expect_str(m, "payload.client_id", "carol");
  none(b);

  /* Slow on a private message and on a room-wide event. */
  conn_t *d = connect_q(w, "client_id=dave&channel=science:explore");
  conn_t *e = connect_q(w, "client_id=erin&channel=science:explore");
  drain(b);
  drain(d);
  drain(e);
  d->slow = true;
  say(b, "{'type':'private','to':['dave','erin']}");
  assert_true(d->closed);
  expect_str(next(e), "type", "private");
  expect_note(e, "client_left");
  none(e);
  none(b); /* no error: dave was connected when it was sent */
  e->slow = true;
  say(b, "{'type':'event','room':'science'}");
  assert_true(e->closed);
  none(b); /* erin was alone in science:explore */
  assert_int_equal(stats(w).clients, 1);
}

static void test_disconnect_during_notification(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  conn_t *c = connect_q(w, "client_id=carol&channel=science:general");
  drain(a);
  drain(b);
  drain(c);
  /* Telling the channel that alice left makes bob fail as slow. */
  b->slow = true;
  disconnect(a);
  assert_true(b->closed);
  json_t *m = expect_note(c, "client_left");
  expect_str(m, "payload.client_id", "alice");
  m = expect_note(c, "client_left");
  expect_str(m, "payload.client_id", "bob");
  assert_int_equal(jint(m, "payload.members"), 1);
  none(c);
  assert_int_equal(stats(w).clients, 1);
  /* And when joining tells it. */
  c->slow = true;
  conn_t *d = connect_q(w, "client_id=dave&channel=science:general");
  assert_true(c->closed);
  expect_welcome(d);
  m = expect_note(d, "client_left");
  expect_str(m, "payload.client_id", "carol");
  none(d);
  assert_int_equal(stats(w).clients, 1);
}

/* ================= channel lifetime ================= */

static void test_channel_ttl_zero(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.channel_ttl_ms = 0;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice");
  conn_t *b = connect_q(w, "client_id=bob&channel=art:studio");
  drain(a);
  drain(b);
  assert_int_equal(stats(w).channels, 3);
  assert_int_equal(stats(w).rooms, 2);

  say(a, "{'type':'command','command':'join_channel','channel':'art:studio'}");
  say(a, "{'type':'event','channel':'art:studio'}");
  say(a, "{'type':'command','command':'leave_channel','channel':'art:studio','id':'arq_l'}");
  drain(a);
  assert_true(has_channel(a, "art:studio")); /* bob is still there */
  disconnect(b);                             /* the last member goes */
  assert_false(has_channel(a, "art:studio"));
  arq_bus_stats_t s = stats(w);
  assert_int_equal(s.channels, 2);
  assert_int_equal(s.rooms, 1);
  assert_int_equal(s.history_messages, 0); /* its history went with it */

  /* Leaving as the last member, with the reply still complete. */
  say(a, "{'type':'command','command':'join_channel','channel':'art:x'}");
  drain(a);
  say(a, "{'type':'command','command':'leave_channel','channel':'art:x','id':'arq_l2'}");
  json_t *m = expect_reply(a, "leave_channel", "arq_l2");
  assert_int_equal(jint(m, "payload.members"), 0);
  expect_str(m, "payload.channel", "x");
  assert_false(has_channel(a, "art:x"));

  /* Bootstrap channels stay. */
  say(a, "{'type':'command','command':'join_channel','channel':'science:general'}");
  say(a, "{'type':'command','command':'leave_channel','channel':'science:general'}");
  drain(a);
  assert_true(has_channel(a, "science:general"));
  assert_int_equal(stats(w).channels, 2);

  /* A created channel nobody joined goes at the next tick. */
  say(a, "{'type':'command','command':'create_channel','channel':'art:empty'}");
  drain(a);
  assert_true(has_channel(a, "art:empty"));
  arq_bus_tick(w->bus, 1000);
  assert_false(has_channel(a, "art:empty"));
  none(a);
}

static void test_tick_sweeps_after_ttl(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.channel_ttl_ms = 1000;
  start(w, &o);
  arq_bus_tick(w->bus, 5000);
  conn_t *a = connect_q(w, "client_id=alice");
  drain(a);
  say(a, "{'type':'command','command':'join_channel','channel':'art:studio'}");
  say(a, "{'type':'event','channel':'art:studio'}");
  say(a, "{'type':'command','command':'leave_channel','channel':'art:studio'}");
  say(a, "{'type':'command','command':'join_channel','channel':'art:kept'}");
  drain(a);
  assert_int_equal(stats(w).channels, 4);

  arq_bus_tick(w->bus, 5999);
  assert_true(has_channel(a, "art:studio"));
  say(a, "{'type':'command','command':'history','channel':'art:studio'}");
  json_t *m = expect_reply(a, "history", NULL);
  assert_int_equal(jint(m, "payload.count"), 1); /* still there for a returning client */
  arq_bus_tick(w->bus, 6000);
  assert_false(has_channel(a, "art:studio"));
  assert_true(has_channel(a, "art:kept")); /* it has a member */
  assert_true(has_channel(a, "science:general"));
  arq_bus_stats_t s = stats(w);
  assert_int_equal(s.channels, 3);
  assert_int_equal(s.history_messages, 0);

  /* Rejoining within the ttl keeps it. */
  say(a, "{'type':'command','command':'leave_channel','channel':'art:kept'}");
  arq_bus_tick(w->bus, 6500);
  say(a, "{'type':'command','command':'join_channel','channel':'art:kept'}");
  drain(a);
  arq_bus_tick(w->bus, 100000);
  assert_true(has_channel(a, "art:kept"));
  none(a);
}

/* The ttl of a channel emptied before the first tick must count from when
 * the bus first learns the time, not from 0. */
static void test_ttl_before_first_tick(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.channel_ttl_ms = 60000;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice");
  say(a, "{'type':'command','command':'join_channel','channel':'art:studio'}");
  say(a, "{'type':'command','command':'leave_channel','channel':'art:studio'}");
  drain(a);
  /* The first tick: a monotonic clock reads the time since boot. */
  arq_bus_tick(w->bus, 86400000);
  assert_true(has_channel(a, "art:studio")); /* BUG: router.c stamps empty_since = 1 before any tick */
}

/* ================= figures ================= */

static void test_stats(void **state) {
  world_t *w = *state;
  start_default(w);
  arq_bus_stats_t s = stats(w);
  assert_int_equal(s.clients, 0);
  assert_int_equal(s.rooms, 1);
  assert_int_equal(s.channels, 2);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  conn_t *c = connect_q(w, "client_id=carol");
  say(a, "{'type':'event','channel':'science:general'}");
  say(a, "{'type':'event','channel':'art:studio'}"); /* creates it, reaches nobody */
  say(a, "{'type':'private','to':['carol']}");
  say(c, "{'type':'command','command':'ping'}");
  say(c, "junk");
  say(c, "{'type':'command','command':'nope'}");
  s = stats(w);
  assert_int_equal(s.clients, 3);
  assert_int_equal(s.rooms, 2);
  assert_int_equal(s.channels, 3);
  assert_int_equal(s.received[ARQ_MSG_EVENT], 2);
  assert_int_equal(s.received[ARQ_MSG_PRIVATE], 1);
  assert_int_equal(s.received[ARQ_MSG_COMMAND], 2);
  assert_int_equal(s.delivered[ARQ_MSG_EVENT], 1);
  assert_int_equal(s.delivered[ARQ_MSG_PRIVATE], 1);
  /* 3 welcomes, bob's client_joined, the pong. */
  assert_int_equal(s.delivered[ARQ_MSG_SYSTEM], 5);
  assert_int_equal(s.delivered[ARQ_MSG_ERROR], 2);
  assert_int_equal(s.errors[ARQ_CODE_INVALID_JSON], 1);
  assert_int_equal(s.errors[ARQ_CODE_UNKNOWN_COMMAND], 1);
  assert_int_equal(s.history_messages, 2);
  assert_int_equal(s.malformed_closes, 0);
  disconnect(b);
  assert_int_equal(stats(w).clients, 2);
  (void)c;
  json_t *st = arq_bus_status(w->bus);
  assert_int_equal(jint(st, "clients.total"), 2);
  assert_int_equal(jint(st, "messages.received"), 6); /* 5 valid envelopes and the invalid JSON */
  assert_int_equal(jint(st, "history.capacity_per_channel"), 500);
  expect_str(st, "history.backend", "memory");
  /* Without a describe hook the server object is the bus's own. */
  expect_str(st, "server.name", "arqonbus");
  assert_null(jget(st, "server.shell"));
  assert_int_equal(w->describes, 0);
  json_decref(st);
}

/* An error about a name with non-ASCII letters must still carry its code. */
static void test_error_payload_survives_utf8_names(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice");
  drain(a);
  char json[256] = "{'id':'arq_u8','type':'a";
  for (int i = 0; i < 16; i++)
    strcat(json, "\xc3\xa9");
  strcat(json, "'}");
  say(a, json);
  json_t *m = next(a);
  expect_str(m, "type", "error");
  expect_str(m, "correlation_id", "arq_u8");
  expect_str(m, "payload.code", "unknown_type"); /* BUG: payload is {} (json_pack fails on a cut UTF-8 message) */
}

/* ================= telemetry and dashboard channels ================= */

/* With the defaults, the telemetry and dashboard channels exist from the
 * start, like bootstrap channels: listed, never deleted, never swept. */
static void test_integriguard_channels(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts_integriguard();
  o.channel_ttl_ms = 0;
  start(w, &o);
  arq_bus_stats_t s = stats(w);
  assert_int_equal(s.rooms, 2);
  assert_int_equal(s.channels, 4);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  drain(a);
  say(a, "{'type':'event','channel':'science:general'}");
  json_t *m = command(a, "{'type':'command','command':'list_channels','room':'integriguard'}");
  expect_str(m, "command", "list_channels");
  assert_int_equal(jint(m, "payload.count"), 2);
  expect_str(m, "payload.channels.0.channel", "dashboard-events");
  expect_str(m, "payload.channels.1.channel", "telemetry-stream");
  for (int i = 0; i < 2; i++) {
    char p[64];
    snprintf(p, sizeof p, "payload.channels.%d.bootstrap", i);
    assert_true(jbool(m, p));
    snprintf(p, sizeof p, "payload.channels.%d.members", i);
    assert_int_equal(jint(m, p), 0);
  }

  say(a, "{'type':'command','command':'delete_channel','channel':'" TEL_CHANNEL "','id':'arq_d1'}");
  expect_error(a, "forbidden", "arq_d1");
  say(a, "{'type':'command','command':'delete_channel','channel':'" DASH_CHANNEL "','id':'arq_d2'}");
  expect_error(a, "forbidden", "arq_d2");
  /* The last member leaving does not remove them (ttl 0 here), nor does a tick. */
  say(a, "{'type':'command','command':'join_channel','channel':'" DASH_CHANNEL "'}");
  say(a, "{'type':'command','command':'leave_channel','channel':'" DASH_CHANNEL "'}");
  drain(a);
  arq_bus_tick(w->bus, 100000);
  assert_true(has_channel(a, DASH_CHANNEL));
  assert_true(has_channel(a, TEL_CHANNEL));
  none(a);

  /* The status report lists them in room_details, rooms and channels sorted. */
  json_t *st = arq_bus_status(w->bus);
  assert_int_equal(jint(st, "rooms"), 2);
  assert_int_equal(jint(st, "channels"), 4);
  assert_int_equal(json_array_size(jget(st, "room_details")), 2);
  expect_str(st, "room_details.0.room", "integriguard");
  assert_int_equal(json_array_size(jget(st, "room_details.0.channels")), 2);
  expect_str(st, "room_details.0.channels.0.channel", "dashboard-events");
  expect_str(st, "room_details.0.channels.1.channel", "telemetry-stream");
  assert_true(jbool(st, "room_details.0.channels.1.bootstrap"));
  assert_int_equal(jint(st, "room_details.0.channels.1.members"), 0);
  assert_int_equal(jint(st, "room_details.0.channels.1.messages"), 0);
  assert_int_equal(jint(st, "room_details.0.channels.1.history"), 0);
  expect_str(st, "room_details.1.room", "science");
  expect_str(st, "room_details.1.channels.0.channel", "explore");
  expect_str(st, "room_details.1.channels.1.channel", "general");
  assert_int_equal(jint(st, "room_details.1.channels.1.members"), 1);
  assert_int_equal(jint(st, "room_details.1.channels.1.messages"), 1);
  assert_int_equal(jint(st, "room_details.1.channels.1.history"), 1);
  assert_true(jbool(st, "room_details.1.channels.1.bootstrap"));
  json_decref(st);
}

static void test_tel_names_and_envelope(void **state) {
  world_t *w = *state;
  start_default(w);
  static const char *const names[] = {"client_connected", "client_disconnected", "channel_created",
                                      "channel_deleted",  "client_joined",       "client_left",
                                      "command_executed", "error",               "protocol_violation",
                                      "slow_consumer",    "stats",               "client_telemetry",
                                      "agent_activity"};
  assert_int_equal(ARQ_TEL_NEVENTS, sizeof names / sizeof names[0]);
  for (int i = 0; i < ARQ_TEL_NEVENTS; i++) {
    assert_string_equal(arq_tel_name((arq_tel_event_t)i), names[i]);
    assert_int_equal(arq_tel_parse(names[i], strlen(names[i])), i);
  }
  assert_string_equal(arq_tel_name(ARQ_TEL_NEVENTS), "?");
  assert_int_equal(arq_tel_parse("error", 4), -1); /* a prefix */
  assert_int_equal(arq_tel_parse("errors", 6), -1);
  assert_int_equal(arq_tel_parse("stats,error", 5), ARQ_TEL_STATS); /* only the 'n' bytes count */
  assert_int_equal(arq_tel_parse("", 0), -1);
  assert_int_equal(arq_tel_parse("Error", 5), -1);

  /* The envelope steals the payload (ASan sees a leak or a double free). */
  json_t *env = arq_bus_tel_envelope(w->bus, "stats", json_pack("{s:i}", "clients", 3));
  expect_keys(env, "version,id,type,eventType,payload,timestamp");
  expect_str(env, "type", "telemetry");
  expect_str(env, "eventType", "stats");
  assert_int_equal(jint(env, "payload.clients"), 3);
  assert_true(arq_env_valid_id(jstr(env, "id")));
  assert_true(arq_env_valid_timestamp(jstr(env, "timestamp")));
  json_t *env2 = arq_bus_tel_envelope(w->bus, "stats", NULL);
  assert_true(json_is_object(jget(env2, "payload")));
  assert_string_not_equal(jstr(env, "id"), jstr(env2, "id"));
  json_decref(env);
  json_decref(env2);
  assert_int_equal(w->tel_calls, 0); /* building is not reporting */
}

/* Every kind of telemetry the bus itself reports, in order, in its shape. */
static void test_telemetry_bus_events(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.channel_ttl_ms = 0;
  o.admins = admins;
  start(w, &o);
  set_mask(w, TEL_ALL);

  conn_t *a = connect_q(w, "client_id=alice&screen_name=Al&channel=science:general");
  json_t *m = expect_tel(w, ARQ_TEL_CLIENT_CONNECTED);
  expect_str(m, "payload.client_id", "alice");
  expect_str(m, "payload.client_type", "human");
  expect_str(m, "payload.screen_name", "Al");
  expect_str(m, "payload.remote", "127.0.0.1:1234");
  expect_str(m, "payload.initial_channel", "science:general");
  assert_true(arq_env_valid_timestamp(jstr(m, "payload.connected_at")));
  m = expect_tel(w, ARQ_TEL_CLIENT_JOINED);
  expect_str(m, "payload.client_id", "alice");
  expect_str(m, "payload.client_type", "human");
  expect_str(m, "payload.room", "science");
  expect_str(m, "payload.channel", "general");
  assert_int_equal(jint(m, "payload.members"), 1);
  tel_none(w); /* the channel existed (bootstrap): not created */

  conn_t *b = connect_q(w, "client_id=bob&client_type=dashboard");
  m = expect_tel(w, ARQ_TEL_CLIENT_CONNECTED);
  expect_str(m, "payload.client_id", "bob");
  expect_str(m, "payload.client_type", "dashboard");
  assert_null(jget(m, "payload.initial_channel"));
  assert_null(jget(m, "payload.screen_name"));
  tel_none(w); /* not an agent: no agent_activity */
  drain(a);
  drain(b);

  /* A command creating a channel and joining it, then the command itself. */
  say(b, "{'type':'command','command':'join_channel','channel':'art:studio','id':'arq_j1'}");
  m = expect_tel(w, ARQ_TEL_CHANNEL_CREATED);
  expect_str(m, "payload.room", "art");
  expect_str(m, "payload.channel", "studio");
  assert_false(jbool(m, "payload.bootstrap"));
  m = expect_tel(w, ARQ_TEL_CLIENT_JOINED);
  expect_str(m, "payload.client_id", "bob");
  expect_str(m, "payload.client_type", "dashboard");
  expect_str(m, "payload.room", "art");
  expect_str(m, "payload.channel", "studio");
  assert_int_equal(jint(m, "payload.members"), 1);
  m = expect_tel(w, ARQ_TEL_COMMAND_EXECUTED);
  expect_keys(jget(m, "payload"), "command,client_id,duration_ms,result");
  expect_str(m, "payload.command", "join_channel");
  expect_str(m, "payload.client_id", "bob");
  expect_str(m, "payload.result", "ok");
  assert_true(json_is_real(jget(m, "payload.duration_ms")));
  assert_true(json_real_value(jget(m, "payload.duration_ms")) >= 0);
  tel_none(w);

  /* Leaving as the last member removes the channel (ttl 0). */
  say(b, "{'type':'command','command':'leave_channel','channel':'art:studio','id':'arq_l1'}");
  m = expect_tel(w, ARQ_TEL_CLIENT_LEFT);
  expect_str(m, "payload.client_id", "bob");
  expect_str(m, "payload.room", "art");
  expect_str(m, "payload.channel", "studio");
  assert_int_equal(jint(m, "payload.members"), 0);
  m = expect_tel(w, ARQ_TEL_CHANNEL_DELETED);
  expect_str(m, "payload.room", "art");
  expect_str(m, "payload.channel", "studio");
  assert_false(jbool(m, "payload.bootstrap"));
  m = expect_tel(w, ARQ_TEL_COMMAND_EXECUTED);
  expect_str(m, "payload.command", "leave_channel");
  expect_str(m, "payload.result", "ok");
  tel_none(w);

  /* A command that fails: the error, then the command with the error's code. */
  say(b, "{'type':'command','command':'leave_channel','channel':'nowhere:here','id':'arq_l2'}");
  m = expect_tel(w, ARQ_TEL_ERROR);
  expect_str(m, "payload.client_id", "bob");
  expect_str(m, "payload.code", "not_found");
  expect_str(m, "payload.correlation_id", "arq_l2");
  expect_str(m, "payload.command", "leave_channel");
  assert_non_null(strstr(jstr(m, "payload.message"), "nowhere:here"));
  m = expect_tel(w, ARQ_TEL_COMMAND_EXECUTED);
  expect_str(m, "payload.command", "leave_channel");
  expect_str(m, "payload.client_id", "bob");
  expect_str(m, "payload.result", "not_found");
  tel_none(w);

  /* A privileged command refused. */
  say(b, "{'type':'command','command':'create_channel','channel':'art:x','id':'arq_c1'}");
  m = expect_tel(w, ARQ_TEL_ERROR);
  expect_str(m, "payload.code", "forbidden");
  expect_str(m, "payload.command", "create_channel");
  m = expect_tel(w, ARQ_TEL_COMMAND_EXECUTED);
  expect_str(m, "payload.command", "create_channel");
  expect_str(m, "payload.result", "forbidden");
  tel_none(w);

  /* Errors outside commands: no command_executed. */
  say(b, "junk");
  m = expect_tel(w, ARQ_TEL_ERROR);
  expect_str(m, "payload.client_id", "bob");
  expect_str(m, "payload.code", "invalid_json");
  assert_null(jget(m, "payload.correlation_id"));
  assert_null(jget(m, "payload.command"));
  say(b, "{'type':'command','command':'fly','id':'arq_u'}");
  m = expect_tel(w, ARQ_TEL_ERROR);
  expect_str(m, "payload.code", "unknown_command");
  expect_str(m, "payload.correlation_id", "arq_u");
  expect_str(m, "payload.command", "fly");
  tel_none(w);

  /* Creating and deleting a channel by command. */
  conn_t *r = connect_q(w, "client_id=root");
  m = expect_tel(w, ARQ_TEL_CLIENT_CONNECTED);
  expect_str(m, "payload.client_id", "root");
  say(r, "{'type':'command','command':'create_channel','channel':'art:lab','id':'arq_c2'}");
  m = expect_tel(w, ARQ_TEL_CHANNEL_CREATED);
  expect_str(m, "payload.channel", "lab");
  m = expect_tel(w, ARQ_TEL_COMMAND_EXECUTED);
  expect_str(m, "payload.command", "create_channel");
  expect_str(m, "payload.client_id", "root");
  expect_str(m, "payload.result", "ok");
  say(r, "{'type':'command','command':'delete_channel','channel':'art:lab','id':'arq_c3'}");
  m = expect_tel(w, ARQ_TEL_CHANNEL_DELETED);
  expect_str(m, "payload.room", "art");
  expect_str(m, "payload.channel", "lab");
  m = expect_tel(w, ARQ_TEL_COMMAND_EXECUTED);
  expect_str(m, "payload.command", "delete_channel");
  expect_str(m, "payload.result", "ok");
  tel_none(w);

  /* An event to a new channel creates it; the sweep removes it. */
  say(r, "{'type':'event','channel':'art:wall'}");
  m = expect_tel(w, ARQ_TEL_CHANNEL_CREATED);
  expect_str(m, "payload.channel", "wall");
  tel_none(w);
  arq_bus_tick(w->bus, 1000);
  m = expect_tel(w, ARQ_TEL_CHANNEL_DELETED);
  expect_str(m, "payload.channel", "wall");
  tel_none(w);

  /* Disconnecting: the client with its subscriptions, then each channel it
   * leaves; a bootstrap channel stays. */
  disconnect(a);
  m = expect_tel(w, ARQ_TEL_CLIENT_DISCONNECTED);
  expect_str(m, "payload.client_id", "alice");
  expect_str(m, "payload.client_type", "human");
  expect_str(m, "payload.remote", "127.0.0.1:1234");
  assert_int_equal(json_array_size(jget(m, "payload.subscriptions")), 1);
  expect_str(m, "payload.subscriptions.0", "science:general");
  m = expect_tel(w, ARQ_TEL_CLIENT_LEFT);
  expect_str(m, "payload.client_id", "alice");
  expect_str(m, "payload.channel", "general");
  assert_int_equal(jint(m, "payload.members"), 0);
  tel_none(w);
  disconnect(b);
  m = expect_tel(w, ARQ_TEL_CLIENT_DISCONNECTED);
  expect_str(m, "payload.client_id", "bob");
  assert_int_equal(json_array_size(jget(m, "payload.subscriptions")), 0);
  tel_none(w);
  /* The bus reports nothing the shell reports itself. */
  for (size_t i = 0; i < w->ntel; i++) {
    assert_int_not_equal(w->tel[i].ev, ARQ_TEL_PROTOCOL_VIOLATION);
    assert_int_not_equal(w->tel[i].ev, ARQ_TEL_SLOW_CONSUMER);
    assert_int_not_equal(w->tel[i].ev, ARQ_TEL_STATS);
  }
}

/* Only the kinds in the mask are reported; the mask can change any time. */
static void test_telemetry_mask_selects(void **state) {
  world_t *w = *state;
  start_default(w);
  set_mask(w, 1u << ARQ_TEL_ERROR);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  drain(a);
  say(a, "{'type':'command','command':'ping'}");
  say(a, "junk");
  say(a, "{'type':'command','command':'fly'}");
  say(a, "{'type':'command','command':'join_channel','channel':'art:x'}");
  expect_str(expect_tel(w, ARQ_TEL_ERROR), "payload.code", "invalid_json");
  expect_str(expect_tel(w, ARQ_TEL_ERROR), "payload.code", "unknown_command");
  tel_none(w);
  assert_int_equal(w->tel_calls, 2);
  set_mask(w, 1u << ARQ_TEL_CLIENT_CONNECTED | 1u << ARQ_TEL_CLIENT_DISCONNECTED);
  say(a, "junk");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  expect_str(expect_tel(w, ARQ_TEL_CLIENT_CONNECTED), "payload.client_id", "bob");
  disconnect(b);
  expect_str(expect_tel(w, ARQ_TEL_CLIENT_DISCONNECTED), "payload.client_id", "bob");
  tel_none(w);
  set_mask(w, 0);
  say(a, "junk");
  say(a, "{'type':'command','command':'ping'}");
  connect_q(w, "client_id=carol");
  assert_int_equal(w->tel_calls, 4);
}

/* With the mask 0 the callback is never called and no telemetry envelope is
 * even built. Built envelopes are visible in the ids: every server-made
 * envelope takes the next number of the bus's id counter, so the ids of two
 * replies tell how many envelopes were made between them (a notification is
 * built once even when nobody is left to receive it, as for the join below). */
static void test_telemetry_mask_zero_builds_nothing(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts(); /* no dashboard channel: agent activity goes nowhere */
  o.channel_ttl_ms = 0;
  start(w, &o);
  set_mask(w, 0);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *bot = connect_q(w, "client_id=bot&client_type=ai-agent&channel=science:general");
  drain(a);
  drain(bot);
  for (int round = 0; round < 2; round++) {
    /* Round 1 repeats round 0 with telemetry on, to show the counter sees it. */
    if (round == 1)
      set_mask(w, TEL_ALL & ~(1u << ARQ_TEL_AGENT_ACTIVITY));
    char json[128];
    snprintf(json, sizeof json, "{'type':'command','command':'ping','id':'arq_p%d'}", 2 * round);
    say(a, json);
    unsigned long first = id_counter(jstr(next(a), "id"));
    /* An agent publishes, runs commands and errs; a channel comes and goes.
     * Only the replies, errors and the join's notification need ids (the
     * requests carry their own). */
    say(bot, "{'type':'event','channel':'science:general','id':'arq_b1'}");
    expect_event(a, "bot");
    say(bot, "{'type':'command','command':'ping','id':'arq_b2'}");
    say(bot, "junk");
    say(bot, "{'type':'command','command':'join_channel','channel':'art:x','id':'arq_b3'}");
    say(bot, "{'type':'command','command':'leave_channel','channel':'art:x','id':'arq_b4'}");
    assert_int_equal(pending(bot), 4);
    drain(bot);
    snprintf(json, sizeof json, "{'type':'command','command':'ping','id':'arq_p%d'}", 2 * round + 1);
    say(a, json);
    unsigned long second = id_counter(jstr(next(a), "id"));
    none(a);
    if (round == 0) {
      /* 4 to the bot, the client_joined notification, the second pong. */
      assert_int_equal(second - first, 6);
      assert_int_equal(w->tel_calls, 0);
      assert_int_equal(w->ntel, 0);
    } else {
      /* The same, plus 4 command_executed (the first pong's included), 1
       * error, channel_created/deleted, client_joined/left. */
      assert_int_equal(second - first, 6 + 9);
      assert_int_equal(w->tel_calls, 9 + 1); /* and the second pong's command_executed */
    }
  }
  assert_int_equal(stats(w).history_messages, 2); /* the two events, nothing on a dashboard */
}

/* Telemetry from a client goes to the telemetry channel, whatever target it
 * names, with its eventType and the sender as 'from'; and to the stream. */
static void test_client_telemetry(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts_integriguard();
  start(w, &o);
  conn_t *dash = connect_q(w, "client_id=dash&client_type=dashboard&channel=" TEL_CHANNEL);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  conn_t *e = connect_q(w, "client_id=echoer&echo=true&channel=" TEL_CHANNEL);
  for (int i = 0; i < 4; i++)
    drain(&w->conns[i]);
  set_mask(w, 1u << ARQ_TEL_CLIENT_TELEMETRY);

  say(a, "{'type':'telemetry','id':'arq_t1','eventType':'cpu_load','channel':'science:general','from':'mallory',"
         "'payload':{'cpu':0.5},'metadata':{'host':'h1'},'timestamp':'2026-01-31T12:00:00Z'}");
  json_t *t = tel_next(w, ARQ_TEL_CLIENT_TELEMETRY);
  expect_keys(t, "version,id,type,eventType,room,channel,from,payload,metadata,timestamp");
  expect_str(t, "version", "1.0");
  expect_str(t, "type", "telemetry");
  expect_str(t, "eventType", "cpu_load");
  expect_str(t, "id", "arq_t1");
  expect_str(t, "from", "alice");
  expect_str(t, "room", "integriguard");
  expect_str(t, "channel", "telemetry-stream");
  assert_true(json_real_value(jget(t, "payload.cpu")) == 0.5);
  expect_str(t, "metadata.host", "h1");
  expect_str(t, "timestamp", "2026-01-31T12:00:00Z");
  json_t *got = next(dash);
  /* The channel gets what the stream gets, plus its position in history. */
  unsigned long long pos = expect_positioned(got, t);
  char *delivered = json_dumps(got, JSON_COMPACT);
  json_t *got_e = next(e);
  assert_int_equal(expect_positioned(got_e, t), pos); /* one frame for every member */
  char *delivered_e = json_dumps(got_e, JSON_COMPACT);
  assert_string_equal(delivered_e, delivered);
  free(delivered_e);
  none(dash);
  none(e);
  none(a); /* not a member, and no error */
  none(b); /* the channel it named got nothing */
  tel_none(w);
  json_t *h = command(dash, "{'type':'command','command':'history','channel':'" TEL_CHANNEL "'}");
  expect_str(h, "command", "history");
  assert_int_equal(jint(h, "payload.count"), 1);
  /* History keeps what was delivered, position included. */
  char *stored = json_dumps(jget(h, "payload.messages.0"), JSON_COMPACT);
  assert_string_equal(stored, delivered);
  free(stored);
  free(delivered);

  /* Without id and timestamp the server fills them in. */
  say(b, "{'type':'telemetry','eventType':'mem','payload':{}}");
  t = tel_next(w, ARQ_TEL_CLIENT_TELEMETRY);
  expect_str(t, "from", "bob");
  expect_str(t, "eventType", "mem");
  assert_true(arq_env_valid_id(jstr(t, "id")));
  assert_true(arq_env_valid_timestamp(jstr(t, "timestamp")));
  unsigned long long p2 = expect_positioned(next(dash), t);
  assert_true(p2 > pos);
  assert_int_equal(expect_positioned(next(e), t), p2);
  none(b);

  /* A member gets its own back only with echo. */
  say(e, "{'type':'telemetry','eventType':'disk','payload':{'free':1}}");
  t = tel_next(w, ARQ_TEL_CLIENT_TELEMETRY);
  expect_str(t, "from", "echoer");
  unsigned long long p3 = expect_positioned(next(e), t);
  assert_true(p3 > p2);
  assert_int_equal(expect_positioned(next(dash), t), p3);
  say(dash, "{'type':'telemetry','eventType':'fps','payload':{}}");
  t = tel_next(w, ARQ_TEL_CLIENT_TELEMETRY);
  expect_str(t, "from", "dash");
  assert_true(expect_positioned(next(e), t) > p3);
  none(e);
  none(dash);

  /* Invalid telemetry is an error to the sender only. */
  say(a, "{'type':'telemetry','id':'arq_t9','payload':{}}");
  expect_error(a, "invalid_envelope", "arq_t9");
  say(a, "{'type':'telemetry','id':'arq_t8','eventType':'bad name','payload':{}}");
  expect_error(a, "invalid_envelope", "arq_t8");
  none(a);
  none(dash);
  tel_none(w);

  arq_bus_stats_t s = stats(w);
  assert_int_equal(s.received[ARQ_MSG_TELEMETRY], 4);
  assert_int_equal(s.delivered[ARQ_MSG_TELEMETRY], 7); /* 3 to dash, 4 to echoer */
  assert_int_equal(s.received_invalid, 2);
  h = command(dash, "{'type':'command','command':'channel_info','channel':'" TEL_CHANNEL "'}");
  assert_int_equal(jint(h, "payload.messages"), 4);
  assert_int_equal(jint(h, "payload.history"), 4);
}

/* A configured telemetry channel of another name, and none at all. */
static void test_client_telemetry_channel_options(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.telemetry_channel = "ops:tel";
  start(w, &o);
  assert_int_equal(stats(w).channels, 3);
  conn_t *m = connect_q(w, "client_id=mon&channel=ops:tel");
  conn_t *a = connect_q(w, "client_id=alice");
  drain(m);
  drain(a);
  say(a, "{'type':'telemetry','eventType':'cpu','room':'integriguard','channel':'telemetry-stream','payload':{}}");
  json_t *t = next(m);
  expect_str(t, "room", "ops");
  expect_str(t, "channel", "tel");
  expect_str(t, "eventType", "cpu");
  expect_str(t, "from", "alice");
  none(a);
  none(m);
  assert_int_equal(stats(w).channels, 3); /* the channel it named was not created */
}

static void test_client_telemetry_without_channel(void **state) {
  world_t *w = *state;
  start_default(w); /* no telemetry channel */
  set_mask(w, 1u << ARQ_TEL_CLIENT_TELEMETRY);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  drain(a);
  drain(b);
  say(a, "{'type':'telemetry','id':'arq_t1','eventType':'cpu','channel':'science:general','payload':{'c':1}}");
  json_t *t = tel_next(w, ARQ_TEL_CLIENT_TELEMETRY);
  /* Still on the stream, without a target. */
  expect_keys(t, "version,id,type,eventType,from,payload,timestamp");
  expect_str(t, "id", "arq_t1");
  expect_str(t, "from", "alice");
  tel_none(w);
  none(a); /* no error */
  none(b);
  arq_bus_stats_t s = stats(w);
  assert_int_equal(s.received[ARQ_MSG_TELEMETRY], 1);
  assert_int_equal(s.delivered[ARQ_MSG_TELEMETRY], 0);
  assert_int_equal(s.history_messages, 0);
  assert_int_equal(s.channels, 2);
}

/* The next agent_activity: reported on the stream and, identical, to
 * 'watch' on the dashboard channel. Returns it (borrowed like tel_next's). */
static json_t *expect_activity(world_t *w, conn_t *watch, const char *activity, const char *client_id,
                               const char *client_type) {
  json_t *t = tel_next(w, ARQ_TEL_AGENT_ACTIVITY);
  expect_keys(t, "version,id,type,eventType,room,channel,payload,timestamp");
  expect_str(t, "version", "1.0");
  expect_str(t, "type", "telemetry");
  expect_str(t, "eventType", "agent_activity");
  expect_str(t, "room", "integriguard");
  expect_str(t, "channel", "dashboard-events");
  assert_true(arq_env_valid_id(jstr(t, "id")));
  assert_true(arq_env_valid_timestamp(jstr(t, "timestamp")));
  expect_str(t, "payload.activity", activity);
  expect_str(t, "payload.client_id", client_id);
  expect_str(t, "payload.client_type", client_type);
  expect_positioned(next(watch), t); /* plus its position in the channel's history */
  return t;
}

static void test_agent_activity(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts_integriguard();
  start(w, &o);
  conn_t *watch = connect_q(w, "client_id=watch&client_type=dashboard&channel=" DASH_CHANNEL);
  conn_t *hum = connect_q(w, "client_id=hum&channel=science:general");
  drain(watch);
  drain(hum);
  set_mask(w, 1u << ARQ_TEL_AGENT_ACTIVITY);

  /* Humans and dashboards are not agents. */
  say(hum, "{'type':'event','channel':'science:general'}");
  say(hum, "{'type':'command','command':'ping'}");
  conn_t *d2 = connect_q(w, "client_id=dash2&client_type=dashboard");
  disconnect(d2);
  none(watch);
  tel_none(w);
  drain(hum);

  conn_t *bot = connect_q(w, "client_id=bot&client_type=ai-agent&screen_name=Botty&channel=science:general");
  json_t *t = expect_activity(w, watch, "connected", "bot", "ai-agent");
  expect_keys(jget(t, "payload"), "activity,client_id,client_type,screen_name");
  expect_str(t, "payload.screen_name", "Botty");
  expect_welcome(bot);
  expect_note(hum, "client_joined");

  say(bot, "{'type':'event','id':'arq_b1','payload':{'n':1}}"); /* to its initial channel */
  expect_event(hum, "bot");
  t = expect_activity(w, watch, "message_sent", "bot", "ai-agent");
  expect_keys(jget(t, "payload"), "activity,client_id,client_type,screen_name,message_type,room,channel");
  expect_str(t, "payload.message_type", "event");
  expect_str(t, "payload.room", "science");
  expect_str(t, "payload.channel", "general");
  say(bot, "{'type':'private','to':['hum'],'id':'arq_b2'}");
  expect_str(next(hum), "type", "private");
  t = expect_activity(w, watch, "message_sent", "bot", "ai-agent");
  expect_str(t, "payload.message_type", "private");
  assert_null(jget(t, "payload.room"));
  assert_null(jget(t, "payload.channel"));
  say(bot, "{'type':'event','room':'science','id':'arq_b3'}");
  expect_event(hum, "bot");
  t = expect_activity(w, watch, "message_sent", "bot", "ai-agent");
  expect_str(t, "payload.room", "science");
  assert_null(jget(t, "payload.channel"));
  say(bot, "{'type':'telemetry','eventType':'load','payload':{}}");
  t = expect_activity(w, watch, "message_sent", "bot", "ai-agent");
  expect_str(t, "payload.message_type", "telemetry");
  expect_str(t, "payload.room", "integriguard");
  expect_str(t, "payload.channel", "telemetry-stream");
  say(bot, "{'type':'command','command':'ping','id':'arq_b4'}");
  expect_reply(bot, "pong", "arq_b4");
  t = expect_activity(w, watch, "command_run", "bot", "ai-agent");
  expect_keys(jget(t, "payload"), "activity,client_id,client_type,screen_name,command,result");
  expect_str(t, "payload.command", "ping");
  expect_str(t, "payload.result", "ok");
  say(bot, "{'type':'command','command':'leave_channel','channel':'nowhere:x','id':'arq_b5'}");
  expect_error(bot, "not_found", "arq_b5");
  t = expect_activity(w, watch, "command_run", "bot", "ai-agent");
  expect_str(t, "payload.command", "leave_channel");
  expect_str(t, "payload.result", "not_found");
  /* No command ran, nothing was sent. */
  say(bot, "{'type':'command','command':'fly','id':'arq_b6'}");
  expect_error(bot, "unknown_command", "arq_b6");
  say(bot, "junk");
  expect_error(bot, "invalid_json", NULL);
  none(watch);
  tel_none(w);
  none(bot);

  conn_t *svc = connect_q(w, "client_id=svc&client_type=service");
  t = expect_activity(w, watch, "connected", "svc", "service");
  expect_keys(jget(t, "payload"), "activity,client_id,client_type");
  drain(svc);
  disconnect(bot);
  expect_activity(w, watch, "disconnected", "bot", "ai-agent");
  expect_note(hum, "client_left");
  none(watch);
  tel_none(w);

  /* The dashboard channel's history holds them all, in order. */
  static const char *const want[] = {"connected",    "message_sent", "message_sent", "message_sent", "message_sent",
                                     "command_run",  "command_run",  "connected",    "disconnected"};
  size_t n = sizeof want / sizeof want[0];
  unsigned long long last_pos = 0;
  http_answer_t ans = {0};
  json_t *body = http_history(w, &ans, NULL, DASH_CHANNEL, 100, NULL);
  assert_int_equal(ans.status, 200);
  assert_int_equal(jint(body, "count"), n);
  for (size_t i = 0; i < n; i++) {
    json_t *e = json_array_get(jget(body, "messages"), i);
    expect_str(e, "eventType", "agent_activity");
    expect_str(e, "payload.activity", want[i]);
    /* Stored as delivered: the very envelope the stream got, plus its
     * position, which grows. */
    json_t *reported = json_loads(w->tel[i].text, 0, NULL);
    unsigned long long p = expect_positioned(e, reported);
    json_decref(reported);
    assert_true(p > last_pos);
    last_pos = p;
  }
  json_decref(ans.body);
  assert_int_equal(stats(w).delivered[ARQ_MSG_TELEMETRY], n); /* all to watch */

  /* The dashboard channel does not depend on the telemetry mask. */
  set_mask(w, 0);
  say(svc, "{'type':'command','command':'ping'}");
  json_t *m = next(watch);
  expect_str(m, "eventType", "agent_activity");
  expect_str(m, "payload.activity", "command_run");
  expect_str(m, "payload.client_id", "svc");
  assert_true(strtoull(jstr(m, "position"), NULL, 10) > last_pos); /* still stored, still positioned */
  none(watch);
  tel_none(w);
}

/* Without a dashboard channel, agent activity still goes to the stream, as
 * a telemetry envelope without a target. */
static void test_agent_activity_without_dashboard(void **state) {
  world_t *w = *state;
  start_default(w); /* no dashboard channel */
  set_mask(w, 1u << ARQ_TEL_AGENT_ACTIVITY);
  conn_t *bot = connect_q(w, "client_id=bot&client_type=ai-agent");
  drain(bot);
  json_t *t = tel_next(w, ARQ_TEL_AGENT_ACTIVITY);
  expect_str(t, "payload.activity", "connected");
  expect_str(t, "payload.client_id", "bot");
  /* BUG: bus.c arq_bus_agent_activity sets "room":"" and "channel":"" (an
   * invalid envelope) when dashboard_channel is disabled. */
  if (jget(t, "room") || jget(t, "channel"))
    print_error("agent_activity without a dashboard channel names room \"%s\" channel \"%s\"\n",
                jstr(t, "room") ? jstr(t, "room") : "(none)", jstr(t, "channel") ? jstr(t, "channel") : "(none)");
  assert_null(jget(t, "room"));
  assert_null(jget(t, "channel"));
  tel_none(w);
  arq_bus_stats_t s = stats(w);
  assert_int_equal(s.history_messages, 0);
  assert_int_equal(s.channels, 2);
}

/* After arq_bus_quiesce departures are not announced, to channels or to the
 * dashboard. */
static void test_quiesce(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts_integriguard();
  start(w, &o);
  conn_t *watch = connect_q(w, "client_id=watch&client_type=dashboard&channel=" DASH_CHANNEL);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  conn_t *bot = connect_q(w, "client_id=bot&client_type=ai-agent&channel=science:general");
  for (int i = 0; i < 4; i++)
    drain(&w->conns[i]);
  arq_bus_quiesce(w->bus);
  disconnect(bot);
  disconnect(a);
  none(b);
  none(watch);
  assert_int_equal(stats(w).clients, 2);
  say(b, "{'type':'command','command':'ping','id':'arq_q'}");
  expect_reply(b, "pong", "arq_q");
  none(b);
}

/* ================= counters and histograms ================= */

static void test_counters_exact(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  conn_t *c = connect_q(w, "client_id=carol");
  for (int i = 0; i < 3; i++)
    drain(&w->conns[i]);
  say(a, "{'type':'event','channel':'science:general'}");
  say(a, "{'type':'event','room':'science'}");
  say(a, "{'type':'private','to':['bob','carol','ghost']}");
  say(c, "{'type':'telemetry','eventType':'cpu','payload':{}}");
  say(c, "{'type':'command','command':'ping'}");
  say(c, "junk");
  say_raw(c, "\x01", 1, true);
  say(c, "{'type':'event','id':'arq_x'}"); /* no target, no initial channel */
  say(c, "{'type':'system','payload':{}}");
  say(c, "{'type':'error'}");
  arq_bus_stats_t s = stats(w);
  /* Valid envelopes by type (refused ones included: they were valid). */
  assert_int_equal(s.received[ARQ_MSG_EVENT], 2);
  assert_int_equal(s.received[ARQ_MSG_PRIVATE], 1);
  assert_int_equal(s.received[ARQ_MSG_TELEMETRY], 1);
  assert_int_equal(s.received[ARQ_MSG_COMMAND], 1);
  assert_int_equal(s.received[ARQ_MSG_SYSTEM], 1);
  assert_int_equal(s.received[ARQ_MSG_ERROR], 1);
  assert_int_equal(s.received_invalid, 3);
  assert_int_equal(s.delivered[ARQ_MSG_EVENT], 2);      /* bob twice */
  assert_int_equal(s.delivered[ARQ_MSG_PRIVATE], 2);    /* bob, carol */
  assert_int_equal(s.delivered[ARQ_MSG_TELEMETRY], 0);  /* no telemetry channel */
  assert_int_equal(s.delivered[ARQ_MSG_COMMAND], 0);
  assert_int_equal(s.delivered[ARQ_MSG_SYSTEM], 5);     /* 3 welcomes, bob joined, pong */
  assert_int_equal(s.delivered[ARQ_MSG_ERROR], 6);
  assert_int_equal(s.errors[ARQ_CODE_NOT_FOUND], 1);
  assert_int_equal(s.errors[ARQ_CODE_INVALID_JSON], 1);
  assert_int_equal(s.errors[ARQ_CODE_UNSUPPORTED_FRAME], 1);
  assert_int_equal(s.errors[ARQ_CODE_INVALID_ENVELOPE], 1);
  assert_int_equal(s.errors[ARQ_CODE_FORBIDDEN], 2);
  uint64_t errors = 0;
  for (int i = 0; i < ARQ_CODE_NCODES; i++)
    errors += s.errors[i];
  assert_int_equal(errors, 6);
  json_t *st = arq_bus_status(w->bus);
  assert_int_equal(jint(st, "messages.received"), 10); /* 7 valid, 3 invalid: every message counts */
  assert_int_equal(jint(st, "messages.delivered"), 15);
  json_decref(st);
  expect_error(a, "not_found", NULL); /* ghost */
  none(a);

  /* A frame the connection refuses (a slow consumer) is not delivered. */
  b->slow = true;
  say(a, "{'type':'event','channel':'science:general'}");
  assert_true(b->closed);
  s = stats(w);
  assert_int_equal(s.received[ARQ_MSG_EVENT], 3);
  assert_int_equal(s.delivered[ARQ_MSG_EVENT], 2);
  assert_int_equal(s.delivered[ARQ_MSG_SYSTEM], 6); /* alice hears bob left */
  expect_note(a, "client_left");
}

static void test_command_histograms(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.admins = admins;
  start(w, &o);
  static const char *const names[] = {"status",        "create_channel", "delete_channel", "join_channel",
                                      "leave_channel", "list_channels",  "channel_info",   "ping",
                                      "history",       "help",           "authenticate"};
  size_t n = sizeof names / sizeof names[0];
  for (size_t i = 0; i < n; i++)
    assert_string_equal(arq_bus_command_name(i), names[i]);
  assert_null(arq_bus_command_name(n));
  arq_bus_stats_t s = stats(w);
  for (size_t i = 0; i < n; i++)
    assert_int_equal(s.commands[i].count, 0);

  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *r = connect_q(w, "client_id=root");
  for (int i = 0; i < 3; i++)
    say(a, "{'type':'command','command':'ping'}");
  for (int i = 0; i < 2; i++)
    say(a, "{'type':'command','command':'status'}");
  say(a, "{'type':'command','command':'create_channel','channel':'science:lab'}"); /* forbidden: still run */
  say(r, "{'type':'command','command':'create_channel','channel':'x:y'}");
  say(a, "{'type':'command','command':'history','channel':'science:general','payload':{'limit':0}}"); /* bad */
  say(a, "{'type':'command','command':'fly'}");   /* not a command: not timed */
  say(a, "{'type':'command','command':'Ping'}");
  say(a, "junk");
  say(a, "{'type':'event','channel':'science:general'}");
  s = stats(w);
  for (size_t i = 0; i < n; i++) {
    uint64_t want = strcmp(names[i], "ping") == 0             ? 3
                    : strcmp(names[i], "status") == 0         ? 2
                    : strcmp(names[i], "create_channel") == 0 ? 2
                    : strcmp(names[i], "history") == 0        ? 1
                                                              : 0;
    if (s.commands[i].count != want)
      print_error("%s: %llu observations, want %llu\n", names[i], (unsigned long long)s.commands[i].count,
                  (unsigned long long)want);
    assert_int_equal(s.commands[i].count, want);
    assert_int_equal(hist_buckets(&s.commands[i]), want); /* each well under a second */
    if (want == 0)
      assert_int_equal(s.commands[i].sum_ns, 0);
  }
  assert_int_equal(s.commands[command_index("ping")].count, 3);
  assert_int_equal(s.routing.count, 1); /* the event only */
}

/* Receives 'json' from 'c' as if its first byte arrived at 'arrival_ns'. */
static void say_at(conn_t *c, const char *json, uint64_t arrival_ns) {
  char *t = J(json);
  arq_bus_receive_at(c->w->bus, c->client, t, strlen(t), false, arrival_ns);
  free(t);
}

/* The routing histogram times each routed message (event, private,
 * telemetry) once, from its arrival; nothing else. */
static void test_routing_histogram(void **state) {
  world_t *w = *state;
  start_default(w);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  drain(a);
  drain(b);
  /* An arrival in the future reads as 0 ns: the first bucket, exactly. */
  uint64_t later = arq_time_mono_ns() + 3600ull * 1000000000ull;
  say_at(a, "{'type':'event','channel':'science:general'}", later);
  say_at(a, "{'type':'event','room':'science'}", later);
  say_at(a, "{'type':'private','to':['bob']}", later);
  say_at(a, "{'type':'private','to':['ghost']}", later); /* routed, to nobody */
  say_at(a, "{'type':'telemetry','eventType':'cpu','payload':{}}", later);
  say_at(a, "{'type':'event','channel':'art:empty'}", later);
  /* Not routed. */
  say_at(a, "{'type':'command','command':'ping'}", later);
  say_at(a, "junk", later);
  say_at(a, "{'type':'system'}", later);
  say_at(a, "{'type':'event','channel':'bad name'}", later);
  arq_hist_t h = stats(w).routing;
  assert_int_equal(h.count, 6);
  assert_int_equal(h.buckets[0], 6);
  assert_int_equal(hist_buckets(&h), 6);
  assert_int_equal(h.sum_ns, 0);
  /* Two seconds ago: above the last bound, only in +Inf. */
  uint64_t now = arq_time_mono_ns();
  if (now > 2000000000ull) {
    say_at(a, "{'type':'event','channel':'science:general'}", now - 2000000000ull);
    h = stats(w).routing;
    assert_int_equal(h.count, 7);
    assert_int_equal(hist_buckets(&h), 6);
    assert_true(h.sum_ns >= 2000000000ull);
  }
  /* The plain entry point times from now. */
  uint64_t count = h.count;
  say(a, "{'type':'event','channel':'science:general'}");
  h = stats(w).routing;
  assert_int_equal(h.count, count + 1);
  assert_int_equal(hist_buckets(&h), 7);
}

/* ================= status pages ================= */

/* The client ids of a status page's items, comma-separated (caller frees). */
static char *page_ids(json_t *st) {
  char *out = calloc(1, 1024);
  json_t *items = jget(st, "clients.items");
  assert_true(json_is_array(items));
  for (size_t i = 0; i < json_array_size(items); i++) {
    if (i)
      strcat(out, ",");
    strcat(out, jstr(json_array_get(items, i), "client_id"));
  }
  return out;
}

static void expect_page(world_t *w, size_t offset, size_t limit, const char *want_ids, long long want_limit) {
  unsigned long before = w->describes;
  json_t *st = arq_bus_status_page(w->bus, offset, limit);
  assert_int_equal(w->describes, before + 1);
  char *ids = page_ids(st);
  if (strcmp(ids, want_ids) != 0)
    print_error("page %zu+%zu: %s, want %s\n", offset, limit, ids, want_ids);
  assert_string_equal(ids, want_ids);
  free(ids);
  assert_int_equal(jint(st, "clients.offset"), offset);
  assert_int_equal(jint(st, "clients.limit"), want_limit);
  /* Totals are of every client, whatever the page. */
  assert_int_equal(jint(st, "clients.total"), 6);
  assert_int_equal(jint(st, "clients.by_type.human"), 3);
  assert_int_equal(jint(st, "clients.by_type.ai-agent"), 1);
  assert_int_equal(jint(st, "clients.by_type.dashboard"), 1);
  assert_int_equal(jint(st, "clients.by_type.service"), 1);
  /* The shell's figures. */
  assert_int_equal(jint(st, "server.connections"), 7);
  expect_str(st, "server.shell", "fake");
  expect_str(st, "server.name", "arqonbus");
  json_decref(st);
}

static void test_status_page(void **state) {
  world_t *w = *state;
  w->with_describe = true;
  start_default(w);
  connect_q(w, "client_id=u0");
  conn_t *u1 = connect_q(w, "client_id=u1&client_type=ai-agent");
  conn_t *u2 = connect_q(w, "client_id=u2&client_type=dashboard");
  connect_q(w, "client_id=u3&client_type=service");
  connect_q(w, "client_id=u4");
  connect_q(w, "client_id=u5&channel=science:general");
  connect_q(w, "client_id=u6&client_type=ai-agent");
  disconnect(u1);

  expect_page(w, 0, 100, "u0,u2,u3,u4,u5,u6", 100);
  expect_page(w, 2, 3, "u3,u4,u5", 3);
  expect_page(w, 5, 10, "u6", 10);
  expect_page(w, 6, 10, "", 10);
  expect_page(w, 100, 1, "", 1);
  expect_page(w, 0, 0, "", 0);
  expect_page(w, 0, 5000, "u0,u2,u3,u4,u5,u6", ARQ_STATUS_MAX_LIMIT);

  json_t *st = arq_bus_status_page(w->bus, 4, 1);
  expect_str(st, "clients.items.0.client_id", "u5");
  expect_str(st, "clients.items.0.client_type", "human");
  expect_str(st, "clients.items.0.subscriptions.0", "science:general");
  json_decref(st);

  /* arq_bus_status is the first page of the default size. */
  json_t *s1 = arq_bus_status(w->bus), *s2 = arq_bus_status_page(w->bus, 0, ARQ_STATUS_DEFAULT_LIMIT);
  json_object_del(jget(s1, "server"), "uptime_seconds");
  json_object_del(jget(s2, "server"), "uptime_seconds");
  assert_true(json_equal(s1, s2));
  json_decref(s1);
  json_decref(s2);

  /* A replacing connection is a new connection: it comes last. */
  connect_q(w, "client_id=u0");
  expect_page(w, 0, 100, "u2,u3,u4,u5,u6,u0", 100);

  /* The status command pages the same way. */
  drain(u2);
  unsigned long before = w->describes;
  say(u2, "{'type':'command','command':'status','id':'arq_s1','payload':{'offset':1,'limit':2}}");
  json_t *m = expect_reply(u2, "status", "arq_s1");
  assert_int_equal(w->describes, before + 1);
  assert_int_equal(jint(m, "payload.clients.total"), 6);
  assert_int_equal(jint(m, "payload.clients.offset"), 1);
  assert_int_equal(jint(m, "payload.clients.limit"), 2);
  assert_int_equal(json_array_size(jget(m, "payload.clients.items")), 2);
  expect_str(m, "payload.clients.items.0.client_id", "u3");
  expect_str(m, "payload.clients.items.1.client_id", "u4");
  expect_str(m, "payload.server.shell", "fake");
  expect_str(m, "payload.you.client_id", "u2");
  static const char *const bad[] = {"{'offset':-1}", "{'limit':0}",   "{'limit':-2}",   "{'limit':'2'}",
                                    "{'offset':1.5}", "{'offset':null}", "{'limit':true}"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char json[128];
    snprintf(json, sizeof json, "{'type':'command','command':'status','id':'arq_s2','payload':%s}", bad[i]);
    say(u2, json);
    expect_error(u2, "invalid_argument", "arq_s2");
  }
  none(u2);
}

/* ================= history over HTTP ================= */

static void test_http_history(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.history_size = 5;
  o.history_default_limit = 3;
  o.history_max_limit = 4;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob");
  send_events(a, 7); /* the ring keeps 3..7 */
  drain(a);
  drain(b);
  http_answer_t ans = {0};

  /* The same answer as the history command. */
  static const struct {
    const char *room, *channel;
    long long limit;
    const char *since, *command;
  } same[] = {
      {"science", "general", 0, NULL, "{'channel':'science:general'}"},
      {NULL, "science:general", 2, NULL, "{'channel':'science:general','payload':{'limit':2}}"},
      {"science", "science:general", 100, NULL, "{'room':'science','channel':'general','payload':{'limit':100}}"},
      {"", "science:general", 1, NULL, "{'channel':'science:general','payload':{'limit':1}}"},
      {"science", "general", 0, "arq_h5", "{'channel':'science:general','payload':{'since':'arq_h5'}}"},
      {"science", "general", 2, "arq_h1", "{'channel':'science:general','payload':{'since':'arq_h1','limit':2}}"},
      {"science", "explore", 0, NULL, "{'channel':'science:explore'}"},
      {NULL, "nowhere:here", 0, NULL, "{'channel':'nowhere:here'}"},
  };
  for (size_t i = 0; i < sizeof same / sizeof same[0]; i++) {
    print_message("history %s %s %lld %s\n", same[i].room ? same[i].room : "(null)", same[i].channel, same[i].limit,
                  same[i].since ? same[i].since : "(null)");
    json_t *body = http_history(w, &ans, same[i].room, same[i].channel, same[i].limit, same[i].since);
    assert_int_equal(ans.status, 200);
    char json[256];
    snprintf(json, sizeof json, "{'type':'command','command':'history',%s", same[i].command + 1);
    json_t *m = command(b, json);
    expect_str(m, "command", "history");
    if (!json_equal(jget(m, "payload"), body)) {
      char *x = json_dumps(jget(m, "payload"), JSON_COMPACT), *y = json_dumps(body, JSON_COMPACT);
      print_error("command: %s\nhttp:    %s\n", x, y);
      free(x);
      free(y);
    }
    assert_true(json_equal(jget(m, "payload"), body));
  }
  /* And what it holds. */
  json_t *body = http_history(w, &ans, "science", "general", 0, NULL);
  json_t *wrap = json_pack("{s:O}", "payload", body);
  expect_history(wrap, 5, 3);
  json_decref(wrap);
  assert_int_equal(jint(body, "limit"), 3);
  assert_true(jbool(body, "more"));
  expect_str(body, "room", "science");
  expect_str(body, "channel", "general");
  body = http_history(w, &ans, NULL, "science:general", 100, NULL);
  assert_int_equal(jint(body, "limit"), 4);
  assert_int_equal(jint(body, "count"), 4);
  body = http_history(w, &ans, "science", "general", 0, "arq_h1");
  assert_true(jbool(body, "gap"));
  expect_str(body, "since", "arq_h1");

  /* Bad requests: 400 with an error and a message, and nothing else. */
  static const struct {
    const char *room, *channel;
    long long limit;
    const char *since;
  } bad[] = {
      {NULL, NULL, 0, NULL},
      {"science", NULL, 0, NULL},
      {NULL, "general", 0, NULL},
      {"", "general", 0, NULL},
      {"bad name", "general", 0, NULL},
      {"science", "bad name", 0, NULL},
      {"science", "", 0, NULL},
      {"_x", "general", 0, NULL},
      {NULL, "science:", 0, NULL},
      {NULL, ":general", 0, NULL},
      {NULL, "a:b:c", 0, NULL},
      {NULL, "science:bad name", 0, NULL},
      {"art", "science:general", 0, NULL},
      {"science", "general", -1, NULL},
      {NULL, "science:general", -5, NULL},
      {"science", "general", 0, "nope"},
      {"science", "general", 0, ""},
      {"science", "general", 0, "arq_"},
      {"science", "general", 0, "arq_a b"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    print_message("bad history %s %s %lld %s\n", bad[i].room ? bad[i].room : "(null)",
                  bad[i].channel ? bad[i].channel : "(null)", bad[i].limit, bad[i].since ? bad[i].since : "(null)");
    body = http_history(w, &ans, bad[i].room, bad[i].channel, bad[i].limit, bad[i].since);
    assert_int_equal(ans.status, 400);
    expect_str(body, "error", "invalid_argument");
    assert_true(strlen(jstr(body, "message")) > 0);
    assert_int_equal(json_object_size(body), 2);
  }
  json_decref(ans.body);
  none(a);
  none(b);
}

/* ================= a history backend that answers later ================= */

/* The history interface lets a backend answer after query() returns (a
 * networked one does). This one stores nothing and answers when the test
 * says so, with the status the test chooses. */
typedef struct deferred {
  arq_history_t base;
  arq_hist_cb cb; /* the pending query's callback, or NULL */
  void *ud;
  int queries;
} deferred_t;

static uint64_t deferred_append(arq_history_t *h, const char *room, const char *channel, const char *id,
                                arq_rcbuf_t *frame, size_t off, size_t len) {
  return 0;
}

static void deferred_query(arq_history_t *h, const arq_hist_query_t *q, arq_hist_cb cb, void *ud) {
  deferred_t *d = (deferred_t *)h;
  assert_null(d->cb); /* one at a time in these tests */
  d->cb = cb;
  d->ud = ud;
  d->queries++;
}

static void deferred_drop(arq_history_t *h, const char *room, const char *channel) {}
static size_t deferred_count(arq_history_t *h, const char *room, const char *channel) { return 0; }
static size_t deferred_total(arq_history_t *h) { return 0; }
static void deferred_free(arq_history_t *h) { free(h); }

static const arq_history_ops_t deferred_ops = {deferred_append, deferred_query, deferred_drop,
                                               deferred_count,  deferred_total, deferred_free, NULL};

/* Answers the pending query with 'status' and no messages. */
static void deferred_answer(deferred_t *d, int status) {
  assert_non_null(d->cb);
  arq_hist_cb cb = d->cb;
  d->cb = NULL;
  arq_hist_result_t r = {.status = status, .since_found = false};
  cb(d->ud, &r);
}

static deferred_t *start_deferred(world_t *w) {
  deferred_t *d = calloc(1, sizeof *d);
  assert_non_null(d);
  d->base.ops = &deferred_ops;
  arq_bus_opts_t o = opts();
  arq_bus_io_t io = {.send = fake_send, .close = fake_close, .telemetry = fake_telemetry, .ud = w};
  char err[256] = "";
  w->bus = arq_bus_new(&o, &io, &d->base, err, sizeof err);
  assert_non_null(w->bus);
  return d;
}

/* arq_bus_history copies what it needs and calls 'done' exactly once, when
 * the backend answers. */
static void test_http_history_answered_later(void **state) {
  world_t *w = *state;
  deferred_t *d = start_deferred(w);
  http_answer_t ans = {0};
  char since[] = "arq_h5", room[] = "science", channel[] = "general";
  arq_bus_history(w->bus, room, channel, 2, since, http_done, &ans);
  assert_int_equal(d->queries, 1);
  assert_int_equal(ans.calls, 0); /* not yet */
  strcpy(since, "arq_zz");      /* the caller's strings may go */
  strcpy(room, "xxxxxxx");
  strcpy(channel, "yyyyyyy");
  deferred_answer(d, 0);
  assert_int_equal(ans.calls, 1);
  assert_int_equal(ans.status, 200);
  expect_str(ans.body, "room", "science");
  expect_str(ans.body, "channel", "general");
  expect_str(ans.body, "since", "arq_h5");
  assert_true(jbool(ans.body, "gap"));
  assert_int_equal(jint(ans.body, "limit"), 2);
  assert_int_equal(jint(ans.body, "count"), 0);

  /* A failing backend: 503. */
  arq_bus_history(w->bus, NULL, "science:general", 0, NULL, http_done, &ans);
  deferred_answer(d, ARQ_EIO);
  assert_int_equal(ans.calls, 2);
  assert_int_equal(ans.status, 503);
  expect_str(ans.body, "error", "internal_error");
  assert_non_null(jstr(ans.body, "message"));

  /* Bad arguments are answered at once, without a query. */
  arq_bus_history(w->bus, NULL, "general", 0, NULL, http_done, &ans);
  assert_int_equal(ans.calls, 3);
  assert_int_equal(ans.status, 400);
  assert_int_equal(d->queries, 2);
  json_decref(ans.body);
}

/* Clobbers the stack below the caller's frame, as later work would. */
static __attribute__((noinline)) void clobber_stack(void) {
  volatile unsigned char junk[16384];
  memset((unsigned char *)junk, 0xa5, sizeof junk);
}

/* The history command answered by a backend that answers later: the reply
 * must still come, to the right request. Run in a child: reading state that
 * is gone may crash. */
static void test_history_command_answered_later(void **state) {
  world_t *w = *state;
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    /* A crash ends the child (cmocka's handlers would run the rest of the
     * suite in it). */
    static const int sigs[] = {SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
      signal(sigs[i], SIG_DFL);
    deferred_t *d = start_deferred(w);
    conn_t *a = connect_q(w, "client_id=alice");
    drain(a);
    say(a, "{'type':'command','command':'history','id':'arq_hq','channel':'science:general',"
           "'payload':{'limit':3}}");
    bool ok = d->queries == 1 && pending(a) == 0;
    clobber_stack();
    deferred_answer(d, 0);
    json_t *m = pending(a) == 1 ? json_loads(a->msgs[a->next], 0, NULL) : NULL;
    ok = ok && m && jstr(m, "type") && strcmp(jstr(m, "type"), "system") == 0 && jstr(m, "correlation_id") &&
         strcmp(jstr(m, "correlation_id"), "arq_hq") == 0 && jstr(m, "payload.room") &&
         strcmp(jstr(m, "payload.room"), "science") == 0;
    _exit(ok ? 0 : 3);
  }
  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    print_error("child %s %d\n", WIFEXITED(status) ? "exited" : "died of signal",
                WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
  /* BUG: commands.c cmd_history passes a stack history_call_t (and the
   * borrowed envelope) as the query's 'ud'; an answer after the receive
   * returned reads freed memory. */
  assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* ================= construction ================= */

static void test_bus_new_rejects_bad_names(void **state) {
  arq_bus_io_t io = {.send = fake_send, .close = fake_close, .ud = NULL};
  char err[256];
  static const char *const bad_boot[][2] = {{"science", NULL}, {"science:", NULL}, {"a:b:c", NULL},
                                            {"bad name:x", NULL}};
  for (size_t i = 0; i < sizeof bad_boot / sizeof bad_boot[0]; i++) {
    arq_bus_opts_t o;
    arq_bus_opts_defaults(&o);
    o.bootstrap = bad_boot[i];
    err[0] = '\0';
    assert_null(arq_bus_new(&o, &io, arq_history_mem_new(10), err, sizeof err)); /* the history is freed */
    assert_non_null(strstr(err, "bootstrap"));
  }
  static const char *const bad_admin[] = {"root", "not valid", NULL};
  arq_bus_opts_t o;
  arq_bus_opts_defaults(&o);
  o.bootstrap = bootstrap;
  o.admins = bad_admin;
  err[0] = '\0';
  assert_null(arq_bus_new(&o, &io, arq_history_mem_new(10), err, sizeof err));
  assert_non_null(strstr(err, "admin"));
  /* The options and their strings are copied. */
  char boot0[] = "lab:one";
  const char *boot[] = {boot0, NULL};
  char version[] = "v9";
  arq_bus_opts_defaults(&o);
  o.bootstrap = boot;
  o.server_version = version;
  char tel[] = "ops:tel", dash[] = "ops:dash";
  o.telemetry_channel = tel;
  o.dashboard_channel = dash;
  arq_bus_t *b = arq_bus_new(&o, &io, arq_history_mem_new(10), err, sizeof err);
  assert_non_null(b);
  strcpy(boot0, "xxx:yyy");
  strcpy(version, "zz");
  strcpy(tel, "zz:zz");
  strcpy(dash, "zz:yy");
  json_t *st = arq_bus_status(b);
  expect_str(st, "server.version", "v9");
  assert_int_equal(jint(st, "channels"), 3); /* lab:one, ops:tel, ops:dash */
  assert_int_equal(jint(st, "rooms"), 2);
  expect_str(st, "room_details.0.room", "lab");
  expect_str(st, "room_details.1.room", "ops");
  expect_str(st, "room_details.1.channels.0.channel", "dash");
  expect_str(st, "room_details.1.channels.1.channel", "tel");
  json_decref(st);
  arq_bus_free(b);

  /* The defaults add the two integriguard channels. */
  arq_bus_opts_defaults(&o);
  o.bootstrap = boot;
  b = arq_bus_new(&o, &io, arq_history_mem_new(10), err, sizeof err);
  assert_non_null(b);
  st = arq_bus_status(b);
  assert_int_equal(jint(st, "channels"), 3);
  assert_int_equal(jint(st, "rooms"), 2);
  json_decref(st);
  arq_bus_free(b);

  /* Bad telemetry or dashboard channels are refused like bootstrap ones. */
  static const char *const bad_special[] = {"integriguard", "integriguard:", ":x", "a:b:c", "bad name:x", "x:y z"};
  for (size_t i = 0; i < sizeof bad_special / sizeof bad_special[0]; i++) {
    for (int which = 0; which < 2; which++) {
      arq_bus_opts_defaults(&o);
      if (which == 0)
        o.telemetry_channel = bad_special[i];
      else
        o.dashboard_channel = bad_special[i];
      err[0] = '\0';
      print_message("%s channel \"%s\"\n", which ? "dashboard" : "telemetry", bad_special[i]);
      assert_null(arq_bus_new(&o, &io, arq_history_mem_new(10), err, sizeof err));
      assert_non_null(strstr(err, which ? "dashboard" : "telemetry"));
    }
  }
}

/* ================= upgrade parameters ================= */

static int params(const char *q, arq_client_params_t *p, char *err) {
  size_t n = strlen(q);
  char *copy = calloc(1, n ? n : 1); /* not NUL-terminated */
  memcpy(copy, q, n);
  int rc = arq_bus_parse_params(copy, n, p, err, 256);
  free(copy);
  return rc;
}

static void test_params_ok(void **state) {
  arq_client_params_t p;
  char err[256];
  assert_int_equal(params("", &p, err), 0);
  assert_string_equal(p.client_id, "");
  assert_int_equal(p.type, ARQ_CLIENT_HUMAN);
  assert_false(p.echo);
  assert_string_equal(p.room, "");

  assert_int_equal(params("client_id=alice%40example.com&client_type=ai-agent&screen_name=Al+B%C3%A9&"
                          "avatar=https%3A%2F%2Fx.test%2Fa.png&personality=curious&channel=science%3Aexplore&echo=1",
                          &p, err),
                   0);
  assert_string_equal(p.client_id, "alice@example.com");
  assert_int_equal(p.type, ARQ_CLIENT_AI_AGENT);
  assert_string_equal(p.screen_name, "Al B\xc3\xa9");
  assert_string_equal(p.avatar, "https://x.test/a.png");
  assert_string_equal(p.personality, "curious");
  assert_string_equal(p.room, "science");
  assert_string_equal(p.channel, "explore");
  assert_true(p.echo);

  assert_int_equal(params("room=science&channel=general", &p, err), 0);
  assert_string_equal(p.room, "science");
  assert_string_equal(p.channel, "general");
  assert_int_equal(params("channel=general&room=science", &p, err), 0);
  assert_string_equal(p.channel, "general");
  assert_int_equal(params("room=science&channel=science:general", &p, err), 0);
  assert_string_equal(p.channel, "general");

  static const char *const types[] = {"human", "ai-agent", "dashboard", "service"};
  for (int t = 0; t < 4; t++) {
    char q[64];
    snprintf(q, sizeof q, "client_type=%s", types[t]);
    assert_int_equal(params(q, &p, err), 0);
    assert_int_equal(p.type, t);
  }
  static const char *const yes[] = {"true", "1", "yes", "on"}, *const no[] = {"false", "0", "no", "off"};
  for (int i = 0; i < 4; i++) {
    char q[64];
    snprintf(q, sizeof q, "echo=%s", yes[i]);
    assert_int_equal(params(q, &p, err), 0);
    assert_true(p.echo);
    snprintf(q, sizeof q, "echo=%s", no[i]);
    assert_int_equal(params(q, &p, err), 0);
    assert_false(p.echo);
  }

  /* Other parameters are not ours, however they are encoded. */
  assert_int_equal(params("token=%zz&_=123&&=x&client_id=bob&x", &p, err), 0);
  assert_string_equal(p.client_id, "bob");
  /* The last of a repeated parameter wins. */
  assert_int_equal(params("client_id=a1&client_id=b2", &p, err), 0);
  assert_string_equal(p.client_id, "b2");
}

static void test_params_errors(void **state) {
  arq_client_params_t p;
  char err[256];
  static const struct {
    const char *q, *name;
  } bad[] = {
      {"client_id=", "client_id"},
      {"client_id", "client_id"},
      {"client_id=bad%20id", "client_id"},
      {"client_id=_x", "client_id"},
      {"client_id=%zz", "client_id"},
      {"client_id=a%00b", "client_id"},
      {"client_type=robot", "client_type"},
      {"client_type=Human", "client_type"},
      {"screen_name=", "screen_name"},
      {"screen_name=a%0Ab", "screen_name"},
      {"screen_name=a%7Fb", "screen_name"},
      {"screen_name=%FF", "screen_name"},
      {"avatar=%C3", "avatar"},
      {"personality=%1B[31m", "personality"},
      {"room=science", "room"},
      {"room=bad%20room&channel=x", "room"},
      {"channel=general", "channel"},
      {"channel=science:", "channel"},
      {"channel=science:a:b", "channel"},
      {"room=art&channel=science:general", "channel"},
      {"room=science&channel=bad%20name", "channel"},
      {"echo=maybe", "echo"},
      {"echo", "echo"},
      {"echo=", "echo"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    err[0] = '\0';
    print_message("params \"%s\"\n", bad[i].q);
    assert_int_equal(params(bad[i].q, &p, err), ARQ_EINVAL);
    assert_non_null(strstr(err, bad[i].name));
  }
}

static void test_params_lengths(void **state) {
  arq_client_params_t p;
  char err[256];
  char q[2048];
  char v[1100];
  /* screen_name 1-128, avatar and personality 1-512 bytes. */
  static const struct {
    const char *name;
    size_t max;
  } text[] = {{"screen_name", 128}, {"avatar", 512}, {"personality", 512}};
  for (int i = 0; i < 3; i++) {
    memset(v, 'x', text[i].max);
    v[text[i].max] = '\0';
    snprintf(q, sizeof q, "%s=%s", text[i].name, v);
    assert_int_equal(params(q, &p, err), 0);
    v[text[i].max] = 'x';
    v[text[i].max + 1] = '\0';
    snprintf(q, sizeof q, "%s=%s", text[i].name, v);
    assert_int_equal(params(q, &p, err), ARQ_EINVAL);
  }
  memset(v, 'c', 64);
  v[64] = '\0';
  snprintf(q, sizeof q, "client_id=%s", v);
  assert_int_equal(params(q, &p, err), 0);
  snprintf(q, sizeof q, "client_id=%sc", v);
  assert_int_equal(params(q, &p, err), ARQ_EINVAL);
  /* A value longer than the decoding buffer, in a parameter of ours. */
  memset(v, 'p', 1050);
  v[1050] = '\0';
  snprintf(q, sizeof q, "personality=%s", v);
  assert_int_equal(params(q, &p, err), ARQ_EINVAL);
  snprintf(q, sizeof q, "other=%s&client_id=ok", v);
  assert_int_equal(params(q, &p, err), 0);
}

/* channel=room:channel with both names at their 64-byte maximum is valid
 * (129 bytes). Run in a child: the overflow it triggers would take the whole
 * suite down. */
static void test_params_long_room_channel(void **state) {
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    char q[256], r[65], c[65];
    memset(r, 'r', 64);
    r[64] = '\0';
    memset(c, 'c', 64);
    c[64] = '\0';
    snprintf(q, sizeof q, "channel=%s:%s&client_id=alice", r, c);
    arq_client_params_t p;
    char err[256];
    int rc = params(q, &p, err);
    bool ok = rc == 0 && strcmp(p.room, r) == 0 && strcmp(p.channel, c) == 0 && strcmp(p.client_id, "alice") == 0;
    /* 65 to 128 bytes without a valid split must be refused cleanly too. */
    memset(q, 0, sizeof q);
    strcpy(q, "room=science&channel=");
    memset(q + strlen(q), 'x', 100);
    ok = ok && params(q, &p, err) == ARQ_EINVAL;
    _exit(ok ? 0 : 3);
  }
  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    print_error("child %s %d\n", WIFEXITED(status) ? "exited" : "died of signal",
                WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
  /* BUG: params.c copies up to 129 bytes into char channel[65] */
  assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* ---- limits ---- */

static void test_rate_limit_answers_then_closes(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.rate_messages = 3;
  o.rate_bytes = 1000;
  o.rate_close_after = 4;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob&channel=science:general");
  drain(a);
  drain(b);
  uint64_t t0 = arq_time_mono_ns() + 1000000000u; /* the buckets are full by then */
  for (int i = 0; i < 3; i++) {
    say_at(a, "{'type':'event','payload':{}}", t0);
    expect_event(b, "alice");
  }
  /* The fourth in the same instant: not routed, answered with when to retry. */
  say_at(a, "{'type':'command','command':'ping','id':'arq_late'}", t0);
  json_t *m = expect_error(a, "rate_limited", "arq_late");
  expect_str(m, "payload.limit", "rate_limit_messages");
  assert_int_equal(jint(m, "payload.max"), 3);
  assert_int_equal(jint(m, "payload.retry_after_ms"), 334);
  none(a);
  none(b);
  /* A third of a second later one more passes: the limit is a rate. */
  say_at(a, "{'type':'event','payload':{}}", t0 + 333333334);
  expect_event(b, "alice");
  /* The byte bucket: 1000 bytes a second, and a second's quiet fills it. */
  char big[900];
  memset(big, ' ', sizeof big);
  memcpy(big, "{\"type\":\"event\"}", 16);
  arq_bus_receive_at(w->bus, a->client, big, sizeof big, false, t0 + 2000000000u);
  expect_event(b, "alice");
  arq_bus_receive_at(w->bus, a->client, big, sizeof big, false, t0 + 2000000000u);
  m = expect_error(a, "rate_limited", NULL);
  expect_str(m, "payload.limit", "rate_limit_bytes");
  /* Binary frames count too, and are answered the same way (not as
   * malformed). Four refusals within a second close with 1008. */
  arq_bus_receive_at(w->bus, a->client, big, 200, true, t0 + 2000000000u);
  expect_error(a, "rate_limited", NULL);
  arq_bus_receive_at(w->bus, a->client, big, 150, false, t0 + 2000000000u);
  expect_error(a, "rate_limited", NULL);
  assert_false(a->closed);
  arq_bus_receive_at(w->bus, a->client, big, 150, false, t0 + 2000000000u);
  expect_error(a, "rate_limited", NULL);
  assert_true(a->closed);
  assert_int_equal(a->close_code, 1008);
  assert_string_equal(a->why, ARQ_BUS_RATE_CLOSE_REASON);
  expect_note(b, "client_left");
  none(b);
  arq_bus_stats_t st;
  arq_bus_stats(w->bus, &st);
  assert_int_equal(st.limit_denials[ARQ_LIMIT_RATE], 5);
  assert_int_equal(st.limit_denials[ARQ_LIMIT_RATE_CLOSE], 1);
  assert_int_equal(st.errors[ARQ_CODE_RATE_LIMITED], 5);
  assert_int_equal(st.received_invalid, 0);
}

static void test_rate_limit_refusals_spread_out_do_not_close(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.rate_messages = 1;
  o.rate_close_after = 2;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  drain(a);
  uint64_t t = arq_time_mono_ns() + 1000000000u;
  /* One refusal a second, for ten seconds: never two within a second. */
  for (int i = 0; i < 10; i++, t += 1000000001u) {
    say_at(a, "{'type':'command','command':'ping','id':'arq_p'}", t);
    expect_reply(a, "pong", "arq_p");
    say_at(a, "{'type':'command','command':'ping','id':'arq_q'}", t);
    expect_error(a, "rate_limited", "arq_q");
  }
  assert_false(a->closed);
}

/* Channels a client creates count against max_channels_per_client while
 * they exist and nobody else joined them; joining and leaving does not
 * free them, another member does. */
static void test_channels_per_client(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.max_channels_per_client = 2;
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice&channel=lab:one");
  conn_t *b = connect_q(w, "client_id=bob");
  drain(a);
  drain(b);
  say(a, "{'type':'command','command':'leave_channel','room':'lab','channel':'one','id':'arq_l1'}");
  expect_reply(a, "leave_channel", "arq_l1");
  say(a, "{'type':'event','room':'lab','channel':'two','id':'arq_e1'}");
  none(a); /* created by the publish: the second of its own */
  say(a, "{'type':'command','command':'join_channel','room':'lab','channel':'three','id':'arq_j1'}");
  json_t *m = expect_error(a, "limit_exceeded", "arq_j1");
  expect_str(m, "payload.limit", "max_channels_per_client");
  assert_int_equal(jint(m, "payload.max"), 2);
  /* Existing channels still open; bob joining lab:one makes it shared. */
  say(a, "{'type':'command','command':'join_channel','room':'science','channel':'general','id':'arq_j2'}");
  expect_reply(a, "join_channel", "arq_j2");
  say(b, "{'type':'command','command':'join_channel','room':'lab','channel':'one','id':'arq_j3'}");
  expect_reply(b, "join_channel", "arq_j3");
  say(a, "{'type':'command','command':'join_channel','room':'lab','channel':'three','id':'arq_j4'}");
  expect_reply(a, "join_channel", "arq_j4");
  /* A client that leaves the bus frees its count with it (nothing dangles). */
  arq_bus_disconnect(w->bus, a->client);
  a->client = NULL;
  say(b, "{'type':'command','command':'join_channel','room':'lab','channel':'three','id':'arq_j5'}");
  expect_reply(b, "join_channel", "arq_j5");
}

static void test_roles_and_rooms(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.protected_rooms = "ops=user";
  start(w, &o);
  conn_t *g = connect_as(w, "client_id=gus", ARQ_ROLE_GUEST, NULL);
  conn_t *u = connect_as(w, "client_id=ursula", ARQ_ROLE_USER, NULL);
  conn_t *s = connect_as(w, "client_id=sam", ARQ_ROLE_USER, "lab");
  drain(g);
  drain(u);
  drain(s);
  /* Guests: no new channels, no publishing, no protected rooms. */
  say(g, "{'type':'command','command':'join_channel','room':'lab','channel':'new','id':'arq_g1'}");
  expect_error(g, "forbidden", "arq_g1");
  say(g, "{'type':'command','command':'join_channel','room':'science','channel':'general','id':'arq_g2'}");
  expect_reply(g, "join_channel", "arq_g2");
  say(g, "{'type':'event','room':'science','channel':'general','id':'arq_g3'}");
  expect_error(g, "forbidden", "arq_g3");
  say(g, "{'type':'command','command':'delete_channel','room':'science','channel':'general','id':'arq_g4'}");
  expect_error(g, "forbidden", "arq_g4");
  /* A protected room: users listed; a client limited to lab is not. */
  say(u, "{'type':'command','command':'join_channel','room':'ops','channel':'a','id':'arq_u1'}");
  expect_reply(u, "join_channel", "arq_u1");
  say(s, "{'type':'command','command':'join_channel','room':'ops','channel':'a','id':'arq_s1'}");
  expect_error(s, "forbidden", "arq_s1");
  say(s, "{'type':'command','command':'history','room':'science','channel':'general','id':'arq_s2'}");
  expect_error(s, "forbidden", "arq_s2");
  say(s, "{'type':'command','command':'join_channel','room':'lab','channel':'x','id':'arq_s3'}");
  expect_reply(s, "join_channel", "arq_s3");
  arq_bus_stats_t st = stats(w);
  assert_int_equal(st.forbidden[ARQ_DENY_ROOM], 3);
  assert_int_equal(st.forbidden[ARQ_DENY_PUBLISH], 1);
  assert_int_equal(st.forbidden[ARQ_DENY_COMMAND], 1);
}

static void test_limit_exceeded(void **state) {
  world_t *w = *state;
  arq_bus_opts_t o = opts();
  o.max_subscriptions = 2;
  o.max_channels = 4; /* the two bootstrap channels and two more */
  o.max_rooms = 2;    /* science and one more */
  start(w, &o);
  conn_t *a = connect_q(w, "client_id=alice&channel=science:general");
  conn_t *b = connect_q(w, "client_id=bob");
  drain(a);
  drain(b);
  say(a, "{'type':'command','command':'join_channel','room':'lab','channel':'one','id':'arq_j1'}");
  expect_reply(a, "join_channel", "arq_j1");
  say(a, "{'type':'command','command':'join_channel','room':'lab','channel':'two','id':'arq_j2'}");
  json_t *m = expect_error(a, "limit_exceeded", "arq_j2");
  expect_str(m, "payload.limit", "max_subscriptions");
  assert_int_equal(jint(m, "payload.max"), 2);
  expect_str(m, "command", "join_channel");
  /* Joining again what it has is no new subscription. */
  say(a, "{'type':'command','command':'join_channel','room':'lab','channel':'one','id':'arq_j3'}");
  expect_reply(a, "join_channel", "arq_j3");
  /* Rooms: lab exists, a third room does not fit. */
  say(b, "{'type':'command','command':'create_channel','room':'other','channel':'x','id':'arq_c1'}");
  m = expect_error(b, "limit_exceeded", "arq_c1");
  expect_str(m, "payload.limit", "max_rooms");
  expect_str(m, "payload.room", "other");
  /* Channels: one more fits (4), then none; an event that would create one
   * is refused too, and the initial channel of a new client. */
  say(b, "{'type':'command','command':'create_channel','room':'lab','channel':'two','id':'arq_c2'}");
  expect_reply(b, "create_channel", "arq_c2");
  say(b, "{'type':'command','command':'join_channel','room':'lab','channel':'three','id':'arq_c3'}");
  m = expect_error(b, "limit_exceeded", "arq_c3");
  expect_str(m, "payload.limit", "max_channels");
  assert_int_equal(jint(m, "payload.max"), 4);
  say(b, "{'type':'event','room':'lab','channel':'four','id':'arq_e1'}");
  expect_error(b, "limit_exceeded", "arq_e1");
  conn_t *c = connect_q(w, "client_id=carol&channel=lab:five");
  m = next(c);
  expect_str(m, "payload.event", "welcome");
  assert_int_equal(json_array_size(jget(m, "payload.subscriptions")), 0);
  m = expect_error(c, "limit_exceeded", NULL);
  expect_str(m, "payload.channel", "five");
  /* Without the initial channel, an event without a room has nowhere to go. */
  say(c, "{'type':'event'}");
  expect_error(c, "invalid_envelope", NULL);
  /* Existing channels still work for everyone. */
  drain(a);
  say(b, "{'type':'event','room':'science','channel':'general','id':'arq_e2'}");
  expect_event(a, "bob");
  arq_bus_stats_t st;
  arq_bus_stats(w->bus, &st);
  assert_int_equal(st.limit_denials[ARQ_LIMIT_SUBSCRIPTIONS], 1);
  assert_int_equal(st.limit_denials[ARQ_LIMIT_ROOMS], 1);
  assert_int_equal(st.limit_denials[ARQ_LIMIT_CHANNELS], 3);
  assert_int_equal(st.channels, 4);
}

int main(void) {
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
  const struct CMUnitTest tests[] = {
      T(test_welcome_first),
      T(test_generated_ids_unique),
      T(test_disconnect_tells_each_channel),
      T(test_join_and_leave),
      T(test_presence_fields_consistent),
      T(test_join_argument_errors),
      T(test_event_reaches_members_only),
      T(test_echo),
      T(test_room_wide_event_once),
      T(test_version_1_1_fields_forwarded),
      T(test_private),
      T(test_private_without_id_has_no_correlation),
      T(test_ping_pong),
      T(test_status),
      T(test_create_channel),
      T(test_channel_created_told_once),
      T(test_admins_restrict_privileged),
      T(test_delete_channel),
      T(test_list_channels),
      T(test_channel_info),
      T(test_help),
      T(test_unknown_command),
      T(test_forbidden_types),
      T(test_history),
      T(test_history_capped_by_size),
      T(test_malformed_streak_closes),
      T(test_malformed_never_closes_with_zero),
      T(test_duplicate_client_id_replaces),
      T(test_replaced_client_presence),
      T(test_slow_consumer_in_send),
      T(test_slow_sender_and_reply),
      T(test_disconnect_during_notification),
      T(test_channel_ttl_zero),
      T(test_tick_sweeps_after_ttl),
      T(test_ttl_before_first_tick),
      T(test_stats),
      T(test_error_payload_survives_utf8_names),
      T(test_integriguard_channels),
      T(test_tel_names_and_envelope),
      T(test_telemetry_bus_events),
      T(test_telemetry_mask_selects),
      T(test_telemetry_mask_zero_builds_nothing),
      T(test_client_telemetry),
      T(test_client_telemetry_channel_options),
      T(test_client_telemetry_without_channel),
      T(test_agent_activity),
      T(test_agent_activity_without_dashboard),
      T(test_quiesce),
      T(test_counters_exact),
      T(test_command_histograms),
      T(test_routing_histogram),
      T(test_status_page),
      T(test_http_history),
      T(test_http_history_answered_later),
      T(test_history_command_answered_later),
      T(test_rate_limit_answers_then_closes),
      T(test_rate_limit_refusals_spread_out_do_not_close),
      T(test_limit_exceeded),
      T(test_channels_per_client),
      T(test_roles_and_rooms),
      cmocka_unit_test(test_bus_new_rejects_bad_names),
      cmocka_unit_test(test_params_ok),
      cmocka_unit_test(test_params_errors),
      cmocka_unit_test(test_params_lengths),
      cmocka_unit_test(test_params_long_room_channel),
  };
#undef T
  return cmocka_run_group_tests(tests, NULL, NULL);
}
