/* Authentication: who a credential says a client is.
 *
 * A credential is an API key or a JSON Web Token, presented at the WebSocket
 * upgrade (net/ finds it in the Authorization header, the Sec-WebSocket-
 * Protocol header or the 'token' query parameter) or later in-band with the
 * 'authenticate' command. This module only computes: it is given the key
 * table and the token key as bytes, checks a credential against them and the
 * current time, and returns an identity or says why not. No I/O.
 *
 * API keys are stored as SHA-256 digests of the key; a presented key is
 * hashed and compared with every stored digest in constant time. Tokens are
 * checked with libjwt for the signature, after this module has checked the
 * header itself: the algorithm must be exactly the configured one (so "none"
 * and algorithm confusion, an RS256 public key used as an HS256 secret, are
 * refused before any signature code runs). The claims are read here.
 */
#ifndef ARQ_AUTH_AUTH_H
#define ARQ_AUTH_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bus/names.h"

typedef enum { ARQ_AUTH_NONE = 0, ARQ_AUTH_API_KEY, ARQ_AUTH_JWT } arq_auth_mode_t;
typedef enum { ARQ_JWT_HS256 = 0, ARQ_JWT_RS256, ARQ_JWT_ES256 } arq_jwt_alg_t;

/* Roles, a bit each. */
#define ARQ_ROLE_ADMIN 1u
#define ARQ_ROLE_USER 2u
#define ARQ_ROLE_GUEST 4u
#define ARQ_ROLES_ALL (ARQ_ROLE_ADMIN | ARQ_ROLE_USER | ARQ_ROLE_GUEST)

#define ARQ_AUTH_MAX_CREDENTIAL 8192 /* longer credentials are refused unread */
#define ARQ_HS256_MIN_SECRET 32      /* bytes: RFC 7518 3.2, a key as long as the hash */

typedef struct arq_auth_opts {
  arq_auth_mode_t mode;
  /* api_key: entries "SHA256HEX:client_id:roles[:client_type]", roles joined
   * with '+', separated by commas or newlines; '#' starts a comment line.
   * Borrowed. */
  const char *api_keys;
  arq_jwt_alg_t jwt_alg;
  /* jwt: the HS256 secret, or the PEM public key for RS256/ES256. Borrowed. */
  const unsigned char *jwt_key;
  size_t jwt_key_len;
  const char *jwt_audience; /* required 'aud' value, NULL or "" for none */
  const char *jwt_issuer;   /* required 'iss' value, NULL or "" for none */
  uint64_t leeway_ms;       /* allowed clock skew for exp, nbf and iat */
} arq_auth_opts_t;

typedef struct arq_auth arq_auth_t;

/* What a credential says. */
typedef struct arq_identity {
  char client_id[ARQ_NAME_MAX + 1];
  char client_type[16]; /* "" when the credential does not say */
  unsigned roles;       /* ARQ_ROLE_* bits */
  char *rooms;          /* comma-separated rooms the client is limited to; NULL: no such limit. Owned. */
  uint64_t expires_ms;  /* wall-clock ms when the credential stops being valid; 0: never */
} arq_identity_t;

/* Returns a verifier for 'o' (caller owns; the strings are copied), or NULL
 * with one line in 'err' naming what is wrong: a malformed key entry (with its
 * number), a short HS256 secret, a public key that is not PEM or not of the
 * configured algorithm's type. */
arq_auth_t *arq_auth_new(const arq_auth_opts_t *o, char *err, size_t errcap);
void arq_auth_free(arq_auth_t *a);
arq_auth_mode_t arq_auth_mode(const arq_auth_t *a);
/* Number of API keys loaded. */
size_t arq_auth_key_count(const arq_auth_t *a);

/* Checks the credential ('n' bytes at 'cred') at wall-clock time 'now_ms'.
 * Returns 0 and fills 'id' (release with arq_identity_clear), or a negative
 * ARQ_E* code with a short reason in 'why' that names no secret: it is sent
 * to the client in the 401 answer. A token that passed is remembered (by
 * its SHA-256) so that checking it again is cheap; it still expires. */
int arq_auth_verify(arq_auth_t *a, const char *cred, size_t n, uint64_t now_ms, arq_identity_t *id, char *why,
                    size_t whycap);
/* How many token checks were answered from the tokens already verified
 * (auth.c keeps the last ones, by digest; never failures). */
uint64_t arq_auth_remembered(const arq_auth_t *a);

/* Releases what 'id' owns and zeroes it. */
void arq_identity_clear(arq_identity_t *id);
/* Copies 'src' into 'dst' (which must not own anything). */
void arq_identity_copy(arq_identity_t *dst, const arq_identity_t *src);

/* Parses the role name 'name' ('n' bytes): its bit, or 0 when unknown. */
unsigned arq_role_parse(const char *name, size_t n);
/* Parses roles joined with '+' ("admin+user") into bits. Returns 0 when a
 * name is unknown or the text is empty. */
unsigned arq_roles_parse(const char *text, size_t n);
/* Writes the names of 'roles' joined with '+' into 'out' ('cap' bytes). */
void arq_roles_format(unsigned roles, char *out, size_t cap);
/* Calls 'each(name, roles, ud)' for every entry "name=role+role" of the
 * comma-separated 'list' (command_roles, protected_rooms). Returns 0; or
 * ARQ_EINVAL when an entry is not of that shape or 'each' fails, with the
 * entry copied into 'bad' ('badcap' bytes). */
typedef int (*arq_role_entry_fn)(const char *name, unsigned roles, void *ud);
int arq_role_entries(const char *list, arq_role_entry_fn each, void *ud, char *bad, size_t badcap);

/* True when 'room' is an item of the comma-separated 'list'. */
bool arq_auth_list_has(const char *list, const char *room);

#endif
