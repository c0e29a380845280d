/* Names a client chooses: rooms, channels, client ids, query parameters.
 *
 * One rule for each kind of name, checked the same way wherever the name
 * appears (envelope fields, command arguments, upgrade query parameters), so
 * docs/protocol.md can state it once:
 *
 *   room, channel   1-64 bytes of A-Z a-z 0-9 _ - . , starting with a letter
 *                   or digit; case-sensitive
 *   client id       1-64 bytes of A-Z a-z 0-9 _ - . @ , starting with a letter
 *                   or digit
 *
 * "room:channel" in one string names a channel of a room; arq_names_split()
 * takes it apart.
 */
#ifndef ARQ_BUS_NAMES_H
#define ARQ_BUS_NAMES_H

#include <stdbool.h>
#include <stddef.h>

#define ARQ_NAME_MAX 64

/* True when the 'n' bytes at 's' are a valid room or channel name. */
bool arq_names_valid_channel(const char *s, size_t n);
/* True when the 'n' bytes at 's' are a valid client id. */
bool arq_names_valid_client_id(const char *s, size_t n);

/* Splits "room:channel" ('s', NUL-terminated) into 'room' and 'channel'
 * (buffers of ARQ_NAME_MAX + 1 bytes). A string without ':' is a room alone
 * ('channel' set to ""). Returns 0, or ARQ_EINVAL when a part is not a valid
 * name or there is more than one ':'. */
int arq_names_split(const char *s, char *room, char *channel);

/* Decodes the percent-encoded query value ('n' bytes at 's', '+' is a space)
 * into 'out' ('cap' bytes, NUL-terminated). Returns the decoded length, or -1
 * when it does not fit, has a bad escape or decodes to a NUL byte. */
/* The value of the hex digit 'c', or -1. */
int arq_names_hexval(char c);

long arq_names_unescape(const char *s, size_t n, char *out, size_t cap);

#endif
