/* Clocks. Monotonic milliseconds for deadlines; wall-clock for timestamps. */
#ifndef ARQ_UTIL_TIME_H
#define ARQ_UTIL_TIME_H

#include <stddef.h>
#include <stdint.h>

/* Returns a monotonic clock reading in milliseconds. */
uint64_t arq_time_mono_ms(void);
/* Returns a monotonic clock reading in nanoseconds (CLOCK_MONOTONIC, the
 * clock of libuv's uv_hrtime()). */
uint64_t arq_time_mono_ns(void);
/* Returns the wall clock in milliseconds since the Unix epoch. */
uint64_t arq_time_wall_ms(void);
/* Writes 'wall_ms' as ISO-8601 UTC with milliseconds ("2026-11-22T13:41:40.123Z")
 * into 'out' (at least 25 bytes). Returns the length written. */
size_t arq_time_iso8601(uint64_t wall_ms, char *out, size_t cap);

#endif
