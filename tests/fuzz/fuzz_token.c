/* libFuzzer target for credentials (auth/auth.c, auth/credential.c): API
 * keys, JSON Web Tokens and finding a credential in an upgrade request.
 *
 * The first input byte chooses what the rest is: 0, an API key checked
 * against a fixed key table; 1, a token checked with HS256 and a fixed
 * secret; anything else, an HTTP request head whose credential (header,
 * subprotocol or token= parameter) is found and then checked as a token.
 * Whatever the input, a check must end in an identity that satisfies the
 * documented invariants (a valid client id, known roles) or in a short
 * reason that never repeats the secret; never crash or leak. The clock is
 * fixed so that runs are reproducible.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth/auth.h"
#include "auth/credential.h"
#include "util/err.h"
#include "wire/http.h"

#define SECRET "fuzz-secret-0123456789abcdef-0123456789"
#define NOW_MS UINT64_C(1767225600000) /* 2026-01-01 */

static arq_auth_t *keys, *tokens;

static void check(bool ok, const char *what) {
  if (!ok) {
    fprintf(stderr, "fuzz_token: %s\n", what);
    abort();
  }
}

static void setup(void) {
  char err[256];
  /* sha256("fuzz-key") */
  arq_auth_opts_t k = {.mode = ARQ_AUTH_API_KEY,
                       .api_keys = "231e9b2f757db8d48ecd0711b60135e1cc57a3a807be9dc12638856f17a7872c:svc:user+admin:service"};
  keys = arq_auth_new(&k, err, sizeof err);
  check(keys != NULL, err);
  arq_auth_opts_t t = {.mode = ARQ_AUTH_JWT, .jwt_alg = ARQ_JWT_HS256, .jwt_key = (const unsigned char *)SECRET,
                       .jwt_key_len = sizeof SECRET - 1, .jwt_audience = "arqonbus", .leeway_ms = 30000};
  tokens = arq_auth_new(&t, err, sizeof err);
  check(tokens != NULL, err);
}

static void verify(arq_auth_t *a, const char *cred, size_t n) {
  arq_identity_t id;
  char why[256];
  why[0] = '\0';
  int rc = arq_auth_verify(a, cred, n, NOW_MS, &id, why, sizeof why);
  if (rc == 0) {
    check(arq_names_valid_client_id(id.client_id, strlen(id.client_id)), "identity with an invalid client id");
    check(id.roles != 0 && (id.roles & ~ARQ_ROLES_ALL) == 0, "identity with unknown roles");
    check(a == keys || id.expires_ms + 30000 > NOW_MS, "an expired token was accepted");
    arq_identity_clear(&id);
  } else {
    check(rc < 0 && why[0] != '\0' && strlen(why) < sizeof why, "a refusal without a reason");
    check(strstr(why, SECRET) == NULL, "the reason repeats the secret");
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!keys)
    setup();
  if (size < 1)
    return 0;
  const char *rest = (const char *)data + 1;
  size_t n = size - 1;
  if (data[0] == 0) {
    verify(keys, rest, n);
  } else if (data[0] == 1) {
    verify(tokens, rest, n);
  } else {
    arq_http_req_t req;
    arq_http_req_init(&req, 16 * 1024);
    size_t used;
    if (arq_http_req_feed(&req, rest, n, &used) == ARQ_OK) {
      char buf[ARQ_AUTH_MAX_CREDENTIAL + 1];
      const char *cred;
      size_t len;
      arq_cred_source_t src = arq_credential_find(&req, buf, sizeof buf, &cred, &len);
      if (src != ARQ_CRED_NONE && src != ARQ_CRED_MALFORMED) {
        check(cred != NULL, "a credential without bytes");
        verify(tokens, cred, len);
      }
    }
    arq_http_req_free(&req);
  }
  return 0;
}
