/* Structured logs to stderr: logfmt by default, JSON lines on request.
 *
 * Each line carries time (ISO-8601 UTC, ms), level, component and msg, then
 * the context fields that apply: client id, remote address, room, channel,
 * close code. Fields are passed as a list of ARQ_LS (string) and ARQ_LI
 * (integer) values; the list is only built when the level is enabled.
 *
 *   arq_log(ARQ_LOG_INFO, "net", "client connected",
 *           ARQ_LS("remote", addr), ARQ_LI("conn", id));
 *
 * The level and format are process-wide settings, fixed at start.
 */
#ifndef ARQ_OBS_LOG_H
#define ARQ_OBS_LOG_H

#include <stddef.h>

enum { ARQ_LOG_DEBUG = 0, ARQ_LOG_INFO = 1, ARQ_LOG_WARN = 2, ARQ_LOG_ERROR = 3, ARQ_LOG_OFF = 4 };

typedef struct arq_log_field {
  const char *key;
  const char *s; /* string value, or NULL for an integer */
  long long i;
} arq_log_field_t;

#define ARQ_LS(k, v) ((arq_log_field_t){.key = (k), .s = (v) ? (v) : "", .i = 0})
#define ARQ_LI(k, v) ((arq_log_field_t){.key = (k), .s = NULL, .i = (long long)(v)})

extern int arq_log_level;

#define arq_log(level, component, msg, ...)                                                  \
  do {                                                                                       \
    if ((level) >= arq_log_level) {                                                          \
      const arq_log_field_t arq_log_fields_[] = {{NULL, NULL, 0}, ##__VA_ARGS__};            \
      arq_log_emit((level), (component), (msg), arq_log_fields_ + 1,                         \
                   sizeof arq_log_fields_ / sizeof arq_log_fields_[0] - 1);                  \
    }                                                                                        \
  } while (0)

/* Sets the minimum level and the format (0 logfmt, 1 JSON lines). */
void arq_log_setup(int level, int json);
/* Writes one line; use the arq_log() macro instead. */
void arq_log_emit(int level, const char *component, const char *msg, const arq_log_field_t *fields, size_t n);
/* Parses "debug", "info", "warn", "error" or "off". Returns the level or -1. */
int arq_log_level_parse(const char *s);
/* Returns the name of 'level'. */
const char *arq_log_level_name(int level);

#endif
