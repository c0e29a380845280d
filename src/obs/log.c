/* Structured logs (see log.h).
 *
 * A line is built in a stack buffer and written with one write(2), so lines
 * from a later multi-threaded server never interleave. Values are quoted when
 * logfmt needs it and escaped for JSON.
 */
#include "obs/log.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "util/time.h"

int arq_log_level = ARQ_LOG_INFO;
static int log_json;

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

void arq_log_setup(int level, int json) {
  arq_log_level = level;
  log_json = json;
}

int arq_log_level_parse(const char *s) {
  for (int i = 0; i <= ARQ_LOG_OFF; i++)
    if (strcasecmp(s, level_names[i]) == 0)
      return i;
  if (strcasecmp(s, "warning") == 0)
    return ARQ_LOG_WARN;
  return -1;
}

const char *arq_log_level_name(int level) {
  return level >= 0 && level <= ARQ_LOG_OFF ? level_names[level] : "unknown";
}

typedef struct line {
  char buf[4096];
  size_t len;
} line_t;

static void put(line_t *l, const char *s, size_t n) {
  if (n > sizeof l->buf - 2 - l->len)
    n = sizeof l->buf - 2 - l->len; /* keep room for the newline */
  memcpy(l->buf + l->len, s, n);
  l->len += n;
}

static void puts_(line_t *l, const char *s) { put(l, s, strlen(s)); }

static void put_json_string(line_t *l, const char *s) {
  put(l, "\"", 1);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    char esc[8];
    if (c == '"' || c == '\\') {
      esc[0] = '\\';
      esc[1] = (char)c;
      put(l, esc, 2);
    } else if (c < 0x20) {
      snprintf(esc, sizeof esc, "\\u%04x", c);
      put(l, esc, 6);
    } else {
      put(l, (const char *)&c, 1);
    }
  }
  put(l, "\"", 1);
}

static void put_logfmt_value(line_t *l, const char *s) {
  bool quote = *s == '\0';
  for (const char *p = s; *p && !quote; p++)
    quote = *p == ' ' || *p == '=' || *p == '"' || (unsigned char)*p < 0x20;
  if (!quote) {
    puts_(l, s);
    return;
  }
  put_json_string(l, s); /* logfmt quoting uses the same escapes */
}

static void put_field(line_t *l, const char *key, const char *s, long long i, bool first) {
  char num[32];
  if (log_json) {
    put(l, first ? "{" : ",", 1);
    put_json_string(l, key);
    put(l, ":", 1);
    if (s) {
      put_json_string(l, s);
    } else {
      snprintf(num, sizeof num, "%lld", i);
      puts_(l, num);
    }
    return;
  }
  if (!first)
    put(l, " ", 1);
  puts_(l, key);
  put(l, "=", 1);
  if (s) {
    put_logfmt_value(l, s);
  } else {
    snprintf(num, sizeof num, "%lld", i);
    puts_(l, num);
  }
}

void arq_log_emit(int level, const char *component, const char *msg, const arq_log_field_t *fields, size_t n) {
  line_t l;
  l.len = 0;
  char ts[32];
  arq_time_iso8601(arq_time_wall_ms(), ts, sizeof ts);
  put_field(&l, "time", ts, 0, true);
  put_field(&l, "level", arq_log_level_name(level), 0, false);
  put_field(&l, "component", component, 0, false);
  put_field(&l, "msg", msg, 0, false);
  for (size_t i = 0; i < n; i++)
    put_field(&l, fields[i].key, fields[i].s, fields[i].i, false);
  if (log_json)
    put(&l, "}", 1);
  l.buf[l.len++] = '\n';
  ssize_t w = write(STDERR_FILENO, l.buf, l.len);
  (void)w; /* nowhere to report a failed log write */
}
