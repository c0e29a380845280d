/* Unit tests for redis:// URL parsing (store/redis.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "store/redis_url.h"
#include "util/err.h"

static void ok(const char *url, const char *host, int port, int db, const char *password) {
  arq_redis_url_t u;
  char err[160] = "";
  if (arq_redis_parse_url(url, &u, err, sizeof err) != 0)
    fail_msg("%s: %s", url, err);
  assert_string_equal(u.host, host);
  assert_int_equal(u.port, port);
  assert_int_equal(u.db, db);
  assert_string_equal(u.password, password);
}

static void bad(const char *url) {
  arq_redis_url_t u;
  char err[160] = "";
  assert_int_equal(arq_redis_parse_url(url, &u, err, sizeof err), ARQ_EINVAL);
  assert_true(strlen(err) > 0);
}

static void test_valid_urls(void **state) {
  ok("redis://127.0.0.1", "127.0.0.1", 6379, 0, "");
  ok("redis://localhost:6380", "localhost", 6380, 0, "");
  ok("redis://cache.internal:7000/3", "cache.internal", 7000, 3, "");
  ok("redis://:s3cret@10.0.0.5:6379/1", "10.0.0.5", 6379, 1, "s3cret");
  ok("redis://user:pw@host", "host", 6379, 0, "pw");
  ok("redis://[::1]:6390", "::1", 6390, 0, "");
  ok("redis://[::1]", "::1", 6379, 0, "");
  ok("redis://h:1/", "h", 1, 0, "");
  ok("redis://h:65535", "h", 65535, 0, "");
}

static void test_invalid_urls(void **state) {
  bad("");
  bad("http://h:6379");
  bad("redis://");
  bad("redis://:6379");
  bad("redis://h:0");
  bad("redis://h:65536");
  bad("redis://h:12x");
  bad("redis://h:");
  bad("redis://h/db");
  bad("redis://h/-1");
  bad("redis://[::1");
  char longhost[400] = "redis://";
  memset(longhost + 8, 'a', 300);
  bad(longhost);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_valid_urls),
      cmocka_unit_test(test_invalid_urls),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
