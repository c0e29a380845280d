/* Unit tests for bus/history_mem: the in-memory ring behind the history
 * interface.
 *
 * Every stored message is a reference to a frame, so the tests hold their
 * own frames (arq_rcbuf_t, one reference each) and check the reference
 * counts: +1 while a ring slot holds the frame, back to 1 once the slot is
 * overwritten, the channel dropped or the backend freed. Queries go through
 * a callback that copies what it sees and counts its calls.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bus/history.h"
#include "util/rcbuf.h"

#define NFRAMES 16

/* A frame whose "JSON" is its own id, after a 2-byte fake header. */
typedef struct msg {
  arq_rcbuf_t *frame;
  char id[32];
} msg_t;

typedef struct fixture {
  arq_history_t *h;
  msg_t m[NFRAMES];
} fixture_t;

static void make_msgs(fixture_t *f) {
  for (int i = 0; i < NFRAMES; i++) {
    snprintf(f->m[i].id, sizeof f->m[i].id, "arq_m%d", i + 1);
    size_t n = strlen(f->m[i].id);
    f->m[i].frame = arq_rcbuf_new(2 + n);
    f->m[i].frame->data[0] = 0x81;
    f->m[i].frame->data[1] = (uint8_t)n;
    memcpy(f->m[i].frame->data + 2, f->m[i].id, n);
  }
}

static void free_msgs(fixture_t *f) {
  for (int i = 0; i < NFRAMES; i++) {
    assert_int_equal(f->m[i].frame->refs, 1); /* the ring let go of everything */
    arq_rcbuf_unref(f->m[i].frame);
  }
}

static uint64_t put(fixture_t *f, const char *room, const char *channel, int i) {
  msg_t *m = &f->m[i];
  return f->h->ops->append(f->h, room, channel, m->id, m->frame, 2, strlen(m->id));
}

/* ---- query results, copied out of the callback ---- */

typedef struct seen {
  int calls;
  int status;
  size_t count;
  bool since_found, more;
  uint64_t seq[NFRAMES];
  char id[NFRAMES][32];
  char text[NFRAMES][32];
} seen_t;

static void on_result(void *ud, const arq_hist_result_t *r) {
  seen_t *s = ud;
  s->calls++;
  s->status = r->status;
  s->count = r->count;
  s->since_found = r->since_found;
  s->more = r->more;
  assert_true(r->count <= NFRAMES);
  for (size_t i = 0; i < r->count; i++) {
    const arq_hist_item_t *it = r->items[i];
    assert_non_null(it->frame);
    assert_true(it->off + it->len <= it->frame->len);
    s->seq[i] = it->seq;
    snprintf(s->id[i], sizeof s->id[i], "%s", it->id);
    snprintf(s->text[i], sizeof s->text[i], "%.*s", (int)it->len, (const char *)it->frame->data + it->off);
  }
}

static seen_t query(fixture_t *f, const char *room, const char *channel, size_t limit, const char *since) {
  seen_t s;
  memset(&s, 0, sizeof s);
  arq_hist_query_t q = {.room = room, .channel = channel, .limit = limit, .since = since};
  f->h->ops->query(f->h, &q, on_result, &s);
  assert_int_equal(s.calls, 1); /* exactly once, before query() returns */
  return s;
}

/* Asserts that 's' returned the messages with seq 'first'..'first'+'n'-1. */
static void expect_seqs(const seen_t *s, uint64_t first, size_t n) {
  assert_int_equal(s->status, 0);
  assert_int_equal(s->count, n);
  for (size_t i = 0; i < n; i++) {
    char want[32];
    snprintf(want, sizeof want, "arq_m%llu", (unsigned long long)(first + i));
    assert_int_equal(s->seq[i], first + i);
    assert_string_equal(s->id[i], want);
    assert_string_equal(s->text[i], want); /* the frame bytes at off/len */
  }
}

static int setup3(void **state) {
  fixture_t *f = calloc(1, sizeof *f);
  f->h = arq_history_mem_new(3);
  make_msgs(f);
  *state = f;
  return 0;
}

static int teardown(void **state) {
  fixture_t *f = *state;
  f->h->ops->free(f->h);
  free_msgs(f);
  free(f);
  return 0;
}

/* ---- tests ---- */

static void test_append_positions_from_one(void **state) {
  fixture_t *f = *state;
  assert_int_equal(put(f, "science", "general", 0), 1);
  assert_int_equal(put(f, "science", "general", 1), 2);
  assert_int_equal(put(f, "science", "explore", 2), 3); /* one sequence for all channels */
  assert_int_equal(put(f, "science", "general", 3), 4);
  assert_int_equal(f->m[0].frame->refs, 2);
  assert_int_equal(f->m[3].frame->refs, 2);
  assert_int_equal(f->h->ops->count(f->h, "science", "general"), 3);
  assert_int_equal(f->h->ops->count(f->h, "science", "explore"), 1);
  assert_int_equal(f->h->ops->count(f->h, "science", "nothing"), 0);
  assert_int_equal(f->h->ops->count(f->h, "art", "general"), 0);
  assert_int_equal(f->h->ops->total(f->h), 4);
}

static void test_frame_borrowed_and_id_copied(void **state) {
  fixture_t *f = *state;
  char id[32] = "arq_m1";
  assert_int_equal(f->h->ops->append(f->h, "r", "c", id, f->m[0].frame, 2, 6), 1);
  memset(id, 'z', 6); /* the ring kept its own copy */
  seen_t s = query(f, "r", "c", 10, NULL);
  expect_seqs(&s, 1, 1);
}

static void test_capacity_wrap_drops_oldest(void **state) {
  fixture_t *f = *state;
  for (int i = 0; i < 7; i++)
    assert_int_equal(put(f, "r", "c", i), (uint64_t)i + 1);
  /* Capacity 3: messages 5, 6, 7 remain; the others' references are gone. */
  for (int i = 0; i < 4; i++)
    assert_int_equal(f->m[i].frame->refs, 1);
  for (int i = 4; i < 7; i++)
    assert_int_equal(f->m[i].frame->refs, 2);
  assert_int_equal(f->h->ops->count(f->h, "r", "c"), 3);
  assert_int_equal(f->h->ops->total(f->h), 3);
  seen_t s = query(f, "r", "c", 10, NULL);
  expect_seqs(&s, 5, 3); /* oldest first, across the wrap */
  assert_true(s.since_found);
  assert_false(s.more);
}

static void test_limit_newest(void **state) {
  fixture_t *f = *state;
  for (int i = 0; i < 5; i++)
    put(f, "r", "c", i);
  seen_t s = query(f, "r", "c", 2, NULL);
  expect_seqs(&s, 4, 2);
  assert_true(s.more);
  s = query(f, "r", "c", 3, NULL);
  expect_seqs(&s, 3, 3);
  assert_false(s.more);
  s = query(f, "r", "c", 1, NULL);
  expect_seqs(&s, 5, 1);
  assert_true(s.more);
  s = query(f, "r", "c", 0, NULL);
  assert_int_equal(s.count, 0);
  assert_true(s.more);
}

static void test_since_found(void **state) {
  fixture_t *f = *state;
  for (int i = 0; i < 5; i++)
    put(f, "r", "c", i); /* holds 3, 4, 5 */
  seen_t s = query(f, "r", "c", 10, "arq_m3");
  assert_true(s.since_found);
  expect_seqs(&s, 4, 2);
  assert_false(s.more);
  /* The oldest 'limit' after 'since', with more to come. */
  s = query(f, "r", "c", 1, "arq_m3");
  assert_true(s.since_found);
  expect_seqs(&s, 4, 1);
  assert_true(s.more);
  /* Since the newest: nothing new. */
  s = query(f, "r", "c", 10, "arq_m5");
  assert_true(s.since_found);
  assert_int_equal(s.count, 0);
  assert_false(s.more);
}

static void test_since_not_found_is_a_gap(void **state) {
  fixture_t *f = *state;
  for (int i = 0; i < 5; i++)
    put(f, "r", "c", i); /* holds 3, 4, 5; 1 and 2 were overwritten */
  seen_t s = query(f, "r", "c", 10, "arq_m1");
  assert_false(s.since_found);
  expect_seqs(&s, 3, 3); /* all retained messages follow the gap */
  assert_false(s.more);
  s = query(f, "r", "c", 2, "arq_m2");
  assert_false(s.since_found);
  expect_seqs(&s, 3, 2); /* the oldest two */
  assert_true(s.more);
  s = query(f, "r", "c", 10, "arq_never");
  assert_false(s.since_found);
  expect_seqs(&s, 3, 3);
}

static void test_since_duplicate_ids_newest_wins(void **state) {
  fixture_t *f = *state;
  /* Clients choose their ids, so two messages may share one: 'since' means
   * the latest of them. */
  f->h->ops->append(f->h, "r", "c", "arq_dup", f->m[0].frame, 2, 6);
  f->h->ops->append(f->h, "r", "c", "arq_dup", f->m[1].frame, 2, 6);
  f->h->ops->append(f->h, "r", "c", "arq_m3", f->m[2].frame, 2, 6);
  seen_t s = query(f, "r", "c", 10, "arq_dup");
  assert_true(s.since_found);
  assert_int_equal(s.count, 1);
  assert_int_equal(s.seq[0], 3);
}

static void test_unknown_channel(void **state) {
  fixture_t *f = *state;
  put(f, "r", "c", 0);
  seen_t s = query(f, "r", "other", 10, NULL);
  assert_int_equal(s.status, 0);
  assert_int_equal(s.count, 0);
  assert_true(s.since_found);
  assert_false(s.more);
  s = query(f, "x", "c", 10, "arq_m1");
  assert_int_equal(s.count, 0);
  assert_false(s.since_found);
  assert_false(s.more);
}

static void test_channels_are_separate(void **state) {
  fixture_t *f = *state;
  put(f, "science", "general", 0);
  put(f, "science", "explore", 1);
  put(f, "art", "general", 2);
  seen_t s = query(f, "science", "explore", 10, NULL);
  assert_int_equal(s.count, 1);
  assert_string_equal(s.id[0], "arq_m2");
  assert_int_equal(s.seq[0], 2); /* positions are shared by all channels */
  s = query(f, "art", "general", 10, "arq_m1"); /* arq_m1 is another channel's */
  assert_false(s.since_found);
  assert_int_equal(s.count, 1);
}

static void test_drop(void **state) {
  fixture_t *f = *state;
  put(f, "r", "c", 0);
  put(f, "r", "c", 1);
  put(f, "r", "d", 2);
  assert_int_equal(f->h->ops->total(f->h), 3);
  f->h->ops->drop(f->h, "r", "c");
  assert_int_equal(f->m[0].frame->refs, 1);
  assert_int_equal(f->m[1].frame->refs, 1);
  assert_int_equal(f->m[2].frame->refs, 2);
  assert_int_equal(f->h->ops->count(f->h, "r", "c"), 0);
  assert_int_equal(f->h->ops->count(f->h, "r", "d"), 1);
  assert_int_equal(f->h->ops->total(f->h), 1);
  seen_t s = query(f, "r", "c", 10, NULL);
  assert_int_equal(s.count, 0);
  /* Dropping what does not exist is harmless. */
  f->h->ops->drop(f->h, "r", "c");
  f->h->ops->drop(f->h, "nope", "nope");
  assert_int_equal(f->h->ops->total(f->h), 1);
  /* The channel can be written again. */
  assert_true(put(f, "r", "c", 3) > 0);
  assert_int_equal(f->h->ops->count(f->h, "r", "c"), 1);
  assert_int_equal(f->h->ops->total(f->h), 2);
}

static void test_free_releases_frames(void **state) {
  arq_history_t *h = arq_history_mem_new(4);
  arq_rcbuf_t *a = arq_rcbuf_new(8), *b = arq_rcbuf_new(8);
  memcpy(a->data, "xxarq_aa", 8);
  memcpy(b->data, "xxarq_bb", 8);
  h->ops->append(h, "r", "c", "arq_aa", a, 2, 6);
  h->ops->append(h, "r", "d", "arq_bb", b, 2, 6);
  h->ops->append(h, "q", "c", "arq_aa2", a, 2, 6);
  assert_int_equal(a->refs, 3);
  assert_int_equal(b->refs, 2);
  h->ops->free(h);
  assert_int_equal(a->refs, 1);
  assert_int_equal(b->refs, 1);
  arq_rcbuf_unref(a);
  arq_rcbuf_unref(b);
}

static void test_capacity_zero(void **state) {
  arq_history_t *h = arq_history_mem_new(0);
  arq_rcbuf_t *a = arq_rcbuf_new(8);
  memcpy(a->data, "xxarq_aa", 8);
  assert_int_equal(h->ops->append(h, "r", "c", "arq_aa", a, 2, 6), 0); /* not stored */
  assert_int_equal(a->refs, 1);
  assert_int_equal(h->ops->count(h, "r", "c"), 0);
  assert_int_equal(h->ops->total(h), 0);
  seen_t s;
  memset(&s, 0, sizeof s);
  arq_hist_query_t q = {.room = "r", .channel = "c", .limit = 10};
  h->ops->query(h, &q, on_result, &s);
  assert_int_equal(s.calls, 1);
  assert_int_equal(s.count, 0);
  assert_false(s.more);
  q.since = "arq_aa";
  memset(&s, 0, sizeof s);
  h->ops->query(h, &q, on_result, &s);
  assert_int_equal(s.calls, 1);
  assert_int_equal(s.count, 0);
  assert_false(s.since_found);
  h->ops->drop(h, "r", "c");
  h->ops->free(h);
  arq_rcbuf_unref(a);
}

static void test_capacity_one(void **state) {
  fixture_t f;
  f.h = arq_history_mem_new(1);
  make_msgs(&f);
  for (int i = 0; i < NFRAMES; i++) {
    assert_int_equal(put(&f, "r", "c", i), (uint64_t)i + 1);
    assert_int_equal(f.m[i].frame->refs, 2);
    if (i > 0)
      assert_int_equal(f.m[i - 1].frame->refs, 1);
    assert_int_equal(f.h->ops->total(f.h), 1);
  }
  seen_t s = query(&f, "r", "c", 5, NULL);
  expect_seqs(&s, NFRAMES, 1);
  s = query(&f, "r", "c", 5, "arq_m15"); /* overwritten: a gap */
  assert_false(s.since_found);
  expect_seqs(&s, NFRAMES, 1);
  f.h->ops->free(f.h);
  free_msgs(&f);
}

static void test_items_borrow_until_callback_returns(void **state) {
  /* The items point into the ring: the frame they name is the one appended. */
  fixture_t *f = *state;
  put(f, "r", "c", 0);
  put(f, "r", "c", 1);
  seen_t s = query(f, "r", "c", 10, NULL);
  assert_int_equal(s.count, 2);
  assert_string_equal(s.text[0], "arq_m1");
  assert_string_equal(s.text[1], "arq_m2");
}

static void test_many_channels_total(void **state) {
  arq_history_t *h = arq_history_mem_new(2);
  arq_rcbuf_t *a = arq_rcbuf_new(8);
  memcpy(a->data, "xxarq_aa", 8);
  char ch[16];
  for (int i = 0; i < 100; i++) {
    snprintf(ch, sizeof ch, "c%d", i);
    for (int k = 0; k < 3; k++)
      assert_int_equal(h->ops->append(h, "r", ch, "arq_aa", a, 2, 6), (uint64_t)(3 * i + k + 1));
  }
  assert_int_equal(h->ops->total(h), 200);
  assert_int_equal(a->refs, 201);
  for (int i = 0; i < 50; i++) {
    snprintf(ch, sizeof ch, "c%d", i);
    h->ops->drop(h, "r", ch);
  }
  assert_int_equal(h->ops->total(h), 100);
  assert_int_equal(a->refs, 101);
  h->ops->free(h);
  assert_int_equal(a->refs, 1);
  arq_rcbuf_unref(a);
}

/* ---- positions: one sequence for all channels, and 'since' by position ---- */

static uint64_t next_pos(fixture_t *f, const char *room, const char *channel) {
  return f->h->ops->next_position(f->h, room, channel);
}

static void test_positions_one_sequence(void **state) {
  fixture_t *f = *state;
  assert_non_null(f->h->ops->next_position);
  assert_int_equal(next_pos(f, "r", "c"), 1);
  assert_int_equal(next_pos(f, "other", "x"), 1); /* the same for every channel */
  assert_int_equal(put(f, "r", "c", 0), 1);
  assert_int_equal(next_pos(f, "r", "d"), 2);
  assert_int_equal(put(f, "r", "d", 1), 2);
  assert_int_equal(put(f, "q", "c", 2), 3); /* another room, the same sequence */
  assert_int_equal(next_pos(f, "r", "c"), 4);
  assert_int_equal(put(f, "r", "c", 3), 4);
  /* Overwriting (capacity 3) does not reuse positions. */
  assert_int_equal(put(f, "r", "c", 4), 5);
  assert_int_equal(put(f, "r", "c", 5), 6);
  assert_int_equal(put(f, "r", "c", 6), 7);
  /* Neither does deleting a channel and creating it again. */
  f->h->ops->drop(f->h, "r", "c");
  assert_int_equal(next_pos(f, "r", "c"), 8);
  assert_int_equal(put(f, "r", "c", 7), 8);
  seen_t s = query(f, "r", "c", 10, NULL);
  assert_int_equal(s.count, 1);
  assert_int_equal(s.seq[0], 8);
  assert_string_equal(s.id[0], "arq_m8");
}

static void test_next_position_capacity_zero(void **state) {
  /* Nothing is stored, so nothing gets a position. */
  arq_history_t *h = arq_history_mem_new(0);
  assert_int_equal(h->ops->next_position(h, "r", "c"), 0);
  h->ops->free(h);
}

static void test_since_position(void **state) {
  fixture_t *f = *state;
  for (int i = 0; i < 5; i++)
    put(f, "r", "c", i); /* positions 1-5; holds 3, 4, 5; 1 and 2 were overwritten */
  /* Exactly at the newest overwritten position: nothing after it is missing. */
  seen_t s = query(f, "r", "c", 10, "2");
  assert_true(s.since_found);
  expect_seqs(&s, 3, 3);
  assert_false(s.more);
  /* One before it: position 2 is gone, a gap; all retained messages follow. */
  s = query(f, "r", "c", 10, "1");
  assert_false(s.since_found);
  expect_seqs(&s, 3, 3);
  assert_false(s.more);
  /* Within the ring: the oldest 'limit' after it. */
  s = query(f, "r", "c", 10, "3");
  assert_true(s.since_found);
  expect_seqs(&s, 4, 2);
  assert_false(s.more);
  s = query(f, "r", "c", 1, "3");
  assert_true(s.since_found);
  expect_seqs(&s, 4, 1);
  assert_true(s.more);
  s = query(f, "r", "c", 2, "1");
  assert_false(s.since_found);
  expect_seqs(&s, 3, 2);
  assert_true(s.more);
  /* The newest, and beyond: nothing new, nothing missing. */
  s = query(f, "r", "c", 10, "5");
  assert_true(s.since_found);
  assert_int_equal(s.count, 0);
  assert_false(s.more);
  s = query(f, "r", "c", 10, "99");
  assert_true(s.since_found);
  assert_int_equal(s.count, 0);
  assert_false(s.more);
  /* A Redis stream id "ms-seq" is read as ms << 22 | seq (arq_hist_pos_value):
   * here beyond every position, so nothing new. */
  s = query(f, "r", "c", 10, "3-0");
  assert_true(s.since_found);
  assert_int_equal(s.count, 0);
  assert_int_equal(arq_hist_pos_value("3-5"), (3ULL << ARQ_HIST_SEQ_BITS) | 5);
  assert_int_equal(arq_hist_pos_value("42"), 42);
}

static void test_since_position_zero(void **state) {
  fixture_t *f = *state;
  put(f, "r", "c", 0);
  put(f, "r", "c", 1);
  /* "0": from the channel's beginning; nothing was overwritten. */
  seen_t s = query(f, "r", "c", 10, "0");
  assert_true(s.since_found);
  expect_seqs(&s, 1, 2);
  assert_false(s.more);
  s = query(f, "r", "c", 1, "0");
  assert_true(s.since_found);
  expect_seqs(&s, 1, 1); /* the oldest, not the newest */
  assert_true(s.more);
  /* Once the ring wrapped the beginning is gone: a gap. */
  put(f, "r", "c", 2);
  put(f, "r", "c", 3);
  s = query(f, "r", "c", 10, "0");
  assert_false(s.since_found);
  expect_seqs(&s, 2, 3);
  /* A channel that never held anything: no messages and no gap. */
  s = query(f, "r", "empty", 10, "0");
  assert_int_equal(s.count, 0);
  assert_true(s.since_found);
  assert_false(s.more);
  s = query(f, "r", "empty", 10, "3");
  assert_int_equal(s.count, 0);
  assert_true(s.since_found);
}

static void test_since_position_interleaved_channels(void **state) {
  fixture_t *f = *state;
  /* c gets 1, 3, 5, 7; d gets 2, 4, 6. With capacity 3, c holds 3, 5, 7. */
  for (int i = 0; i < 7; i++)
    assert_int_equal(put(f, "r", i % 2 ? "d" : "c", i), (uint64_t)i + 1);
  /* A position that is not c's own still says where the client was. */
  seen_t s = query(f, "r", "c", 10, "4");
  assert_true(s.since_found);
  assert_int_equal(s.count, 2);
  assert_int_equal(s.seq[0], 5);
  assert_int_equal(s.seq[1], 7);
  assert_string_equal(s.text[0], "arq_m5");
  /* 1 was overwritten: a client at 1 missed nothing, one at 0 missed 1. */
  s = query(f, "r", "c", 10, "1");
  assert_true(s.since_found);
  assert_int_equal(s.count, 3);
  assert_int_equal(s.seq[0], 3);
  s = query(f, "r", "c", 10, "2");
  assert_true(s.since_found);
  assert_int_equal(s.count, 3);
  s = query(f, "r", "c", 10, "0");
  assert_false(s.since_found);
  assert_int_equal(s.count, 3);
  /* d was never full. */
  s = query(f, "r", "d", 10, "0");
  assert_true(s.since_found);
  assert_int_equal(s.count, 3);
  assert_int_equal(s.seq[0], 2);
  s = query(f, "r", "d", 10, "5");
  assert_true(s.since_found);
  assert_int_equal(s.count, 1);
  assert_int_equal(s.seq[0], 6);
}

static void test_since_position_recreated_channel(void **state) {
  fixture_t *f = *state;
  put(f, "r", "c", 0); /* 1 */
  put(f, "r", "c", 1); /* 2 */
  f->h->ops->drop(f->h, "r", "c");
  put(f, "r", "d", 2); /* 3, while c does not exist */
  put(f, "r", "c", 3); /* 4: c's new life begins after 3 */
  put(f, "r", "c", 4); /* 5 */
  /* A position from c's former life: what followed it there is gone. */
  seen_t s = query(f, "r", "c", 10, "2");
  assert_false(s.since_found);
  assert_int_equal(s.count, 2);
  assert_int_equal(s.seq[0], 4);
  assert_int_equal(s.seq[1], 5);
  s = query(f, "r", "c", 10, "1");
  assert_false(s.since_found);
  assert_int_equal(s.count, 2);
  /* The last position before the new life is not within it either. */
  s = query(f, "r", "c", 10, "3");
  assert_false(s.since_found);
  assert_int_equal(s.count, 2);
  /* The first position of the new life is. */
  s = query(f, "r", "c", 10, "4");
  assert_true(s.since_found);
  assert_int_equal(s.count, 1);
  assert_int_equal(s.seq[0], 5);
  assert_string_equal(s.text[0], "arq_m5");
  /* "0" is the beginning of the current life: nothing missing. */
  s = query(f, "r", "c", 10, "0");
  assert_true(s.since_found);
  assert_int_equal(s.count, 2);
  assert_int_equal(s.seq[0], 4);
  /* Ids of the former life are not found: a gap as well. */
  s = query(f, "r", "c", 10, "arq_m2");
  assert_false(s.since_found);
  assert_int_equal(s.count, 2);
}

static void test_since_position_recreated_and_wrapped(void **state) {
  fixture_t *f = *state;
  put(f, "r", "c", 0); /* 1 */
  f->h->ops->drop(f->h, "r", "c");
  for (int i = 1; i < 6; i++)
    put(f, "r", "c", i); /* 2-6, holds 4, 5, 6 */
  seen_t s = query(f, "r", "c", 10, "3");
  assert_true(s.since_found); /* 3 is the newest overwritten */
  expect_seqs(&s, 4, 3);
  s = query(f, "r", "c", 10, "2");
  assert_false(s.since_found);
  expect_seqs(&s, 4, 3);
  s = query(f, "r", "c", 10, "1"); /* the former life */
  assert_false(s.since_found);
  s = query(f, "r", "c", 10, "0");
  assert_false(s.since_found);
  expect_seqs(&s, 4, 3);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_append_positions_from_one, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_frame_borrowed_and_id_copied, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_capacity_wrap_drops_oldest, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_limit_newest, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_since_found, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_since_not_found_is_a_gap, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_since_duplicate_ids_newest_wins, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_unknown_channel, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_channels_are_separate, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_drop, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_items_borrow_until_callback_returns, setup3, teardown),
      cmocka_unit_test(test_free_releases_frames),
      cmocka_unit_test(test_capacity_zero),
      cmocka_unit_test(test_capacity_one),
      cmocka_unit_test(test_many_channels_total),
      cmocka_unit_test_setup_teardown(test_positions_one_sequence, setup3, teardown),
      cmocka_unit_test(test_next_position_capacity_zero),
      cmocka_unit_test_setup_teardown(test_since_position, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_since_position_zero, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_since_position_interleaved_channels, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_since_position_recreated_channel, setup3, teardown),
      cmocka_unit_test_setup_teardown(test_since_position_recreated_and_wrapped, setup3, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
