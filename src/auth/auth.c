/* Authentication (see auth.h): API keys and JSON Web Tokens.
 *
 * A token is three base64url parts, header.claims.signature:
 *
 *   eyJhbGciOiJIUzI1NiJ9 . eyJzdWIiOiJhbGljZSIsImV4cCI6MTd9 . <signature>
 *   {"alg":"HS256"}        {"sub":"alice","exp":17...}
 *
 * The checks run cheapest and most telling first: shape and size, then the
 * header (alg must be the configured one, no 'crit' extensions), then the
 * signature (libjwt, over OpenSSL), then the claims. A token whose signature
 * fails never has its claims looked at, so the reason a forged token gets
 * says nothing about its claims.
 */
#include "auth/auth.h"

#include <jansson.h>
#include <jwt.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "util/alloc.h"
#include "util/err.h"

typedef struct api_key {
  unsigned char digest[32]; /* SHA-256 of the key */
  arq_identity_t id;
} api_key_t;

/* Tokens whose signature and claims were checked, by the SHA-256 of the
 * token: a client that reconnects with the same token (a reconnect storm
 * after a restart, a flaky network) is not checked with libjwt again, which
 * for RS256 and ES256 costs about half a millisecond (bench/README.md). A
 * remembered token is still refused from its exp on. Direct-mapped: a new
 * token takes its slot over. Only successes are remembered. */
#define VERIFIED_SLOTS 1024 /* a power of two */

typedef struct verified {
  unsigned char digest[32]; /* SHA-256 of the token */
  arq_identity_t id;        /* id.client_id "" while the slot is empty */
} verified_t;

struct arq_auth {
  arq_auth_mode_t mode;
  api_key_t *keys;
  size_t nkeys;
  arq_jwt_alg_t alg;
  unsigned char *key;
  size_t key_len;
  char *audience, *issuer;
  uint64_t leeway_ms;
  verified_t *verified; /* VERIFIED_SLOTS, allocated with the first token remembered */
  uint64_t verified_hits;
};

static const char *const alg_names[] = {"HS256", "RS256", "ES256"};
static const char *const role_names[] = {"admin", "user", "guest"};
static const char *const client_types[] = {"human", "ai-agent", "dashboard", "service"};

static int fail(char *why, size_t cap, int code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail(char *why, size_t cap, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, cap, fmt, ap);
  va_end(ap);
  return code;
}

/* ---- roles and lists ------------------------------------------------------ */

unsigned arq_role_parse(const char *name, size_t n) {
  for (size_t i = 0; i < sizeof role_names / sizeof role_names[0]; i++)
    if (strlen(role_names[i]) == n && memcmp(role_names[i], name, n) == 0)
      return 1u << i;
  return 0;
}

unsigned arq_roles_parse(const char *text, size_t n) {
  unsigned roles = 0;
  const char *p = text, *end = text + n;
  if (n == 0)
    return 0;
  while (p <= end) {
    const char *plus = memchr(p, '+', (size_t)(end - p));
    const char *e = plus ? plus : end;
    unsigned r = arq_role_parse(p, (size_t)(e - p));
    if (!r)
      return 0;
    roles |= r;
    p = e + 1;
  }
  return roles;
}

void arq_roles_format(unsigned roles, char *out, size_t cap) {
  size_t len = 0;
  out[0] = '\0';
  for (size_t i = 0; i < sizeof role_names / sizeof role_names[0]; i++)
    if (roles & (1u << i))
      len += (size_t)snprintf(out + len, len < cap ? cap - len : 0, "%s%s", len ? "+" : "", role_names[i]);
}

int arq_role_entries(const char *list, arq_role_entry_fn each, void *ud, char *bad, size_t badcap) {
  for (const char *p = list; p && *p;) {
    const char *comma = strchr(p, ',');
    size_t len = comma ? (size_t)(comma - p) : strlen(p);
    const char *eq = memchr(p, '=', len);
    char name[ARQ_NAME_MAX + 1];
    size_t nlen = eq ? (size_t)(eq - p) : 0;
    unsigned roles = eq ? arq_roles_parse(eq + 1, len - nlen - 1) : 0;
    bool ok = eq && nlen > 0 && nlen < sizeof name && roles;
    if (ok) {
      memcpy(name, p, nlen);
      name[nlen] = '\0';
      ok = each(name, roles, ud) == 0;
    }
    if (!ok) {
      snprintf(bad, badcap, "%.*s", (int)(len > 80 ? 80 : len), p);
      return ARQ_EINVAL;
    }
    p = comma ? comma + 1 : NULL;
  }
  return 0;
}

bool arq_auth_list_has(const char *list, const char *item) {
  size_t n = strlen(item);
  for (const char *p = list; p && *p;) {
    const char *comma = strchr(p, ',');
    size_t len = comma ? (size_t)(comma - p) : strlen(p);
    if (len == n && memcmp(p, item, n) == 0)
      return true;
    p = comma ? comma + 1 : NULL;
  }
  return false;
}

static bool known_type(const char *s) {
  for (size_t i = 0; i < sizeof client_types / sizeof client_types[0]; i++)
    if (strcmp(s, client_types[i]) == 0)
      return true;
  return false;
}

void arq_identity_clear(arq_identity_t *id) {
  arq_free(id->rooms);
  memset(id, 0, sizeof *id);
}

void arq_identity_copy(arq_identity_t *dst, const arq_identity_t *src) {
  *dst = *src;
  dst->rooms = src->rooms ? arq_strdup(src->rooms) : NULL;
}

/* ---- API keys ------------------------------------------------------------- */

/* Parses one entry "HEX:client_id:roles[:client_type]" ('n' bytes). */
static int parse_key(const char *s, size_t n, api_key_t *k, char *err, size_t errcap) {
  char line[512];
  if (n >= sizeof line)
    return fail(err, errcap, ARQ_EINVAL, "too long");
  memcpy(line, s, n);
  line[n] = '\0';
  char *fields[5] = {0};
  size_t nf = 0;
  for (char *p = line; p && nf < 5; nf++) {
    fields[nf] = p;
    p = strchr(p, ':');
    if (p)
      *p++ = '\0';
  }
  if (nf < 3 || nf > 4)
    return fail(err, errcap, ARQ_EINVAL, "expected SHA256HEX:client_id:roles[:client_type]");
  if (strlen(fields[0]) != 64)
    return fail(err, errcap, ARQ_EINVAL, "the key's SHA-256 must be 64 hex digits");
  for (size_t i = 0; i < 32; i++) {
    int hi = arq_names_hexval(fields[0][2 * i]), lo = arq_names_hexval(fields[0][2 * i + 1]);
    if (hi < 0 || lo < 0)
      return fail(err, errcap, ARQ_EINVAL, "the key's SHA-256 must be 64 hex digits");
    k->digest[i] = (unsigned char)(hi << 4 | lo);
  }
  if (!arq_names_valid_client_id(fields[1], strlen(fields[1])))
    return fail(err, errcap, ARQ_EINVAL, "'%.64s' is not a valid client id", fields[1]);
  snprintf(k->id.client_id, sizeof k->id.client_id, "%s", fields[1]);
  k->id.roles = arq_roles_parse(fields[2], strlen(fields[2]));
  if (!k->id.roles)
    return fail(err, errcap, ARQ_EINVAL, "roles must be admin, user or guest, joined with '+'");
  if (nf == 4) {
    if (!known_type(fields[3]))
      return fail(err, errcap, ARQ_EINVAL, "client type must be human, ai-agent, dashboard or service");
    snprintf(k->id.client_type, sizeof k->id.client_type, "%s", fields[3]);
  }
  return 0;
}

static int load_keys(arq_auth_t *a, const char *text, char *err, size_t errcap) {
  size_t cap = 0, entry = 0;
  for (const char *p = text; p && *p;) {
    size_t len = strcspn(p, ",\n");
    const char *s = p, *e = p + len;
    p = *e ? e + 1 : NULL;
    while (s < e && (*s == ' ' || *s == '\t' || *s == '\r'))
      s++;
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r'))
      e--;
    if (s == e || *s == '#')
      continue;
    entry++;
    if (a->nkeys == cap) {
      cap = cap ? 2 * cap : 8;
      a->keys = arq_realloc(a->keys, cap * sizeof *a->keys);
    }
    api_key_t *k = &a->keys[a->nkeys];
    memset(k, 0, sizeof *k);
    char why[160];
    if (parse_key(s, (size_t)(e - s), k, why, sizeof why) != 0)
      return fail(err, errcap, ARQ_EINVAL, "API key entry %zu: %s", entry, why);
    for (size_t i = 0; i < a->nkeys; i++)
      if (memcmp(a->keys[i].digest, k->digest, sizeof k->digest) == 0)
        return fail(err, errcap, ARQ_EINVAL, "API key entry %zu: the same key is listed twice", entry);
    a->nkeys++;
  }
  return 0;
}

static int verify_key(const arq_auth_t *a, const char *cred, size_t n, arq_identity_t *id, char *why,
                      size_t whycap) {
  unsigned char digest[32];
  unsigned int dlen = 0;
  if (!EVP_Digest(cred, n, digest, &dlen, EVP_sha256(), NULL))
    return fail(why, whycap, ARQ_EIO, "the key could not be checked");
  /* Every stored digest is compared, in constant time: how long the check
   * takes says nothing about which key, if any, came close. */
  const api_key_t *found = NULL;
  for (size_t i = 0; i < a->nkeys; i++) {
    bool same = CRYPTO_memcmp(a->keys[i].digest, digest, sizeof digest) == 0;
    if (same && !found)
      found = &a->keys[i];
  }
  if (!found)
    return fail(why, whycap, ARQ_EACCES, "unknown API key");
  arq_identity_copy(id, &found->id);
  return 0;
}

/* ---- tokens ----------------------------------------------------------------- */

/* Decodes base64url without padding ('n' chars at 's') into a new
 * NUL-terminated buffer (caller owns); NULL when it is not base64url. */
static unsigned char *b64url_decode(const char *s, size_t n, size_t *outlen) {
  if (n % 4 == 1)
    return NULL;
  unsigned char *out = arq_malloc(n / 4 * 3 + 3 + 1);
  size_t o = 0;
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    int v = c >= 'A' && c <= 'Z'   ? c - 'A'
            : c >= 'a' && c <= 'z' ? c - 'a' + 26
            : c >= '0' && c <= '9' ? c - '0' + 52
            : c == '-'             ? 62
            : c == '_'             ? 63
                                   : -1;
    if (v < 0) {
      arq_free(out);
      return NULL;
    }
    acc = acc << 6 | (uint32_t)v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (unsigned char)(acc >> bits);
    }
  }
  out[o] = '\0';
  *outlen = o;
  return out;
}

/* Decodes a base64url part into a JSON object (caller owns), or NULL. */
static json_t *b64url_json(const char *s, size_t n) {
  size_t len;
  unsigned char *raw = b64url_decode(s, n, &len);
  if (!raw)
    return NULL;
  json_t *j = json_loadb((const char *)raw, len, JSON_REJECT_DUPLICATES, NULL);
  arq_free(raw);
  if (j && !json_is_object(j)) {
    json_decref(j);
    return NULL;
  }
  return j;
}

/* A NumericDate claim in ms; false when absent; '*bad' when not a number. */
static bool date_claim(json_t *claims, const char *name, uint64_t *ms, bool *bad) {
  json_t *v = json_object_get(claims, name);
  if (!v)
    return false;
  if (!json_is_number(v) || json_number_value(v) < 0 || json_number_value(v) > 1e13) {
    *bad = true;
    return false;
  }
  *ms = (uint64_t)(json_number_value(v) * 1000.0);
  return true;
}

static bool aud_matches(json_t *aud, const char *want) {
  if (json_is_string(aud))
    return strcmp(json_string_value(aud), want) == 0;
  size_t i;
  json_t *v;
  json_array_foreach(aud, i, v) {
    if (json_is_string(v) && strcmp(json_string_value(v), want) == 0)
      return true;
  }
  return false;
}

/* Reads roles from a claim: an array of names or one space-separated string.
 * Names this server does not know are ignored (a token may carry roles for
 * other services). Returns the bits; '*bad' when the claim has another shape. */
static unsigned roles_claim(json_t *v, bool *bad) {
  unsigned roles = 0;
  if (json_is_string(v)) {
    const char *s = json_string_value(v);
    while (*s) {
      size_t len = strcspn(s, " ");
      roles |= arq_role_parse(s, len);
      s += len;
      s += strspn(s, " ");
    }
    return roles;
  }
  if (!json_is_array(v)) {
    *bad = true;
    return 0;
  }
  size_t i;
  json_t *r;
  json_array_foreach(v, i, r) {
    if (!json_is_string(r)) {
      *bad = true;
      return 0;
    }
    roles |= arq_role_parse(json_string_value(r), json_string_length(r));
  }
  return roles;
}

static int read_claims(const arq_auth_t *a, json_t *claims, uint64_t now, arq_identity_t *id, char *why,
                       size_t whycap) {
  json_t *sub = json_object_get(claims, "sub");
  if (!json_is_string(sub))
    return fail(why, whycap, ARQ_EACCES, "the token has no \"sub\" claim");
  if (!arq_names_valid_client_id(json_string_value(sub), json_string_length(sub)))
    return fail(why, whycap, ARQ_EACCES, "the token's \"sub\" is not a valid client id");
  bool bad = false;
  uint64_t exp = 0, nbf = 0, iat = 0;
  if (!date_claim(claims, "exp", &exp, &bad))
    return fail(why, whycap, ARQ_EACCES, bad ? "the token's \"exp\" is not a date" : "the token has no \"exp\" claim");
  if (now >= exp + a->leeway_ms)
    return fail(why, whycap, ARQ_EACCES, "the token has expired");
  if (date_claim(claims, "nbf", &nbf, &bad) && now + a->leeway_ms < nbf)
    return fail(why, whycap, ARQ_EACCES, "the token is not valid yet (nbf)");
  if (date_claim(claims, "iat", &iat, &bad) && now + a->leeway_ms < iat)
    return fail(why, whycap, ARQ_EACCES, "the token was issued in the future (iat)");
  if (bad)
    return fail(why, whycap, ARQ_EACCES, "the token's \"nbf\" or \"iat\" is not a date");
  if (a->audience && !aud_matches(json_object_get(claims, "aud"), a->audience))
    return fail(why, whycap, ARQ_EACCES, "the token is not for this audience (aud)");
  if (a->issuer) {
    json_t *iss = json_object_get(claims, "iss");
    if (!json_is_string(iss) || strcmp(json_string_value(iss), a->issuer) != 0)
      return fail(why, whycap, ARQ_EACCES, "the token is not from the expected issuer (iss)");
  }
  unsigned roles = ARQ_ROLE_GUEST; /* the least, when the token names none */
  json_t *rv = json_object_get(claims, "roles");
  if (rv) {
    roles = roles_claim(rv, &bad);
    if (bad)
      return fail(why, whycap, ARQ_EACCES, "the token's \"roles\" must be a list of names");
    if (!roles)
      roles = ARQ_ROLE_GUEST;
  }
  json_t *type = json_object_get(claims, "client_type");
  if (type && (!json_is_string(type) || !known_type(json_string_value(type))))
    return fail(why, whycap, ARQ_EACCES, "the token's \"client_type\" must be human, ai-agent, dashboard or service");
  json_t *rooms = json_object_get(claims, "rooms");
  char *list = NULL;
  if (rooms) {
    size_t i, len = 0;
    json_t *r;
    if (!json_is_array(rooms))
      return fail(why, whycap, ARQ_EACCES, "the token's \"rooms\" must be a list of room names");
    list = arq_malloc(json_array_size(rooms) * (ARQ_NAME_MAX + 1) + 1);
    list[0] = '\0';
    json_array_foreach(rooms, i, r) {
      if (!json_is_string(r) || !arq_names_valid_channel(json_string_value(r), json_string_length(r))) {
        arq_free(list);
        return fail(why, whycap, ARQ_EACCES, "the token's \"rooms\" must be a list of room names");
      }
      len += (size_t)sprintf(list + len, "%s%s", len ? "," : "", json_string_value(r));
    }
  }
  memset(id, 0, sizeof *id);
  snprintf(id->client_id, sizeof id->client_id, "%s", json_string_value(sub));
  if (type)
    snprintf(id->client_type, sizeof id->client_type, "%s", json_string_value(type));
  id->roles = roles;
  id->rooms = list;
  id->expires_ms = exp;
  return 0;
}

static verified_t *verified_slot(const arq_auth_t *a, const unsigned char *digest) {
  uint32_t h = (uint32_t)digest[0] | (uint32_t)digest[1] << 8 | (uint32_t)digest[2] << 16;
  return &a->verified[h & (VERIFIED_SLOTS - 1)];
}

static int check_token(const arq_auth_t *a, const char *cred, size_t n, uint64_t now, arq_identity_t *id,
                       char *why, size_t whycap);

static int verify_token(arq_auth_t *a, const char *cred, size_t n, uint64_t now, arq_identity_t *id, char *why,
                        size_t whycap) {
  unsigned char digest[32];
  unsigned int dlen = 0;
  if (!EVP_Digest(cred, n, digest, &dlen, EVP_sha256(), NULL))
    return check_token(a, cred, n, now, id, why, whycap);
  if (a->verified) {
    verified_t *v = verified_slot(a, digest);
    if (v->id.client_id[0] && memcmp(v->digest, digest, sizeof digest) == 0) {
      if (now >= v->id.expires_ms + a->leeway_ms)
        return fail(why, whycap, ARQ_EACCES, "the token has expired");
      a->verified_hits++;
      arq_identity_copy(id, &v->id);
      return 0;
    }
  }
  int rc = check_token(a, cred, n, now, id, why, whycap);
  if (rc == 0) {
    if (!a->verified)
      a->verified = arq_calloc(VERIFIED_SLOTS, sizeof *a->verified);
    verified_t *v = verified_slot(a, digest);
    arq_identity_clear(&v->id);
    memcpy(v->digest, digest, sizeof digest);
    arq_identity_copy(&v->id, id);
  }
  return rc;
}

static int check_token(const arq_auth_t *a, const char *cred, size_t n, uint64_t now, arq_identity_t *id,
                       char *why, size_t whycap) {
  const char *dot1 = memchr(cred, '.', n);
  const char *dot2 = dot1 ? memchr(dot1 + 1, '.', (size_t)(cred + n - dot1 - 1)) : NULL;
  if (!dot2 || memchr(dot2 + 1, '.', (size_t)(cred + n - dot2 - 1)) || dot2 + 1 == cred + n)
    return fail(why, whycap, ARQ_EACCES, "not a signed JSON Web Token (header.claims.signature)");
  json_t *header = b64url_json(cred, (size_t)(dot1 - cred));
  if (!header)
    return fail(why, whycap, ARQ_EACCES, "the token's header is not base64url JSON");
  json_t *alg = json_object_get(header, "alg");
  bool alg_ok = json_is_string(alg) && strcmp(json_string_value(alg), alg_names[a->alg]) == 0;
  bool crit = json_object_get(header, "crit") != NULL;
  json_decref(header);
  if (!alg_ok)
    return fail(why, whycap, ARQ_EACCES, "the token's algorithm is not %s", alg_names[a->alg]);
  if (crit)
    return fail(why, whycap, ARQ_EACCES, "the token has critical header extensions (crit), which are not supported");
  json_t *claims = b64url_json(dot1 + 1, (size_t)(dot2 - dot1 - 1));
  if (!claims)
    return fail(why, whycap, ARQ_EACCES, "the token's claims are not base64url JSON");

  /* libjwt wants a NUL-terminated token and checks the signature with the
   * key; the header was checked above, and libjwt's idea of the algorithm
   * must agree with it. */
  char *tok = arq_malloc(n + 1);
  memcpy(tok, cred, n);
  tok[n] = '\0';
  jwt_t *jwt = NULL;
  int rc = jwt_decode(&jwt, tok, a->key, (int)a->key_len);
  arq_free(tok);
  bool sig_ok = rc == 0 && jwt && jwt_get_alg(jwt) == (a->alg == ARQ_JWT_HS256   ? JWT_ALG_HS256
                                                       : a->alg == ARQ_JWT_RS256 ? JWT_ALG_RS256
                                                                                 : JWT_ALG_ES256);
  if (jwt)
    jwt_free(jwt);
  if (!sig_ok) {
    json_decref(claims);
    return fail(why, whycap, ARQ_EACCES, "the token's signature does not verify");
  }
  rc = read_claims(a, claims, now, id, why, whycap);
  json_decref(claims);
  return rc;
}

/* ---- the verifier ------------------------------------------------------------ */

/* Checks that 'pem' is a public key of the type 'alg' needs. */
static int check_public_key(arq_jwt_alg_t alg, const unsigned char *pem, size_t len, char *err, size_t errcap) {
  BIO *bio = BIO_new_mem_buf(pem, (int)len);
  EVP_PKEY *pk = bio ? PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL) : NULL;
  BIO_free(bio);
  if (!pk)
    return fail(err, errcap, ARQ_EINVAL, "the %s key is not a PEM public key (-----BEGIN PUBLIC KEY-----)",
                alg_names[alg]);
  int rc = 0;
  if (alg == ARQ_JWT_RS256 && EVP_PKEY_base_id(pk) != EVP_PKEY_RSA)
    rc = fail(err, errcap, ARQ_EINVAL, "RS256 needs an RSA public key");
  else if (alg == ARQ_JWT_RS256 && EVP_PKEY_get_bits(pk) < 2048)
    rc = fail(err, errcap, ARQ_EINVAL, "the RSA public key must have at least 2048 bits");
  else if (alg == ARQ_JWT_ES256 && !(EVP_PKEY_base_id(pk) == EVP_PKEY_EC && EVP_PKEY_get_bits(pk) == 256))
    rc = fail(err, errcap, ARQ_EINVAL, "ES256 needs an EC P-256 public key");
  EVP_PKEY_free(pk);
  return rc;
}

arq_auth_t *arq_auth_new(const arq_auth_opts_t *o, char *err, size_t errcap) {
  arq_auth_t *a = arq_calloc(1, sizeof *a);
  a->mode = o->mode;
  a->alg = o->jwt_alg;
  a->leeway_ms = o->leeway_ms;
  a->audience = o->jwt_audience && o->jwt_audience[0] ? arq_strdup(o->jwt_audience) : NULL;
  a->issuer = o->jwt_issuer && o->jwt_issuer[0] ? arq_strdup(o->jwt_issuer) : NULL;
  if (o->mode == ARQ_AUTH_API_KEY) {
    if (load_keys(a, o->api_keys ? o->api_keys : "", err, errcap) != 0)
      goto fail;
    if (a->nkeys == 0) {
      fail(err, errcap, ARQ_EINVAL, "auth is api_key but no API key is configured (api_keys, api_keys_file)");
      goto fail;
    }
  } else if (o->mode == ARQ_AUTH_JWT) {
    if (o->jwt_key_len == 0) {
      fail(err, errcap, ARQ_EINVAL, "auth is jwt but no key is configured (jwt_secret or jwt_key_file)");
      goto fail;
    }
    if (o->jwt_alg == ARQ_JWT_HS256 && o->jwt_key_len < ARQ_HS256_MIN_SECRET) {
      fail(err, errcap, ARQ_EINVAL, "the HS256 secret must be at least %d bytes", ARQ_HS256_MIN_SECRET);
      goto fail;
    }
    if (o->jwt_alg != ARQ_JWT_HS256 && check_public_key(o->jwt_alg, o->jwt_key, o->jwt_key_len, err, errcap) != 0)
      goto fail;
    a->key = arq_malloc(o->jwt_key_len + 1);
    memcpy(a->key, o->jwt_key, o->jwt_key_len);
    a->key[o->jwt_key_len] = '\0';
    a->key_len = o->jwt_key_len;
  }
  return a;
fail:
  arq_auth_free(a);
  return NULL;
}

void arq_auth_free(arq_auth_t *a) {
  if (!a)
    return;
  for (size_t i = 0; i < a->nkeys; i++)
    arq_identity_clear(&a->keys[i].id);
  arq_free(a->keys);
  if (a->key) {
    OPENSSL_cleanse(a->key, a->key_len);
    arq_free(a->key);
  }
  for (size_t i = 0; a->verified && i < VERIFIED_SLOTS; i++)
    arq_identity_clear(&a->verified[i].id);
  arq_free(a->verified);
  arq_free(a->audience);
  arq_free(a->issuer);
  arq_free(a);
}

arq_auth_mode_t arq_auth_mode(const arq_auth_t *a) { return a ? a->mode : ARQ_AUTH_NONE; }

size_t arq_auth_key_count(const arq_auth_t *a) { return a ? a->nkeys : 0; }

uint64_t arq_auth_remembered(const arq_auth_t *a) { return a ? a->verified_hits : 0; }

int arq_auth_verify(arq_auth_t *a, const char *cred, size_t n, uint64_t now_ms, arq_identity_t *id, char *why,
                    size_t whycap) {
  memset(id, 0, sizeof *id);
  if (n == 0)
    return fail(why, whycap, ARQ_EACCES, "no credential");
  if (n > ARQ_AUTH_MAX_CREDENTIAL)
    return fail(why, whycap, ARQ_EACCES, "the credential is longer than %d bytes", ARQ_AUTH_MAX_CREDENTIAL);
  if (memchr(cred, '\0', n))
    return fail(why, whycap, ARQ_EACCES, "the credential holds a NUL byte");
  if (a->mode == ARQ_AUTH_API_KEY)
    return verify_key(a, cred, n, id, why, whycap);
  if (a->mode == ARQ_AUTH_JWT)
    return verify_token(a, cred, n, now_ms, id, why, whycap);
  return fail(why, whycap, ARQ_EINVAL, "authentication is off");
}
