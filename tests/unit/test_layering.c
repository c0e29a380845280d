/* The layering rule of the tree: wire/ and bus/ do no I/O, so no file under
 * them may include libuv or hiredis. The arqcore library does not link them
 * either, but a header-only include would slip past the linker; this test
 * reads the sources themselves. ctest sets ARQ_SOURCE_DIR.
 *
 * The same way it checks that nothing under src/ calls hiredis' blocking
 * API (redisConnect, redisCommand, redisGetReply, ...): Redis is only ever
 * reached through the asynchronous API on the event loop.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* True when 'target' (what sits between the include's <> or "") names
 * libuv or hiredis: uv.h, uv/..., hiredis.h, hiredis/..., adapters/libuv.h. */
static bool forbidden_target(const char *target, size_t n) {
  char t[256];
  if (n >= sizeof t)
    n = sizeof t - 1;
  memcpy(t, target, n);
  t[n] = '\0';
  const char *base = strrchr(t, '/');
  base = base ? base + 1 : t;
  return strcmp(base, "uv.h") == 0 || strncmp(t, "uv/", 3) == 0 || strstr(t, "hiredis") != NULL ||
         strstr(t, "libuv") != NULL;
}

/* Returns the first line of 'text' that includes a forbidden header (its
 * number, from 1), or 0. Understands "# include" and both bracket forms. */
static int find_forbidden_include(const char *text) {
  int lineno = 0;
  const char *line = text;
  while (*line) {
    lineno++;
    const char *end = strchr(line, '\n');
    if (end == NULL)
      end = line + strlen(line);
    const char *p = line;
    while (p < end && (*p == ' ' || *p == '\t'))
      p++;
    if (p < end && *p == '#') {
      p++;
      while (p < end && (*p == ' ' || *p == '\t'))
        p++;
      if ((size_t)(end - p) > 7 && strncmp(p, "include", 7) == 0) {
        p += 7;
        while (p < end && (*p == ' ' || *p == '\t'))
          p++;
        if (p < end && (*p == '<' || *p == '"')) {
          char close = *p == '<' ? '>' : '"';
          const char *t = ++p;
          while (p < end && *p != close)
            p++;
          if (forbidden_target(t, (size_t)(p - t)))
            return lineno;
        }
      }
    }
    line = *end ? end + 1 : end;
  }
  return 0;
}

/* The blocking hiredis calls (the asynchronous ones are redisAsync...). */
static const char *const blocking_calls[] = {
    "redisConnect",     "redisConnectWithTimeout", "redisConnectNonBlock", "redisConnectUnix", "redisConnectWithOptions",
    "redisCommand",     "redisvCommand",           "redisCommandArgv",     "redisGetReply",    "redisAppendCommand",
    "redisvAppendCommand", "redisAppendCommandArgv", NULL};

static bool ident_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* Returns the line (from 1) of the first call of a blocking hiredis function
 * in 'text', or 0. A name counts when it stands alone followed by '('. */
static int find_blocking_call(const char *text) {
  for (size_t i = 0; blocking_calls[i]; i++) {
    size_t n = strlen(blocking_calls[i]);
    for (const char *p = strstr(text, blocking_calls[i]); p; p = strstr(p + 1, blocking_calls[i])) {
      if ((p > text && ident_char(p[-1])) || ident_char(p[n]))
        continue;
      const char *q = p + n;
      while (*q == ' ' || *q == '\t')
        q++;
      if (*q != '(')
        continue;
      int line = 1;
      for (const char *c = text; c < p; c++)
        line += *c == '\n';
      return line;
    }
  }
  return 0;
}

static char *read_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return NULL;
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap);
  size_t k;
  while (buf != NULL && (k = fread(buf + n, 1, cap - n - 1, f)) > 0) {
    n += k;
    if (cap - n - 1 == 0) {
      cap *= 2;
      buf = realloc(buf, cap);
    }
  }
  fclose(f);
  if (buf)
    buf[n] = '\0';
  return buf;
}

typedef int (*finder_t)(const char *text);

/* Scans every file under 'dir', recursively, with 'find'. Returns the number
 * of files read; prints and counts each violation ('what') into '*bad'. */
static int scan_dir(const char *dir, int *bad, finder_t find, const char *what) {
  DIR *d = opendir(dir);
  if (d == NULL)
    return -1;
  int files = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
      continue;
    char path[4096];
    int pn = snprintf(path, sizeof path, "%.3800s/%.255s", dir, e->d_name);
    if (pn < 0 || (size_t)pn >= sizeof path)
      continue;
    struct stat st;
    if (stat(path, &st) != 0)
      continue;
    if (S_ISDIR(st.st_mode)) {
      int sub = scan_dir(path, bad, find, what);
      if (sub > 0)
        files += sub;
      continue;
    }
    if (!S_ISREG(st.st_mode))
      continue;
    char *text = read_file(path);
    assert_non_null(text);
    files++;
    int line = find(text);
    if (line) {
      print_error("%s:%d %s\n", path, line, what);
      (*bad)++;
    }
    free(text);
  }
  closedir(d);
  return files;
}

static void test_scanner_finds_includes(void **state) {
  /* The scanner itself, so that a silent pass means something. */
  assert_int_equal(find_forbidden_include("#include <uv.h>\n"), 1);
  assert_int_equal(find_forbidden_include("int x;\n#  include \"uv.h\"\n"), 2);
  assert_int_equal(find_forbidden_include("/* c */\n\n  #include <hiredis/hiredis.h>\n"), 3);
  assert_int_equal(find_forbidden_include("#include \"hiredis.h\""), 1);
  assert_int_equal(find_forbidden_include("#include <hiredis/adapters/libuv.h>\n"), 1);
  assert_int_equal(find_forbidden_include("#include <uv/unix.h>\n"), 1);
  assert_int_equal(find_forbidden_include("#\tinclude\t<uv.h>\n"), 1);
  assert_int_equal(find_forbidden_include("#include <stdio.h>\n#include \"wire/frame.h\"\n"), 0);
  assert_int_equal(find_forbidden_include("#include \"util/uv_names.h\"\n"), 0);
  assert_int_equal(find_forbidden_include("/* never #include <uv.h> here */\n"), 0);
  assert_int_equal(find_forbidden_include(""), 0);
}

static void test_core_has_no_io_includes(void **state) {
  const char *root = getenv("ARQ_SOURCE_DIR");
  if (root == NULL || *root == '\0')
    fail_msg("ARQ_SOURCE_DIR is not set (ctest sets it to the source tree)");
  char dir[4096];
  int bad = 0;

  snprintf(dir, sizeof dir, "%s/src/wire", root);
  const char *what = "includes libuv or hiredis; wire/ and bus/ must stay free of I/O";
  int wire = scan_dir(dir, &bad, find_forbidden_include, what);
  assert_true(wire > 0); /* wire/ exists and was read */

  snprintf(dir, sizeof dir, "%s/src/bus", root);
  struct stat st;
  if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode))
    assert_true(scan_dir(dir, &bad, find_forbidden_include, what) >= 0);

  assert_int_equal(bad, 0);
}

static void test_scanner_finds_blocking_calls(void **state) {
  assert_int_equal(find_blocking_call("x = redisCommand(c, \"PING\");"), 1);
  assert_int_equal(find_blocking_call("\n\nredisConnect (\"h\", 1);"), 3);
  assert_int_equal(find_blocking_call("redisGetReply(c, &r);"), 1);
  assert_int_equal(find_blocking_call("redisAsyncCommand(ac, cb, p, \"PING\");"), 0);
  assert_int_equal(find_blocking_call("redisvAsyncCommand(ac, cb, p, f, ap);"), 0);
  assert_int_equal(find_blocking_call("redisAsyncConnect(ip, port);"), 0);
  assert_int_equal(find_blocking_call("/* not redisCommandX( */ my_redisCommand();"), 0);
}

static void test_nothing_calls_redis_synchronously(void **state) {
  const char *root = getenv("ARQ_SOURCE_DIR");
  if (root == NULL || *root == '\0')
    fail_msg("ARQ_SOURCE_DIR is not set (ctest sets it to the source tree)");
  char dir[4096];
  int bad = 0;
  snprintf(dir, sizeof dir, "%s/src", root);
  assert_true(scan_dir(dir, &bad, find_blocking_call,
                       "calls hiredis' blocking API; Redis must only be reached asynchronously on the loop") > 0);
  assert_int_equal(bad, 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_scanner_finds_includes),
      cmocka_unit_test(test_core_has_no_io_includes),
      cmocka_unit_test(test_scanner_finds_blocking_calls),
      cmocka_unit_test(test_nothing_calls_redis_synchronously),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
