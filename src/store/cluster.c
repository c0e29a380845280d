/* Redis mode (see cluster.h).
 *
 * Per shard: 'cmd', the connection for XADD, history reads and lookups, and
 * 'rd', the connection that sits in XREAD BLOCK over the streams this node
 * reads. A blocking read cannot be changed while it waits, so a new stream
 * to read makes the node send CLIENT UNBLOCK for 'rd' on 'cmd'; the read
 * returns and is sent again with the new set. A stream joins the set only
 * once its current last id is known (XREVRANGE + - COUNT 1 on 'cmd', sent
 * after every XADD this node sent before), and the read continues from the
 * last id delivered, also across reconnects: nothing stored after a channel
 * got its first member here is skipped, nothing is delivered twice.
 *
 * A stream entry has the fields id (the message id), node (the node that
 * published it), from (the sender's client id), skip ("1": the sender's echo
 * is off, its node does not deliver it to the sender), type ("event" or
 * "telemetry"), envelope (the JSON text without "position"), and wb ("1"
 * when it was written back after an outage: its node delivered it already).
 */
#include "store/cluster.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uthash.h>

#include "bus/envelope.h"
#include "bus/history.h"
#include "obs/log.h"
#include "util/alloc.h"
#include "util/err.h"
#include "util/list.h"
#include "util/time.h"

#define READ_COUNT 1000         /* entries per stream per XREAD */
#define MIN_STREAM_LEN 1000     /* streams keep at least this many entries (see maxlen()) */
#define KEY_MAX (2 * ARQ_NAME_MAX + 32)

typedef struct shard shard_t;

/* A stream this node reads because its channel has members here. */
typedef struct sub {
  char key[KEY_MAX];
  char room[ARQ_NAME_MAX + 1], channel[ARQ_NAME_MAX + 1];
  char cursor[48];   /* the last id delivered; "" until known */
  bool wanted;       /* the channel has members here */
  bool looking;      /* the XREVRANGE for the cursor is in flight */
  bool is_bus;       /* arqon:bus, the stream of casts between nodes (shard 0) */
  uint64_t trimmed_at; /* last age trim, monotonic ms */
  shard_t *shard;
  UT_hash_handle hh;
} sub_t;

/* A message on its way to Redis, or held during an outage. */
typedef struct item {
  arq_list_t node;   /* in shard->held while held */
  arq_cluster_t *cl;
  shard_t *shard;
  arq_bus_pub_t *p;
  bool held;         /* delivered here already, waits for the write-back */
  bool inflight;
} item_t;

struct shard {
  arq_cluster_t *cl;
  unsigned index;
  arq_redis_t *cmd, *rd;
  long long rd_id;   /* CLIENT ID of 'rd'; -1 while unknown */
  bool reading;      /* an XREAD is in flight on 'rd' */
  bool cmd_up;
  sub_t *subs;
  arq_list_t held;
  size_t nheld;
  unsigned reads_sent; /* XREADs sent with the current set */
};

struct arq_cluster {
  arq_history_t base; /* the history ops */
  uv_loop_t *loop;
  arq_bus_t *bus;
  arq_cluster_opts_t o;
  char *urls, *node_id;
  shard_t *shards;
  size_t nshards;
  arq_history_t *cache; /* what this node delivered, for history during an outage */
  uint64_t block_ms;
  size_t held_bytes, nheld;
  bool closing;
  uint64_t snap_version;  /* of the last snapshot stored */
  uint64_t snap_at;       /* when it was stored, monotonic ms (0: never) */
  bool peers_reading;
  bool leaving;           /* shutting down: presence withdrawn */
  uint64_t started_ms;    /* wall clock at start: part of the snapshot's version */
  json_t *peer_cache;     /* node -> {"v": version, "snap": snapshot} of the other live nodes */
  arq_cluster_stats_t st;
};

static shard_t *shard_of(arq_cluster_t *cl, const char *room, const char *channel) {
  uint32_t h = 2166136261u; /* FNV-1a over "room:channel" */
  for (const char *p = room; *p; p++)
    h = (h ^ (uint8_t)*p) * 16777619u;
  h = (h ^ ':') * 16777619u;
  for (const char *p = channel; *p; p++)
    h = (h ^ (uint8_t)*p) * 16777619u;
  return &cl->shards[h % cl->nshards];
}

static void stream_key(char *key, const char *room, const char *channel) {
  snprintf(key, KEY_MAX, "arqon:room:%s:channel:%s", room, channel);
}

static bool reply_ok(const redisReply *r) { return r && r->type != REDIS_REPLY_ERROR; }

static const char *type_name(arq_msg_type_t t) { return t == ARQ_MSG_TELEMETRY ? "telemetry" : "event"; }

/* ---- reading the streams ------------------------------------------------- */

static void read_streams(shard_t *sh);

/* Frames and delivers one stream entry here. */
static void deliver_entry(arq_cluster_t *cl, const sub_t *s, const char *pos, const redisReply *fields) {
  const char *id = "", *node = "", *from = "", *env = NULL;
  size_t envlen = 0;
  bool skip = false, wb = false, telemetry = false;
  for (size_t i = 0; fields && i + 1 < fields->elements; i += 2) {
    const redisReply *k = fields->element[i], *v = fields->element[i + 1];
    if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
      continue;
    if (strcmp(k->str, "envelope") == 0) {
      env = v->str;
      envlen = v->len;
    } else if (strcmp(k->str, "id") == 0) {
      id = v->str;
    } else if (strcmp(k->str, "node") == 0) {
      node = v->str;
    } else if (strcmp(k->str, "from") == 0) {
      from = v->str;
    } else if (strcmp(k->str, "skip") == 0) {
      skip = v->str[0] == '1';
    } else if (strcmp(k->str, "wb") == 0) {
      wb = v->str[0] == '1';
    } else if (strcmp(k->str, "type") == 0) {
      telemetry = strcmp(v->str, "telemetry") == 0;
    }
  }
  if (!env || envlen < 2)
    return;
  cl->st.read++;
  bool mine = strcmp(node, cl->node_id) == 0;
  size_t off, len;
  arq_rcbuf_t *f = arq_env_frame_text(env, envlen, pos, &off, &len);
  /* A written-back message of this node was delivered (and cached) here
   * during the outage. */
  if (!(mine && wb)) {
    arq_history_mem_put(cl->cache, s->room, s->channel, id, f, off, len, arq_hist_pos_value(pos));
    arq_bus_deliver(cl->bus, s->room, s->channel, f, telemetry ? ARQ_MSG_TELEMETRY : ARQ_MSG_EVENT,
                    mine && skip ? from : NULL);
  }
  arq_rcbuf_unref(f);
}

/* Hands a cast another node stored in arqon:bus to the bus. */
static void receive_cast(arq_cluster_t *cl, const redisReply *fields) {
  arq_bus_cast_t m = {.room = "", .channel = "", .client_id = "", .to = ""};
  const char *node = "";
  int kind = -1;
  for (size_t i = 0; fields && i + 1 < fields->elements; i += 2) {
    const redisReply *k = fields->element[i], *v = fields->element[i + 1];
    if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
      continue;
    if (strcmp(k->str, "node") == 0)
      node = v->str;
    else if (strcmp(k->str, "kind") == 0)
      kind = arq_cast_parse(v->str);
    else if (strcmp(k->str, "room") == 0)
      m.room = v->str;
    else if (strcmp(k->str, "channel") == 0)
      m.channel = v->str;
    else if (strcmp(k->str, "cid") == 0)
      m.client_id = v->str;
    else if (strcmp(k->str, "to") == 0)
      m.to = v->str;
    else if (strcmp(k->str, "at") == 0)
      m.at = strtoull(v->str, NULL, 10);
    else if (strcmp(k->str, "env") == 0 && v->len >= 2) {
      m.json = v->str;
      m.len = v->len;
    }
  }
  if (kind < 0 || strcmp(node, cl->node_id) == 0)
    return; /* this node's own: handled when it was sent */
  m.kind = (arq_cast_kind_t)kind;
  arq_bus_receive_cast(cl->bus, &m);
}

/* A full batch: this node may have fallen so far behind that entries were
 * trimmed before it read them. It has when the oldest entry kept is newer
 * than the last one it delivered. */
typedef struct lag_check {
  arq_cluster_t *cl;
  char key[KEY_MAX];
  uint64_t cursor;
} lag_check_t;

static void on_lag_check(redisAsyncContext *ac, void *reply, void *privdata) {
  lag_check_t *lc = privdata;
  redisReply *r = reply;
  if (!lc->cl->closing && r && r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
      r->element[0]->type == REDIS_REPLY_ARRAY && r->element[0]->elements > 0 &&
      r->element[0]->element[0]->type == REDIS_REPLY_STRING &&
      arq_hist_pos_value(r->element[0]->element[0]->str) > lc->cursor) {
    lc->cl->st.read_gaps++;
    arq_log(ARQ_LOG_WARN, "cluster", "fell behind a stream: messages were trimmed before this node delivered them",
            ARQ_LS("stream", lc->key), ARQ_LS("oldest_kept", r->element[0]->element[0]->str));
  }
  arq_free(lc);
}

static void check_lag(shard_t *sh, const sub_t *s, const char *cursor) {
  lag_check_t *lc = arq_calloc(1, sizeof *lc);
  lc->cl = sh->cl;
  snprintf(lc->key, sizeof lc->key, "%s", s->key);
  lc->cursor = arq_hist_pos_value(cursor);
  if (arq_redis_command(sh->cmd, on_lag_check, lc, "XRANGE %s - + COUNT 1", s->key) != 0)
    arq_free(lc);
}

static void on_read(redisAsyncContext *ac, void *reply, void *privdata) {
  shard_t *sh = privdata;
  arq_cluster_t *cl = sh->cl;
  redisReply *r = reply;
  sh->reading = false;
  if (cl->closing)
    return;
  if (!r) /* the connection went; reading starts again when it is back */
    return;
  if (r->type == REDIS_REPLY_ERROR) {
    arq_log(ARQ_LOG_WARN, "cluster", "XREAD failed", ARQ_LS("error", r->str));
  } else if (r->type == REDIS_REPLY_ARRAY) {
    for (size_t i = 0; i < r->elements; i++) {
      const redisReply *st = r->element[i];
      if (st->type != REDIS_REPLY_ARRAY || st->elements != 2 || st->element[0]->type != REDIS_REPLY_STRING)
        continue;
      sub_t *s = NULL;
      HASH_FIND_STR(sh->subs, st->element[0]->str, s);
      if (!s)
        continue;
      const redisReply *entries = st->element[1];
      if (entries->elements >= READ_COUNT && !s->is_bus)
        check_lag(sh, s, s->cursor);
      for (size_t j = 0; j < entries->elements; j++) {
        const redisReply *e = entries->element[j];
        if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[0]->type != REDIS_REPLY_STRING)
          continue;
        snprintf(s->cursor, sizeof s->cursor, "%s", e->element[0]->str);
        if (s->is_bus)
          receive_cast(cl, e->element[1]->type == REDIS_REPLY_ARRAY ? e->element[1] : NULL);
        else if (s->wanted)
          deliver_entry(cl, s, e->element[0]->str, e->element[1]->type == REDIS_REPLY_ARRAY ? e->element[1] : NULL);
      }
    }
  }
  read_streams(sh);
}

/* Sends the XREAD over every stream with a known cursor (and forgets the
 * streams no longer wanted). */
static void read_streams(shard_t *sh) {
  arq_cluster_t *cl = sh->cl;
  if (sh->reading || cl->closing || !arq_redis_up(sh->rd) || sh->rd_id < 0)
    return;
  size_t n = 0;
  sub_t *s, *tmp;
  HASH_ITER(hh, sh->subs, s, tmp) {
    if (!s->wanted && !s->looking && !s->is_bus) {
      HASH_DEL(sh->subs, s);
      arq_free(s);
    } else if (s->cursor[0]) {
      n++;
    }
  }
  if (n == 0)
    return;
  size_t argc = 6 + 2 * n;
  const char **argv = arq_calloc(argc, sizeof *argv);
  size_t *lens = arq_calloc(argc, sizeof *lens);
  char block[24];
  snprintf(block, sizeof block, "%llu", (unsigned long long)cl->block_ms);
  char count[24];
  snprintf(count, sizeof count, "%d", READ_COUNT);
  const char *head[6] = {"XREAD", "COUNT", count, "BLOCK", block, "STREAMS"};
  for (size_t i = 0; i < 6; i++)
    argv[i] = head[i];
  size_t k = 0;
  HASH_ITER(hh, sh->subs, s, tmp) {
    if (!s->cursor[0])
      continue;
    argv[6 + k] = s->key;
    argv[6 + n + k] = s->cursor;
    k++;
  }
  for (size_t i = 0; i < argc; i++)
    lens[i] = strlen(argv[i]);
  if (arq_redis_argv(sh->rd, on_read, sh, (int)argc, argv, lens) == 0)
    sh->reading = true;
  arq_free(argv);
  arq_free(lens);
}

/* The set changed: end the waiting XREAD so that it is sent again. */
static void kick_reader(shard_t *sh) {
  if (!sh->reading) {
    read_streams(sh);
    return;
  }
  if (sh->rd_id >= 0)
    arq_redis_command(sh->cmd, NULL, NULL, "CLIENT UNBLOCK %lld", sh->rd_id);
}

static void on_cursor(redisAsyncContext *ac, void *reply, void *privdata) {
  sub_t *s = privdata;
  redisReply *r = reply;
  s->looking = false;
  if (s->shard->cl->closing)
    return;
  if (!reply_ok(r) || r->type != REDIS_REPLY_ARRAY)
    return; /* looked up again when the connection is back */
  if (r->elements > 0 && r->element[0]->type == REDIS_REPLY_ARRAY && r->element[0]->elements > 0 &&
      r->element[0]->element[0]->type == REDIS_REPLY_STRING)
    snprintf(s->cursor, sizeof s->cursor, "%s", r->element[0]->element[0]->str);
  else
    snprintf(s->cursor, sizeof s->cursor, "0-0");
  kick_reader(s->shard);
}

static void look_up_cursor(sub_t *s) {
  if (s->looking || s->cursor[0] || !s->wanted)
    return;
  if (arq_redis_command(s->shard->cmd, on_cursor, s, "XREVRANGE %s + - COUNT 1", s->key) == 0)
    s->looking = true;
}

void arq_cluster_interest(arq_cluster_t *cl, const char *room, const char *channel, bool on) {
  shard_t *sh = shard_of(cl, room, channel);
  char key[KEY_MAX];
  stream_key(key, room, channel);
  sub_t *s = NULL;
  HASH_FIND_STR(sh->subs, key, s);
  if (!on) {
    if (s)
      s->wanted = false; /* dropped from the set at the next read */
    return;
  }
  if (!s) {
    s = arq_calloc(1, sizeof *s);
    snprintf(s->key, sizeof s->key, "%s", key);
    snprintf(s->room, sizeof s->room, "%s", room);
    snprintf(s->channel, sizeof s->channel, "%s", channel);
    s->shard = sh;
    HASH_ADD_STR(sh->subs, key, s);
  }
  if (!s->wanted) {
    /* Members again after none: what was stored meanwhile is not for them. */
    s->wanted = true;
    s->cursor[0] = '\0';
  }
  look_up_cursor(s);
}

/* ---- appending ------------------------------------------------------------ */

static void send_item(item_t *it);

static void end_item(item_t *it, int status, const char *position) {
  arq_bus_pub_done(it->cl->bus, it->p, status, position);
  arq_free(it);
}

static void unhold(item_t *it) {
  if (!it->held)
    return;
  arq_list_remove(&it->node);
  it->held = false;
  it->shard->nheld--;
  it->cl->nheld--;
  it->cl->held_bytes -= it->p->len;
}

/* Redis cannot take 'it' now: refuse it (strict mode, or no room), or
 * deliver it here at once and hold it for the write-back. */
static void hold(item_t *it) {
  arq_cluster_t *cl = it->cl;
  arq_bus_pub_t *p = it->p;
  if (cl->o.strict || cl->nheld >= cl->o.buffer_messages || cl->held_bytes + p->len > cl->o.buffer_bytes) {
    cl->st.refused++;
    end_item(it, ARQ_EIO, NULL);
    return;
  }
  size_t off, len;
  arq_rcbuf_t *f = arq_env_frame_text(p->json, p->len, NULL, &off, &len);
  arq_history_mem_put(cl->cache, p->room, p->channel, p->id, f, off, len, 0);
  arq_bus_deliver(cl->bus, p->room, p->channel, f, p->type, p->skip_sender ? p->from : NULL);
  arq_rcbuf_unref(f);
  it->held = true;
  arq_list_push_back(&it->shard->held, &it->node);
  it->shard->nheld++;
  cl->nheld++;
  cl->held_bytes += p->len;
  cl->st.held++;
  /* Redis answering again while older held messages are written back: this
   * one follows them at once. */
  if (it->shard->cmd_up)
    send_item(it);
}

/* The cache holds what this node delivered (from its reads) and what it
 * published to channels it does not read, so that history during an outage
 * has both. */
static void cache_published(item_t *it, const char *pos) {
  arq_bus_pub_t *p = it->p;
  char key[KEY_MAX];
  stream_key(key, p->room, p->channel);
  sub_t *s = NULL;
  HASH_FIND_STR(it->shard->subs, key, s);
  if (s && s->wanted)
    return; /* cached when read back */
  size_t off, len;
  arq_rcbuf_t *f = arq_env_frame_text(p->json, p->len, pos, &off, &len);
  arq_history_mem_put(it->cl->cache, p->room, p->channel, p->id, f, off, len, arq_hist_pos_value(pos));
  arq_rcbuf_unref(f);
}

static void on_xadd(redisAsyncContext *ac, void *reply, void *privdata) {
  item_t *it = privdata;
  arq_cluster_t *cl = it->cl;
  redisReply *r = reply;
  it->inflight = false;
  if (cl->closing) {
    unhold(it);
    end_item(it, ARQ_ECLOSED, NULL);
    return;
  }
  if (r && r->type == REDIS_REPLY_STRING) {
    cl->st.written++;
    if (it->held) {
      cl->st.written_back++;
      unhold(it);
    } else {
      cache_published(it, r->str);
    }
    end_item(it, 0, r->str);
    return;
  }
  cl->st.failed++;
  if (r) {
    /* Redis refuses it (out of memory, say): retrying would not help and
     * would hold back the messages behind it. */
    arq_log(ARQ_LOG_WARN, "cluster", "XADD refused", ARQ_LS("error", r->type == REDIS_REPLY_ERROR ? r->str : "?"),
            ARQ_LS("room", it->p->room), ARQ_LS("channel", it->p->channel));
    unhold(it);
    cl->st.refused++;
    end_item(it, ARQ_EPROTO, NULL);
    return;
  }
  if (it->held)
    return; /* the connection went: written back at the next reconnect, still in order */
  if (cl->o.strict) {
    cl->st.refused++;
    end_item(it, ARQ_ECLOSED, NULL);
    return;
  }
  hold(it);
}

static void send_item(item_t *it) {
  arq_cluster_t *cl = it->cl;
  arq_bus_pub_t *p = it->p;
  char key[KEY_MAX], maxlen[24];
  stream_key(key, p->room, p->channel);
  snprintf(maxlen, sizeof maxlen, "%zu", cl->o.history_size > MIN_STREAM_LEN ? cl->o.history_size : MIN_STREAM_LEN);
  const char *argv[20] = {"XADD", key, "MAXLEN", "~", maxlen, "*", "id", p->id, "node", cl->node_id,
                          "from", p->from, "skip", p->skip_sender ? "1" : "0", "type", type_name(p->type),
                          "envelope", p->json, "wb", "1"};
  size_t lens[20];
  int argc = it->held ? 20 : 18;
  for (int i = 0; i < argc; i++)
    lens[i] = i == 17 ? p->len : strlen(argv[i]);
  if (arq_redis_argv(it->shard->cmd, on_xadd, it, argc, argv, lens) != 0)
    return;
  it->inflight = true;
  uint64_t wall = arq_time_wall_ms();
  if (cl->o.max_age_ms && wall > cl->o.max_age_ms) /* by age too; cheap when there is nothing to trim */
    arq_redis_command(it->shard->cmd, NULL, NULL, "XTRIM %s MINID ~ %llu", key,
                      (unsigned long long)(wall - cl->o.max_age_ms));
}

void arq_cluster_append(arq_cluster_t *cl, arq_bus_pub_t *p) {
  item_t *it = arq_calloc(1, sizeof *it);
  it->cl = cl;
  it->p = p;
  it->shard = shard_of(cl, p->room, p->channel);
  if (cl->closing) {
    end_item(it, ARQ_ECLOSED, NULL);
    return;
  }
  /* Behind held messages of the same shard, never before them. */
  if (it->shard->nheld == 0)
    send_item(it);
  if (!it->inflight)
    hold(it);
}

/* Redis is back: the held messages go first, in order. */
static void write_back(shard_t *sh) {
  arq_list_t *n, *tmp;
  size_t sent = 0;
  arq_list_foreach_safe(n, tmp, &sh->held) {
    item_t *it = ARQ_CONTAINER_OF(n, item_t, node);
    if (it->inflight)
      continue;
    send_item(it);
    if (!it->inflight)
      break;
    sent++;
  }
  if (sent)
    arq_log(ARQ_LOG_INFO, "cluster", "writing back messages held during the outage", ARQ_LI("messages", sent),
            ARQ_LI("shard", sh->index));
}

/* Age trimming: at most once a second per stream read here. */
static void trim_by_age(shard_t *sh, uint64_t now) {
  arq_cluster_t *cl = sh->cl;
  if (!cl->o.max_age_ms || !arq_redis_up(sh->cmd))
    return;
  uint64_t wall = arq_time_wall_ms();
  if (wall <= cl->o.max_age_ms)
    return;
  sub_t *s, *tmp;
  HASH_ITER(hh, sh->subs, s, tmp) {
    if (s->is_bus || now < s->trimmed_at + 1000)
      continue;
    s->trimmed_at = now;
    arq_redis_command(sh->cmd, NULL, NULL, "XTRIM %s MINID ~ %llu", s->key,
                      (unsigned long long)(wall - cl->o.max_age_ms));
  }
}

/* ---- between nodes ------------------------------------------------------------ */

#define BUS_STREAM "arqon:bus"
#define BUS_MAXLEN "10000"
#define NODES_SET "arqon:nodes"

void arq_cluster_cast(arq_cluster_t *cl, const arq_bus_cast_t *m) {
  if (cl->closing)
    return;
  char at[24];
  snprintf(at, sizeof at, "%llu", (unsigned long long)m->at);
  const char *argv[22] = {"XADD",    BUS_STREAM, "MAXLEN", "~",  BUS_MAXLEN,  "*",           "node",
                          cl->node_id, "kind",   arq_cast_name(m->kind), "room", m->room ? m->room : "",
                          "channel", m->channel ? m->channel : "", "cid", m->client_id ? m->client_id : "",
                          "to",      m->to ? m->to : "", "at", at, "env", m->json ? m->json : ""};
  size_t lens[22];
  for (int i = 0; i < 21; i++)
    lens[i] = strlen(argv[i]);
  lens[21] = m->json ? m->len : 0; /* not NUL-terminated */
  /* While shard 0 is unreachable, the other nodes cannot be told: lost. */
  if (arq_redis_argv(cl->shards[0].cmd, NULL, NULL, 22, argv, lens) != 0)
    cl->st.casts_lost++;
  else
    cl->st.casts++;
}

static void node_key(char *key, size_t cap, const char *node) { snprintf(key, cap, "arqon:node:%s", node); }
static void version_key(char *key, size_t cap, const char *node) { snprintf(key, cap, "arqon:nodev:%s", node); }

/* Reading the other nodes: SMEMBERS arqon:nodes, then MGET of their
 * versions (short strings), then MGET of the snapshots that changed only,
 * so that a quiet bus costs no parsing. */
typedef struct peer_read {
  arq_cluster_t *cl;
  size_t n;
  char **names;
  char **versions; /* of the snapshots asked for */
} peer_read_t;

static void free_peer_read(peer_read_t *pr) {
  for (size_t i = 0; i < pr->n; i++) {
    arq_free(pr->names[i]);
    if (pr->versions)
      arq_free(pr->versions[i]);
  }
  arq_free(pr->names);
  arq_free(pr->versions);
  arq_free(pr);
}

/* Hands the bus every live peer's snapshot. */
static void publish_peers(arq_cluster_t *cl) {
  json_t *peers = json_array();
  const char *name;
  json_t *entry;
  json_object_foreach(cl->peer_cache, name, entry) json_array_append(peers, json_object_get(entry, "snap"));
  arq_bus_set_peers(cl->bus, peers);
}

/* MGET of 'n' keys made by 'mk' from 'names'. */
static int mget(arq_cluster_t *cl, void (*mk)(char *, size_t, const char *), char **names, size_t n,
                redisCallbackFn *fn, void *pd) {
  const char **argv = arq_calloc(n + 1, sizeof *argv);
  size_t *lens = arq_calloc(n + 1, sizeof *lens);
  char (*keys)[KEY_MAX] = arq_calloc(n, sizeof *keys);
  argv[0] = "MGET";
  lens[0] = 4;
  for (size_t i = 0; i < n; i++) {
    mk(keys[i], KEY_MAX, names[i]);
    argv[i + 1] = keys[i];
    lens[i + 1] = strlen(keys[i]);
  }
  int rc = arq_redis_argv(cl->shards[0].cmd, fn, pd, (int)n + 1, argv, lens);
  arq_free(argv);
  arq_free(lens);
  arq_free(keys);
  return rc;
}

static void on_snapshots(redisAsyncContext *ac, void *reply, void *privdata) {
  peer_read_t *pr = privdata;
  arq_cluster_t *cl = pr->cl;
  redisReply *r = reply;
  if (!cl->closing) {
    cl->peers_reading = false;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == pr->n) {
      for (size_t i = 0; i < r->elements; i++) {
        const redisReply *e = r->element[i];
        json_t *snap = e->type == REDIS_REPLY_STRING ? json_loadb(e->str, e->len, 0, NULL) : NULL;
        if (json_is_object(snap))
          json_object_set_new(cl->peer_cache, pr->names[i], json_pack("{s:s, s:o}", "v", pr->versions[i], "snap", snap));
        else
          json_object_del(cl->peer_cache, pr->names[i]);
      }
      publish_peers(cl);
    }
  }
  free_peer_read(pr);
}

static void on_versions(redisAsyncContext *ac, void *reply, void *privdata) {
  peer_read_t *pr = privdata;
  arq_cluster_t *cl = pr->cl;
  redisReply *r = reply;
  if (cl->closing || !r || r->type != REDIS_REPLY_ARRAY || r->elements != pr->n) {
    if (!cl->closing)
      cl->peers_reading = false;
    free_peer_read(pr);
    return;
  }
  bool changed = false;
  peer_read_t *want = arq_calloc(1, sizeof *want);
  want->cl = cl;
  want->names = arq_calloc(pr->n, sizeof *want->names);
  want->versions = arq_calloc(pr->n, sizeof *want->versions);
  /* Nodes that left the set meanwhile are gone too. */
  const char *name;
  json_t *entry;
  void *tmp;
  json_object_foreach_safe(cl->peer_cache, tmp, name, entry) {
    bool listed = false;
    for (size_t i = 0; i < pr->n && !listed; i++)
      listed = strcmp(pr->names[i], name) == 0;
    if (!listed) {
      json_object_del(cl->peer_cache, name);
      changed = true;
    }
  }
  for (size_t i = 0; i < pr->n; i++) {
    const redisReply *e = r->element[i];
    if (strcmp(pr->names[i], cl->node_id) == 0)
      continue;
    if (e->type != REDIS_REPLY_STRING) {
      /* Its presence expired: the node is gone (one that comes back adds
       * itself again). */
      arq_redis_command(cl->shards[0].cmd, NULL, NULL, "SREM %s %s", NODES_SET, pr->names[i]);
      if (json_object_get(cl->peer_cache, pr->names[i])) {
        json_object_del(cl->peer_cache, pr->names[i]);
        changed = true;
      }
      continue;
    }
    const char *known = json_string_value(json_object_get(json_object_get(cl->peer_cache, pr->names[i]), "v"));
    if (known && strcmp(known, e->str) == 0)
      continue;
    want->names[want->n] = arq_strdup(pr->names[i]);
    want->versions[want->n] = arq_strdup(e->str);
    want->n++;
  }
  free_peer_read(pr);
  if (want->n > 0 && mget(cl, node_key, want->names, want->n, on_snapshots, want) == 0)
    return; /* on_snapshots publishes */
  cl->peers_reading = false;
  free_peer_read(want);
  if (changed)
    publish_peers(cl);
}

static void on_members(redisAsyncContext *ac, void *reply, void *privdata) {
  arq_cluster_t *cl = privdata;
  redisReply *r = reply;
  if (cl->closing)
    return;
  if (!r || r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
    cl->peers_reading = false;
    return;
  }
  peer_read_t *pr = arq_calloc(1, sizeof *pr);
  pr->cl = cl;
  pr->n = r->elements;
  pr->names = arq_calloc(pr->n, sizeof *pr->names);
  for (size_t i = 0; i < pr->n; i++)
    pr->names[i] = arq_strdup(r->element[i]->type == REDIS_REPLY_STRING ? r->element[i]->str : "");
  if (mget(cl, version_key, pr->names, pr->n, on_versions, pr) != 0) {
    cl->peers_reading = false;
    free_peer_read(pr);
  }
}

/* Every second: store this node's snapshot when it changed (else only keep
 * it alive), and read the other nodes'. */
static void presence(arq_cluster_t *cl, uint64_t now) {
  shard_t *sh = &cl->shards[0];
  if (!cl->bus || cl->leaving || !arq_redis_up(sh->cmd))
    return;
  char key[KEY_MAX], vkey[KEY_MAX], ttl[24];
  node_key(key, sizeof key, cl->node_id);
  version_key(vkey, sizeof vkey, cl->node_id);
  snprintf(ttl, sizeof ttl, "%llu", (unsigned long long)cl->o.node_ttl_ms);
  uint64_t v = arq_bus_snapshot_version(cl->bus);
  if (cl->snap_at == 0 || v != cl->snap_version) {
    json_t *snap = arq_bus_snapshot(cl->bus);
    char *text = json_dumps(snap, JSON_COMPACT);
    json_decref(snap);
    char version[64]; /* unique across this node's restarts too */
    snprintf(version, sizeof version, "%llu-%llu", (unsigned long long)cl->started_ms, (unsigned long long)v);
    if (arq_redis_command(sh->cmd, NULL, NULL, "SET %s %s PX %s", key, text, ttl) == 0 &&
        arq_redis_command(sh->cmd, NULL, NULL, "SET %s %s PX %s", vkey, version, ttl) == 0) {
      cl->snap_version = v;
      cl->snap_at = now;
    }
    free(text);
  } else {
    arq_redis_command(sh->cmd, NULL, NULL, "PEXPIRE %s %s", key, ttl);
    arq_redis_command(sh->cmd, NULL, NULL, "PEXPIRE %s %s", vkey, ttl);
  }
  arq_redis_command(sh->cmd, NULL, NULL, "SADD %s %s", NODES_SET, cl->node_id);
  if (!cl->peers_reading && arq_redis_command(sh->cmd, on_members, cl, "SMEMBERS %s", NODES_SET) == 0)
    cl->peers_reading = true;
}

/* ---- connections ----------------------------------------------------------- */

static void on_client_id(redisAsyncContext *ac, void *reply, void *privdata) {
  shard_t *sh = privdata;
  redisReply *r = reply;
  if (sh->cl->closing || !r || r->type != REDIS_REPLY_INTEGER)
    return;
  sh->rd_id = r->integer;
  read_streams(sh);
}

static void on_rd_state(void *ud, bool up) {
  shard_t *sh = ud;
  sh->rd_id = -1;
  sh->reading = false;
  if (up)
    arq_redis_command(sh->rd, on_client_id, sh, "CLIENT ID");
}

static void on_cmd_state(void *ud, bool up) {
  shard_t *sh = ud;
  sh->cmd_up = up;
  if (!up)
    return;
  write_back(sh);
  sub_t *s, *tmp;
  HASH_ITER(hh, sh->subs, s, tmp) look_up_cursor(s);
}

/* ---- history from the streams ---------------------------------------------- */

typedef struct query {
  arq_cluster_t *cl;
  arq_hist_cb cb;
  void *ud;
  char room[ARQ_NAME_MAX + 1], channel[ARQ_NAME_MAX + 1];
  char since[ARQ_ENV_MAX_ID + 1]; /* "" for none */
  bool by_id;
  size_t limit;
  int waiting;       /* replies still to come */
  bool failed;
  bool exists;       /* the entry at 'since' is still stored */
  uint64_t first;    /* the oldest stored position (0: empty stream) */
  arq_hist_item_t *items;
  size_t count;
  bool reversed;
} query_t;

static void add_items(query_t *q, const redisReply *r) {
  q->items = arq_realloc(q->items, (q->count + r->elements + 1) * sizeof *q->items);
  for (size_t i = 0; i < r->elements; i++) {
    const redisReply *e = r->element[i];
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[0]->type != REDIS_REPLY_STRING ||
        e->element[1]->type != REDIS_REPLY_ARRAY)
      continue;
    const char *id = "", *env = NULL;
    size_t envlen = 0;
    const redisReply *f = e->element[1];
    for (size_t k = 0; k + 1 < f->elements; k += 2) {
      if (f->element[k]->type != REDIS_REPLY_STRING || f->element[k + 1]->type != REDIS_REPLY_STRING)
        continue;
      if (strcmp(f->element[k]->str, "envelope") == 0) {
        env = f->element[k + 1]->str;
        envlen = f->element[k + 1]->len;
      } else if (strcmp(f->element[k]->str, "id") == 0) {
        id = f->element[k + 1]->str;
      }
    }
    if (!env || envlen < 2)
      continue;
    arq_hist_item_t *it = &q->items[q->count++];
    size_t off, len;
    it->frame = arq_env_frame_text(env, envlen, e->element[0]->str, &off, &len);
    it->off = (uint32_t)off;
    it->len = (uint32_t)len;
    it->seq = arq_hist_pos_value(e->element[0]->str);
    it->id = arq_strdup(id);
  }
}

static void finish_query(query_t *q) {
  arq_hist_result_t res = {.status = q->failed ? ARQ_EIO : 0, .since_found = true};
  size_t first = 0, n = q->count;
  if (q->reversed) { /* newest first from XREVRANGE */
    for (size_t i = 0; i < q->count / 2; i++) {
      arq_hist_item_t t = q->items[i];
      q->items[i] = q->items[q->count - 1 - i];
      q->items[q->count - 1 - i] = t;
    }
  }
  if (!q->since[0]) {
    if (n > q->limit) {
      first = n - q->limit;
      n = q->limit;
      res.more = true;
    }
  } else if (q->by_id) {
    res.since_found = false;
    for (size_t i = q->count; i-- > 0;) {
      if (strcmp(q->items[i].id, q->since) == 0) {
        res.since_found = true;
        first = i + 1;
        break;
      }
    }
    n = q->count - first;
    if (n > q->limit) {
      n = q->limit;
      res.more = true;
    }
  } else {
    uint64_t pos = arq_hist_pos_value(q->since);
    /* Missing messages: the entry at 'since' was trimmed away (older than
     * the oldest stored one, or the stream is empty now). Position 0 asks
     * for everything stored. */
    res.since_found = pos == 0 || q->exists || (q->first != 0 && pos > q->first);
    if (n > q->limit) {
      n = q->limit;
      res.more = true;
    }
  }
  const arq_hist_item_t **view = arq_calloc(n ? n : 1, sizeof *view);
  for (size_t i = 0; i < n; i++)
    view[i] = &q->items[first + i];
  res.items = view;
  res.count = n;
  if (q->cl->closing)
    res.status = ARQ_ECLOSED;
  q->cb(q->ud, &res);
  arq_free(view);
  for (size_t i = 0; i < q->count; i++) {
    arq_rcbuf_unref(q->items[i].frame);
    arq_free(q->items[i].id);
  }
  arq_free(q->items);
  arq_free(q);
}

static void on_range(redisAsyncContext *ac, void *reply, void *privdata) {
  query_t *q = privdata;
  redisReply *r = reply;
  if (!reply_ok(r) || r->type != REDIS_REPLY_ARRAY)
    q->failed = true;
  else
    add_items(q, r);
  if (--q->waiting == 0)
    finish_query(q);
}

static void on_exists(redisAsyncContext *ac, void *reply, void *privdata) {
  query_t *q = privdata;
  redisReply *r = reply;
  if (!reply_ok(r) || r->type != REDIS_REPLY_ARRAY)
    q->failed = true;
  else
    q->exists = r->elements > 0;
  if (--q->waiting == 0)
    finish_query(q);
}

static void on_first(redisAsyncContext *ac, void *reply, void *privdata) {
  query_t *q = privdata;
  redisReply *r = reply;
  if (!reply_ok(r) || r->type != REDIS_REPLY_ARRAY)
    q->failed = true;
  else if (r->elements > 0 && r->element[0]->type == REDIS_REPLY_ARRAY && r->element[0]->elements > 0 &&
           r->element[0]->element[0]->type == REDIS_REPLY_STRING)
    q->first = arq_hist_pos_value(r->element[0]->element[0]->str);
  if (--q->waiting == 0)
    finish_query(q);
}

static void cl_query(arq_history_t *h, const arq_hist_query_t *hq, arq_hist_cb cb, void *ud) {
  arq_cluster_t *cl = (arq_cluster_t *)h;
  shard_t *sh = shard_of(cl, hq->room, hq->channel);
  if (cl->closing || !arq_redis_up(sh->cmd)) {
    /* Redis is unreachable: what this node delivered lately. */
    cl->cache->ops->query(cl->cache, hq, cb, ud);
    return;
  }
  query_t *q = arq_calloc(1, sizeof *q);
  q->cl = cl;
  q->cb = cb;
  q->ud = ud;
  q->limit = hq->limit;
  snprintf(q->room, sizeof q->room, "%s", hq->room);
  snprintf(q->channel, sizeof q->channel, "%s", hq->channel);
  snprintf(q->since, sizeof q->since, "%s", hq->since ? hq->since : "");
  char key[KEY_MAX];
  stream_key(key, hq->room, hq->channel);
  char count[24];
  int rc;
  q->waiting = 1;
  if (!q->since[0]) {
    q->reversed = true;
    snprintf(count, sizeof count, "%zu", q->limit + 1);
    rc = arq_redis_command(sh->cmd, on_range, q, "XREVRANGE %s + - COUNT %s", key, count);
  } else if (strncmp(q->since, "arq_", 4) == 0) {
    /* By message id: look for it among everything stored. */
    q->by_id = true;
    q->reversed = true;
    snprintf(count, sizeof count, "%zu", cl->o.history_size + 1000);
    rc = arq_redis_command(sh->cmd, on_range, q, "XREVRANGE %s + - COUNT %s", key, count);
  } else {
    char excl[ARQ_ENV_MAX_ID + 2];
    snprintf(excl, sizeof excl, "(%s", q->since);
    snprintf(count, sizeof count, "%zu", q->limit + 1);
    q->waiting = 3;
    rc = arq_redis_command(sh->cmd, on_exists, q, "XRANGE %s %s %s COUNT 1", key, q->since, q->since);
    if (rc == 0)
      arq_redis_command(sh->cmd, on_first, q, "XRANGE %s - + COUNT 1", key);
    if (rc == 0)
      arq_redis_command(sh->cmd, on_range, q, "XRANGE %s %s + COUNT %s", key,
                        strcmp(q->since, "0") == 0 || strcmp(q->since, "0-0") == 0 ? "-" : excl, count);
  }
  if (rc != 0) {
    arq_free(q);
    cl->cache->ops->query(cl->cache, hq, cb, ud);
  }
}

static uint64_t cl_append(arq_history_t *h, const char *room, const char *channel, const char *id,
                          arq_rcbuf_t *frame, size_t off, size_t len) {
  return 0; /* the bus hands channel messages to arq_cluster_append */
}

static void cl_drop(arq_history_t *h, const char *room, const char *channel) {
  /* The stream stays: it is the durable copy. */
  arq_cluster_t *cl = (arq_cluster_t *)h;
  cl->cache->ops->drop(cl->cache, room, channel);
}

static size_t cl_count(arq_history_t *h, const char *room, const char *channel) {
  arq_cluster_t *cl = (arq_cluster_t *)h;
  return cl->cache->ops->count(cl->cache, room, channel);
}

static size_t cl_total(arq_history_t *h) {
  arq_cluster_t *cl = (arq_cluster_t *)h;
  return cl->cache->ops->total(cl->cache);
}

static void cl_free_history(arq_history_t *h) {
  arq_cluster_t *cl = (arq_cluster_t *)h;
  cl->cache->ops->free(cl->cache);
  cl->cache = NULL;
}

static const arq_history_ops_t cluster_ops = {
    .append = cl_append,
    .query = cl_query,
    .drop = cl_drop,
    .count = cl_count,
    .total = cl_total,
    .free = cl_free_history,
    .next_position = NULL,
};

/* ---- life -------------------------------------------------------------------- */

arq_cluster_t *arq_cluster_new(uv_loop_t *loop, const arq_cluster_opts_t *o) {
  arq_cluster_t *cl = arq_calloc(1, sizeof *cl);
  cl->base.ops = &cluster_ops;
  cl->loop = loop;
  cl->o = *o;
  cl->urls = arq_strdup(o->urls);
  cl->node_id = arq_strdup(o->node_id);
  cl->o.urls = cl->urls;
  cl->o.node_id = cl->node_id;
  cl->cache = arq_history_mem_new(o->history_size);
  cl->peer_cache = json_object();
  cl->started_ms = arq_time_wall_ms();
  /* A blocked XREAD holds its connection's watchdog PING back, so it must
   * return well within the timeout. */
  cl->block_ms = o->timeout_ms / 4 ? o->timeout_ms / 4 : 1;
  if (cl->block_ms > 1000)
    cl->block_ms = 1000;
  size_t n = 1;
  for (const char *p = o->urls; *p; p++)
    n += *p == ',';
  cl->shards = arq_calloc(n, sizeof *cl->shards);
  cl->nshards = n;
  const char *p = o->urls;
  for (size_t i = 0; i < n; i++) {
    size_t len = strcspn(p, ",");
    char *url = arq_strndup(p, len);
    p += len + (p[len] == ',');
    shard_t *sh = &cl->shards[i];
    sh->cl = cl;
    sh->index = (unsigned)i;
    sh->rd_id = -1;
    arq_list_init(&sh->held);
    sh->cmd = arq_redis_new(loop, url, o->timeout_ms, on_cmd_state, sh);
    sh->rd = arq_redis_new(loop, url, o->timeout_ms, on_rd_state, sh);
    arq_free(url);
  }
  sub_t *bus = arq_calloc(1, sizeof *bus);
  snprintf(bus->key, sizeof bus->key, "%s", BUS_STREAM);
  bus->is_bus = bus->wanted = true;
  bus->shard = &cl->shards[0];
  HASH_ADD_STR(cl->shards[0].subs, key, bus);
  return cl;
}

arq_history_t *arq_cluster_history(arq_cluster_t *cl) { return &cl->base; }

void arq_cluster_attach(arq_cluster_t *cl, arq_bus_t *bus) { cl->bus = bus; }

void arq_cluster_tick(arq_cluster_t *cl, uint64_t now_ms) {
  presence(cl, now_ms);
  for (size_t i = 0; i < cl->nshards; i++)
    trim_by_age(&cl->shards[i], now_ms);
}

bool arq_cluster_up(const arq_cluster_t *cl) {
  if (cl->closing)
    return false;
  for (size_t i = 0; i < cl->nshards; i++)
    if (!arq_redis_up(cl->shards[i].cmd) || !arq_redis_up(cl->shards[i].rd))
      return false;
  return true;
}

const char *arq_cluster_error(const arq_cluster_t *cl) {
  if (cl->closing)
    return "closing";
  for (size_t i = 0; i < cl->nshards; i++) {
    if (!arq_redis_up(cl->shards[i].cmd))
      return arq_redis_error(cl->shards[i].cmd);
    if (!arq_redis_up(cl->shards[i].rd))
      return arq_redis_error(cl->shards[i].rd);
  }
  return "";
}

const char *arq_cluster_node_id(const arq_cluster_t *cl) { return cl->node_id; }

size_t arq_cluster_shards(const arq_cluster_t *cl) { return cl->nshards; }

static void add_redis_stats(arq_redis_stats_t *a, const arq_redis_stats_t *b) {
  a->connects += b->connects;
  a->disconnects += b->disconnects;
  a->errors += b->errors;
  a->timeouts += b->timeouts;
}

void arq_cluster_stats(const arq_cluster_t *cl, arq_cluster_stats_t *s) {
  *s = cl->st;
  s->held_now = cl->nheld;
  s->held_bytes = cl->held_bytes;
  if (cl->closing)
    return; /* the connections are gone; their last figures were kept */
  memset(&s->redis, 0, sizeof s->redis);
  for (size_t i = 0; i < cl->nshards; i++) {
    add_redis_stats(&s->redis, arq_redis_stats(cl->shards[i].cmd));
    add_redis_stats(&s->redis, arq_redis_stats(cl->shards[i].rd));
  }
}

void arq_cluster_leave(arq_cluster_t *cl) {
  if (cl->leaving || cl->closing)
    return;
  cl->leaving = true;
  char key[KEY_MAX];
  node_key(key, sizeof key, cl->node_id);
  char vkey[KEY_MAX];
  version_key(vkey, sizeof vkey, cl->node_id);
  arq_redis_command(cl->shards[0].cmd, NULL, NULL, "DEL %s %s", key, vkey);
  arq_redis_command(cl->shards[0].cmd, NULL, NULL, "SREM %s %s", NODES_SET, cl->node_id);
}

void arq_cluster_close(arq_cluster_t *cl) {
  if (cl->closing)
    return;
  arq_cluster_stats_t last;
  arq_cluster_stats(cl, &last);
  cl->st.redis = last.redis;
  cl->closing = true;
  for (size_t i = 0; i < cl->nshards; i++) {
    shard_t *sh = &cl->shards[i];
    /* Pending callbacks run now with NULL replies and end their items. */
    arq_redis_close(sh->cmd);
    arq_redis_close(sh->rd);
    arq_list_t *n;
    while ((n = arq_list_head(&sh->held)) != NULL) {
      item_t *it = ARQ_CONTAINER_OF(n, item_t, node);
      unhold(it);
      end_item(it, ARQ_ECLOSED, NULL);
    }
  }
}

void arq_cluster_free(arq_cluster_t *cl) {
  if (!cl)
    return;
  for (size_t i = 0; i < cl->nshards; i++) {
    sub_t *s, *tmp;
    HASH_ITER(hh, cl->shards[i].subs, s, tmp) {
      HASH_DEL(cl->shards[i].subs, s);
      arq_free(s);
    }
  }
  if (cl->cache)
    cl->cache->ops->free(cl->cache);
  json_decref(cl->peer_cache);
  arq_free(cl->shards);
  arq_free(cl->urls);
  arq_free(cl->node_id);
  arq_free(cl);
}
