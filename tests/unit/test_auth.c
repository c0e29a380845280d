/* Unit tests for authentication (auth/auth.c, auth/credential.c): roles and
 * lists, API keys, JSON Web Tokens at the edges of their time claims, and
 * finding a credential in an upgrade request. Tokens are made with libjwt's
 * encoder, hostile ones from fixed text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jwt.h>
#include <openssl/evp.h>

#include "auth/auth.h"
#include "auth/credential.h"
#include "util/err.h"
#include "wire/http.h"

#define SECRET "unit-secret-0123456789abcdef-0123456789"
#define NOW UINT64_C(1800000000000) /* ms */
#define LEEWAY 30000


static arq_auth_t *jwt_auth(const char *aud, const char *iss) {
  char err[256] = "";
  arq_auth_opts_t o = {.mode = ARQ_AUTH_JWT, .jwt_alg = ARQ_JWT_HS256, .jwt_key = (const unsigned char *)SECRET,
                       .jwt_key_len = strlen(SECRET), .jwt_audience = aud, .jwt_issuer = iss, .leeway_ms = LEEWAY};
  arq_auth_t *a = arq_auth_new(&o, err, sizeof err);
  if (!a)
    fail_msg("%s", err);
  return a;
}

/* An HS256 token with 'claims' (JSON) signed with 'secret' (caller frees). */
static char *make_token(const char *claims, const char *secret, jwt_alg_t alg) {
  jwt_t *j = NULL;
  assert_int_equal(jwt_new(&j), 0);
  assert_int_equal(jwt_add_grants_json(j, claims), 0);
  assert_int_equal(jwt_set_alg(j, alg, (const unsigned char *)secret, (int)strlen(secret)), 0);
  char *t = jwt_encode_str(j);
  jwt_free(j);
  assert_non_null(t);
  return t;
}

static int check_token(arq_auth_t *a, const char *claims, arq_identity_t *id, char *why) {
  char *t = make_token(claims, SECRET, JWT_ALG_HS256);
  int rc = arq_auth_verify(a, t, strlen(t), NOW, id, why, 200);
  free(t);
  return rc;
}

static void refused(arq_auth_t *a, const char *claims, const char *reason) {
  arq_identity_t id;
  char why[200] = "";
  assert_int_equal(check_token(a, claims, &id, why), ARQ_EACCES);
  if (!strstr(why, reason))
    fail_msg("%s: \"%s\" does not say \"%s\"", claims, why, reason);
}

static void test_roles_and_lists(void **state) {
  assert_int_equal(arq_roles_parse("admin+user", 10), ARQ_ROLE_ADMIN | ARQ_ROLE_USER);
  assert_int_equal(arq_roles_parse("guest", 5), ARQ_ROLE_GUEST);
  assert_int_equal(arq_roles_parse("admin+", 6), 0);
  assert_int_equal(arq_roles_parse("", 0), 0);
  assert_int_equal(arq_roles_parse("root", 4), 0);
  char out[32];
  arq_roles_format(ARQ_ROLES_ALL, out, sizeof out);
  assert_string_equal(out, "admin+user+guest");
  assert_true(arq_auth_list_has("lab,ops", "ops"));
  assert_false(arq_auth_list_has("lab,ops", "op"));
  assert_false(arq_auth_list_has("", "lab"));
}

static int count_entry(const char *name, unsigned roles, void *ud) {
  (*(int *)ud)++;
  return strcmp(name, "nope") == 0 ? ARQ_EINVAL : 0;
}

static void test_role_entries(void **state) {
  int n = 0;
  char bad[96] = "";
  assert_int_equal(arq_role_entries("a=admin,b=user+guest", count_entry, &n, bad, sizeof bad), 0);
  assert_int_equal(n, 2);
  assert_int_equal(arq_role_entries("a=admin,b", count_entry, &n, bad, sizeof bad), ARQ_EINVAL);
  assert_string_equal(bad, "b");
  assert_int_equal(arq_role_entries("=admin", count_entry, &n, bad, sizeof bad), ARQ_EINVAL);
  assert_int_equal(arq_role_entries("x=boss", count_entry, &n, bad, sizeof bad), ARQ_EINVAL);
  assert_int_equal(arq_role_entries("nope=user", count_entry, &n, bad, sizeof bad), ARQ_EINVAL);
  assert_string_equal(bad, "nope=user");
  assert_int_equal(arq_role_entries("", count_entry, &n, bad, sizeof bad), 0);
}

static void test_api_keys(void **state) {
  char err[256] = "", why[200];
  /* Entries are checked for shape only here (test_api_key_identity checks a real key). */
  const char *keys = "# comment\n"
                     "b7d0a5b3d6de8ad7b1a8e0d6f70b8a1b7a0f0d7c6e3a2b1c0d9e8f7a6b5c4d3e:ops:admin+user\n"
                     "  \n";
  arq_auth_opts_t o = {.mode = ARQ_AUTH_API_KEY, .api_keys = keys};
  arq_auth_t *a = arq_auth_new(&o, err, sizeof err);
  assert_non_null(a);
  assert_int_equal(arq_auth_key_count(a), 1);
  arq_identity_t id;
  assert_int_equal(arq_auth_verify(a, "wrong", 5, NOW, &id, why, sizeof why), ARQ_EACCES);
  assert_string_equal(why, "unknown API key");
  assert_int_equal(arq_auth_verify(a, "", 0, NOW, &id, why, sizeof why), ARQ_EACCES);
  arq_auth_free(a);

  /* A real key: its digest computed the way a user would. */
  char line[160];
  snprintf(line, sizeof line, "%s:svc:user:service,", "ab2e8c5a4a3e0bd09a1ae8ddf5cb8b21d8d40b1fbd1a05e11a9e1b1c14e1f2f5");
  o.api_keys = line;
  a = arq_auth_new(&o, err, sizeof err);
  assert_non_null(a);
  arq_auth_free(a);

  static const struct {
    const char *keys, *error;
  } bad[] = {
      {"", "no API key"},
      {"abc:x:user", "64 hex digits"},
      {"zz2e8c5a4a3e0bd09a1ae8ddf5cb8b21d8d40b1fbd1a05e11a9e1b1c14e1f2f5:x:user", "64 hex digits"},
      {"ab2e8c5a4a3e0bd09a1ae8ddf5cb8b21d8d40b1fbd1a05e11a9e1b1c14e1f2f5:bad id:user", "client id"},
      {"ab2e8c5a4a3e0bd09a1ae8ddf5cb8b21d8d40b1fbd1a05e11a9e1b1c14e1f2f5:x:root", "roles"},
      {"ab2e8c5a4a3e0bd09a1ae8ddf5cb8b21d8d40b1fbd1a05e11a9e1b1c14e1f2f5:x:user:robot", "client type"},
      {"ab2e8c5a4a3e0bd09a1ae8ddf5cb8b21d8d40b1fbd1a05e11a9e1b1c14e1f2f5:x", "expected"},
      {"ab2e8c5a4a3e0bd09a1ae8ddf5cb8b21d8d40b1fbd1a05e11a9e1b1c14e1f2f5:x:user,"
       "ab2e8c5a4a3e0bd09a1ae8ddf5cb8b21d8d40b1fbd1a05e11a9e1b1c14e1f2f5:y:user",
       "entry 2: the same key"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    o.api_keys = bad[i].keys;
    err[0] = '\0';
    assert_null(arq_auth_new(&o, err, sizeof err));
    if (!strstr(err, bad[i].error))
      fail_msg("%s: \"%s\" does not say \"%s\"", bad[i].keys, err, bad[i].error);
  }
}

static void test_api_key_identity(void **state) {
  char err[256] = "", why[200] = "";
  arq_auth_opts_t o = {.mode = ARQ_AUTH_API_KEY};
  /* The entry holds the key's SHA-256, computed here as a user would. */
  unsigned char d[32];
  unsigned int dl = 0;
  assert_int_equal(EVP_Digest("s3cret-key", 10, d, &dl, EVP_sha256(), NULL), 1);
  char keys[200];
  size_t k = 0;
  for (int i = 0; i < 32; i++)
    k += (size_t)snprintf(keys + k, sizeof keys - k, "%02x", d[i]);
  snprintf(keys + k, sizeof keys - k, ":ingest:user+guest:ai-agent");
  o.api_keys = keys;
  arq_auth_t *a = arq_auth_new(&o, err, sizeof err);
  assert_non_null(a);
  arq_identity_t id;
  assert_int_equal(arq_auth_verify(a, "s3cret-key", 10, NOW, &id, why, sizeof why), 0);
  assert_string_equal(id.client_id, "ingest");
  assert_string_equal(id.client_type, "ai-agent");
  assert_int_equal(id.roles, ARQ_ROLE_USER | ARQ_ROLE_GUEST);
  assert_null(id.rooms);
  assert_int_equal(id.expires_ms, 0);
  arq_identity_clear(&id);
  assert_int_equal(arq_auth_verify(a, "s3cret-ke", 9, NOW, &id, why, sizeof why), ARQ_EACCES);
  assert_int_equal(arq_auth_verify(a, "s3cret-key ", 11, NOW, &id, why, sizeof why), ARQ_EACCES);
  arq_auth_free(a);
}

static void test_token_claims(void **state) {
  arq_auth_t *a = jwt_auth("bus", "me");
  arq_identity_t id;
  char why[200] = "";
  assert_int_equal(check_token(a,
                               "{\"sub\":\"alice\",\"exp\":1800000600,\"aud\":[\"x\",\"bus\"],\"iss\":\"me\","
                               "\"roles\":\"admin other\",\"rooms\":[\"lab\",\"ops\"],\"client_type\":\"service\"}",
                               &id, why),
                   0);
  assert_string_equal(id.client_id, "alice");
  assert_int_equal(id.roles, ARQ_ROLE_ADMIN);
  assert_string_equal(id.rooms, "lab,ops");
  assert_string_equal(id.client_type, "service");
  assert_int_equal(id.expires_ms, UINT64_C(1800000600000));
  arq_identity_t copy;
  arq_identity_copy(&copy, &id);
  arq_identity_clear(&id);
  assert_string_equal(copy.rooms, "lab,ops");
  arq_identity_clear(&copy);
  /* No roles claim: guest; roles it does not know: guest too. */
  assert_int_equal(check_token(a, "{\"sub\":\"b\",\"exp\":1800000600,\"aud\":\"bus\",\"iss\":\"me\"}", &id, why), 0);
  assert_int_equal(id.roles, ARQ_ROLE_GUEST);
  arq_identity_clear(&id);
  assert_int_equal(
      check_token(a, "{\"sub\":\"b\",\"exp\":1800000600,\"aud\":\"bus\",\"iss\":\"me\",\"roles\":[\"x\"]}", &id, why),
      0);
  assert_int_equal(id.roles, ARQ_ROLE_GUEST);
  arq_identity_clear(&id);
  refused(a, "{\"exp\":1800000600,\"aud\":\"bus\",\"iss\":\"me\"}", "no \"sub\"");
  refused(a, "{\"sub\":\"b\",\"aud\":\"bus\",\"iss\":\"me\"}", "no \"exp\"");
  refused(a, "{\"sub\":\"b\",\"exp\":\"soon\",\"aud\":\"bus\",\"iss\":\"me\"}", "not a date");
  refused(a, "{\"sub\":\"b\",\"exp\":1800000600,\"aud\":\"other\",\"iss\":\"me\"}", "audience");
  refused(a, "{\"sub\":\"b\",\"exp\":1800000600,\"iss\":\"me\"}", "audience");
  refused(a, "{\"sub\":\"b\",\"exp\":1800000600,\"aud\":\"bus\"}", "issuer");
  refused(a, "{\"sub\":\"b\",\"exp\":1800000600,\"aud\":\"bus\",\"iss\":\"me\",\"rooms\":[\"a:b\"]}", "rooms");
  refused(a, "{\"sub\":\"b\",\"exp\":1800000600,\"aud\":\"bus\",\"iss\":\"me\",\"roles\":[1]}", "roles");
  arq_auth_free(a);
}

static void test_token_times_at_the_leeway(void **state) {
  arq_auth_t *a = jwt_auth(NULL, NULL);
  arq_identity_t id;
  char why[200], claims[200];
  /* exp: valid while now < exp + leeway. NOW is 1800000000 s. */
  snprintf(claims, sizeof claims, "{\"sub\":\"b\",\"exp\":%d}", 1800000000 - 30 + 1);
  assert_int_equal(check_token(a, claims, &id, why), 0);
  arq_identity_clear(&id);
  snprintf(claims, sizeof claims, "{\"sub\":\"b\",\"exp\":%d}", 1800000000 - 30);
  refused(a, claims, "expired");
  /* nbf: valid once now + leeway >= nbf. */
  snprintf(claims, sizeof claims, "{\"sub\":\"b\",\"exp\":1800000600,\"nbf\":%d}", 1800000000 + 30);
  assert_int_equal(check_token(a, claims, &id, why), 0);
  arq_identity_clear(&id);
  snprintf(claims, sizeof claims, "{\"sub\":\"b\",\"exp\":1800000600,\"nbf\":%d}", 1800000000 + 31);
  refused(a, claims, "not valid yet");
  snprintf(claims, sizeof claims, "{\"sub\":\"b\",\"exp\":1800000600,\"iat\":%d}", 1800000000 + 31);
  refused(a, claims, "issued in the future");
  arq_auth_free(a);
}

static void test_token_signatures_and_headers(void **state) {
  arq_auth_t *a = jwt_auth(NULL, NULL);
  arq_identity_t id;
  char why[200] = "";
  char *t = make_token("{\"sub\":\"b\",\"exp\":1800000600}", "another-secret-of-enough-length-0123", JWT_ALG_HS256);
  assert_int_equal(arq_auth_verify(a, t, strlen(t), NOW, &id, why, sizeof why), ARQ_EACCES);
  assert_non_null(strstr(why, "signature"));
  free(t);
  t = make_token("{\"sub\":\"b\",\"exp\":1800000600}", SECRET, JWT_ALG_HS512);
  assert_int_equal(arq_auth_verify(a, t, strlen(t), NOW, &id, why, sizeof why), ARQ_EACCES);
  assert_non_null(strstr(why, "algorithm is not HS256"));
  free(t);
  /* {"alg":"none"} . {"sub":"root","exp":1800000600} . "" */
  static const char none[] = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJyb290IiwiZXhwIjoxODAwMDAwNjAwfQ.";
  assert_int_equal(arq_auth_verify(a, none, strlen(none), NOW, &id, why, sizeof why), ARQ_EACCES);
  static const char none_sig[] = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJyb290IiwiZXhwIjoxODAwMDAwNjAwfQ.eA";
  assert_int_equal(arq_auth_verify(a, none_sig, strlen(none_sig), NOW, &id, why, sizeof why), ARQ_EACCES);
  assert_non_null(strstr(why, "algorithm is not HS256"));
  static const char *const shapes[] = {"", "a", "a.b", "a.b.c.d", "!!.b.c", "e30.!!.c", "e30.e30.c"};
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
    assert_int_equal(arq_auth_verify(a, shapes[i], strlen(shapes[i]), NOW, &id, why, sizeof why), ARQ_EACCES);
  arq_auth_free(a);
}

/* A token that passed is remembered: checked again, it is answered from
 * memory (same identity), and still refused from its exp on; one that
 * failed is checked every time. */
static void test_verified_tokens_are_remembered(void **state) {
  arq_auth_t *a = jwt_auth(NULL, NULL);
  arq_identity_t id;
  char why[200] = "";
  char *t = make_token("{\"sub\":\"kim\",\"exp\":1800000600,\"roles\":[\"user\"],\"rooms\":[\"lab\"]}", SECRET,
                       JWT_ALG_HS256);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(arq_auth_verify(a, t, strlen(t), NOW, &id, why, sizeof why), 0);
    assert_string_equal(id.client_id, "kim");
    assert_int_equal(id.roles, ARQ_ROLE_USER);
    assert_string_equal(id.rooms, "lab");
    arq_identity_clear(&id);
  }
  assert_int_equal(arq_auth_remembered(a), 2);
  uint64_t after = UINT64_C(1800000600000) + LEEWAY;
  assert_int_equal(arq_auth_verify(a, t, strlen(t), after, &id, why, sizeof why), ARQ_EACCES);
  assert_string_equal(why, "the token has expired");
  assert_int_equal(arq_auth_verify(a, t, strlen(t), after - 1, &id, why, sizeof why), 0);
  arq_identity_clear(&id);
  t[strlen(t) - 1] = t[strlen(t) - 1] == 'A' ? 'B' : 'A'; /* another signature: another token */
  for (int i = 0; i < 2; i++)
    assert_int_equal(arq_auth_verify(a, t, strlen(t), NOW, &id, why, sizeof why), ARQ_EACCES);
  assert_int_equal(arq_auth_remembered(a), 3);
  free(t);
  arq_auth_free(a);
}

static void test_bad_token_settings(void **state) {
  char err[256] = "";
  arq_auth_opts_t o = {.mode = ARQ_AUTH_JWT, .jwt_alg = ARQ_JWT_HS256, .jwt_key = (const unsigned char *)"short",
                       .jwt_key_len = 5};
  assert_null(arq_auth_new(&o, err, sizeof err));
  assert_non_null(strstr(err, "at least 32 bytes"));
  o.jwt_alg = ARQ_JWT_RS256;
  o.jwt_key = (const unsigned char *)SECRET;
  o.jwt_key_len = strlen(SECRET);
  assert_null(arq_auth_new(&o, err, sizeof err));
  assert_non_null(strstr(err, "PEM public key"));
  o.jwt_key_len = 0;
  assert_null(arq_auth_new(&o, err, sizeof err));
  assert_non_null(strstr(err, "no key"));
}

static int find(const char *head, const char **cred, size_t *len, char *buf, size_t cap) {
  static arq_http_req_t req;
  arq_http_req_free(&req);
  arq_http_req_init(&req, 8192);
  size_t used;
  assert_int_equal(arq_http_req_feed(&req, head, strlen(head), &used), ARQ_OK);
  return arq_credential_find(&req, buf, cap, cred, len);
}

static void test_finding_the_credential(void **state) {
  const char *cred;
  size_t len;
  char buf[256];
  assert_int_equal(find("GET /?token=q HTTP/1.1\r\nAuthorization: bearer  abc.def \r\n\r\n", &cred, &len, buf,
                        sizeof buf),
                   ARQ_CRED_HEADER);
  assert_int_equal(len, 7);
  assert_memory_equal(cred, "abc.def", 7);
  assert_int_equal(find("GET /?token=q HTTP/1.1\r\nSec-WebSocket-Protocol: arqonbus, Bearer.t0k\r\n\r\n", &cred,
                        &len, buf, sizeof buf),
                   ARQ_CRED_PROTOCOL);
  assert_int_equal(len, 3);
  assert_memory_equal(cred, "t0k", 3);
  assert_int_equal(find("GET /?a=1&token=x%2By&b HTTP/1.1\r\nSec-WebSocket-Protocol: arqonbus\r\n\r\n", &cred, &len,
                        buf, sizeof buf),
                   ARQ_CRED_QUERY);
  assert_int_equal(len, 3);
  assert_memory_equal(cred, "x+y", 3);
  assert_int_equal(find("GET /?tokens=1 HTTP/1.1\r\n\r\n", &cred, &len, buf, sizeof buf), ARQ_CRED_NONE);
  assert_int_equal(find("GET / HTTP/1.1\r\nAuthorization: Basic eDp5\r\n\r\n", &cred, &len, buf, sizeof buf),
                   ARQ_CRED_MALFORMED);
  assert_int_equal(find("GET / HTTP/1.1\r\nAuthorization: Bearer \r\n\r\n", &cred, &len, buf, sizeof buf),
                   ARQ_CRED_MALFORMED);
  assert_int_equal(find("GET /?token=%zz HTTP/1.1\r\n\r\n", &cred, &len, buf, sizeof buf), ARQ_CRED_MALFORMED);
  assert_int_equal(find("GET /?token=%zz HTTP/1.1\r\n\r\n", &cred, &len, buf, 2), ARQ_CRED_MALFORMED);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_roles_and_lists),
      cmocka_unit_test(test_role_entries),
      cmocka_unit_test(test_api_keys),
      cmocka_unit_test(test_api_key_identity),
      cmocka_unit_test(test_token_claims),
      cmocka_unit_test(test_token_times_at_the_leeway),
      cmocka_unit_test(test_token_signatures_and_headers),
      cmocka_unit_test(test_verified_tokens_are_remembered),
      cmocka_unit_test(test_bad_token_settings),
      cmocka_unit_test(test_finding_the_credential),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
