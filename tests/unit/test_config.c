/* Unit tests for config: the settings table read from defaults, a YAML file,
 * ARQONBUS_* variables and flags.
 *
 * Every test goes through arq_config_load() the way main() does, with its own
 * argv and environment (never the process's), and YAML files written into a
 * mkdtemp directory. The expected names, defaults and ranges are written out
 * here by hand rather than derived from the table, so that a change to the
 * table that changes what users see fails a test.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "obs/log.h"
#include "util/err.h"

#define KIB (UINT64_C(1) << 10)
#define MIB (UINT64_C(1) << 20)
#define GIB (UINT64_C(1) << 30)

/* A NULL-terminated argv whose argv[0] is the program, and an environment. */
#define ARGV(...) ((char *[]){"arqonbus", ##__VA_ARGS__, NULL})
#define ENVP(...) ((char *[]){__VA_ARGS__, NULL})
#define NOENV ((char *[]){NULL})

#define assert_contains(hay, needle)                                                                          \
  do {                                                                                                        \
    if (strstr((hay), (needle)) == NULL)                                                                      \
      fail_msg("\"%s\" does not contain \"%s\"", (hay), (needle));                                          \
  } while (0)

/* ---- temporary files ------------------------------------------------------ */

static char tmpdir[] = "/tmp/arq-test-config-XXXXXX";
static char *written[128];
static size_t nwritten;

static int make_tmpdir(void **state) {
  return mkdtemp(tmpdir) == NULL ? -1 : 0;
}

static int remove_tmpdir(void **state) {
  for (size_t i = 0; i < nwritten; i++) {
    unlink(written[i]);
    free(written[i]);
  }
  nwritten = 0;
  return rmdir(tmpdir);
}

/* Writes 'len' bytes to 'name' in the temporary directory. Returns the path
 * (valid until the group ends). */
static char *write_bytes(const char *name, const char *data, size_t len) {
  assert_true(nwritten < sizeof written / sizeof written[0]);
  size_t cap = strlen(tmpdir) + 1 + strlen(name) + 1;
  char *path = malloc(cap);
  assert_non_null(path);
  snprintf(path, cap, "%s/%s", tmpdir, name);
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(data, 1, len, f), len);
  assert_int_equal(fclose(f), 0);
  written[nwritten++] = path;
  return path;
}

static char *write_yaml(const char *name, const char *text) {
  return write_bytes(name, text, strlen(text));
}

/* ---- loading -------------------------------------------------------------- */

typedef struct loaded {
  arq_config_t cfg;
  arq_config_action_t action;
  char err[512];
  int rc;
} loaded_t;

/* Loads defaults < 'envp' (and any file it or 'argv' names) < 'argv' into
 * 'r' and checks what holds for every outcome: on success no message, on
 * failure ARQ_EINVAL and one line that starts with "config: ". The caller
 * frees r->cfg. */
static int load(loaded_t *r, char **argv, char **envp) {
  int argc = 0;
  while (argv[argc] != NULL)
    argc++;
  arq_config_defaults(&r->cfg);
  memset(r->err, '#', sizeof r->err);
  r->action = (arq_config_action_t)-1;
  r->rc = arq_config_load(&r->cfg, argc, argv, envp, &r->action, r->err, sizeof r->err);
  assert_non_null(memchr(r->err, '\0', sizeof r->err));
  if (r->rc == 0) {
    assert_string_equal(r->err, "");
  } else {
    assert_int_equal(r->rc, ARQ_EINVAL);
    assert_true(strncmp(r->err, "config: ", 8) == 0);
    assert_true(strlen(r->err) > 8);
    assert_null(strchr(r->err, '\n'));
  }
  return r->rc;
}

/* Loads and expects success with the RUN action. */
static void load_ok(loaded_t *r, char **argv, char **envp) {
  if (load(r, argv, envp) != 0)
    fail_msg("load failed: %s", r->err);
  assert_int_equal(r->action, ARQ_CONFIG_RUN);
}

/* Loads and expects failure; returns the message (in 'r'), cfg already freed. */
static const char *load_err(loaded_t *r, char **argv, char **envp) {
  if (load(r, argv, envp) == 0)
    fail_msg("load succeeded where it should have failed");
  arq_config_free(&r->cfg);
  return r->err;
}

/* ---- defaults ------------------------------------------------------------- */

static void assert_defaults(const arq_config_t *c) {
  assert_string_equal(c->host, "127.0.0.1");
  assert_int_equal(c->port, 9100);
  assert_int_equal(c->telemetry_port, 9101);
  assert_int_equal(c->http_port, 9102);
  assert_int_equal(c->log_level, ARQ_LOG_INFO);
  assert_int_equal(c->log_format, ARQ_LOGFMT_LOGFMT);
  assert_int_equal(c->max_message_size, 1 * MIB);
  assert_int_equal(c->max_header_size, 8 * KIB);
  assert_int_equal(c->handshake_timeout_ms, 10000);
  assert_int_equal(c->heartbeat_interval_ms, 25000);
  assert_int_equal(c->heartbeat_timeout_ms, 10000);
  assert_int_equal(c->close_timeout_ms, 2000);
  assert_int_equal(c->max_connections, 10000);
  assert_int_equal(c->max_connections_per_ip, 256);
  assert_int_equal(c->rate_limit_messages, 2000);
  assert_int_equal(c->rate_limit_bytes, 16 * MIB);
  assert_int_equal(c->rate_limit_close_after, 100);
  assert_int_equal(c->max_subscriptions, 256);
  assert_int_equal(c->max_channels, 10000);
  assert_int_equal(c->max_rooms, 1000);
  assert_string_equal(c->allowed_origins, "");
  assert_int_equal(c->max_outbound_queue, 1 * MIB);
  assert_int_equal(c->write_timeout_ms, 10000);
  assert_int_equal(c->drain_timeout_ms, 5000);
  assert_int_equal(c->max_envelope_size, 512 * KIB);
  assert_int_equal(c->max_malformed, 10);
  assert_int_equal(c->history_size, 500);
  assert_int_equal(c->history_max_limit, 500);
  assert_int_equal(c->channel_ttl_ms, 300000);
  assert_string_equal(c->bootstrap_channels, "science:general,science:explore,science:hypothesize,science:design,"
                                             "science:execute,science:interpret,science:share");
  assert_string_equal(c->admins, "");
  assert_null(c->config_file);
}

static void test_defaults(void **state) {
  arq_config_t c;
  arq_config_defaults(&c);
  assert_defaults(&c);
  arq_config_free(&c);
  assert_null(c.host);
}

static void test_no_sources_keeps_defaults(void **state) {
  loaded_t r;
  load_ok(&r, ARGV(), NOENV);
  assert_defaults(&r.cfg);
  arq_config_free(&r.cfg);
  /* A NULL environment is no environment. */
  load_ok(&r, ARGV(), NULL);
  assert_defaults(&r.cfg);
  arq_config_free(&r.cfg);
}

/* Values different from every default, the same in every source. */
static void assert_all_changed(const arq_config_t *c) {
  assert_string_equal(c->host, "::1");
  assert_int_equal(c->port, 19100);
  assert_int_equal(c->telemetry_port, 19101);
  assert_int_equal(c->http_port, 19102);
  assert_int_equal(c->log_level, ARQ_LOG_DEBUG);
  assert_int_equal(c->log_format, ARQ_LOGFMT_JSON);
  assert_int_equal(c->max_message_size, 2 * MIB);
  assert_int_equal(c->max_header_size, 16 * KIB);
  assert_int_equal(c->handshake_timeout_ms, 1500);
  assert_int_equal(c->heartbeat_interval_ms, 0);
  assert_int_equal(c->heartbeat_timeout_ms, 3000);
  assert_int_equal(c->close_timeout_ms, 120000);
  assert_int_equal(c->max_connections, 42);
  assert_int_equal(c->max_outbound_queue, 4 * MIB);
  assert_int_equal(c->write_timeout_ms, 7000);
  assert_int_equal(c->drain_timeout_ms, 250);
}

/* ---- each source ---------------------------------------------------------- */

static void test_flags_with_space(void **state) {
  loaded_t r;
  load_ok(&r,
          ARGV("--host", "::1", "--port", "19100", "--telemetry-port", "19101", "--http-port", "19102", "--log-level",
               "debug", "--log-format", "json", "--max-message-size", "2MiB", "--max-header-size", "16KiB",
               "--handshake-timeout", "1500ms", "--heartbeat-interval", "0", "--heartbeat-timeout", "3s",
               "--close-timeout", "2m", "--max-connections", "42", "--max-outbound-queue", "4M", "--write-timeout",
               "7", "--drain-timeout", "250ms"),
          NOENV);
  assert_all_changed(&r.cfg);
  assert_null(r.cfg.config_file);
  arq_config_free(&r.cfg);
}

static void test_flags_with_equals(void **state) {
  loaded_t r;
  load_ok(&r,
          ARGV("--host=::1", "--port=19100", "--telemetry-port=19101", "--http-port=19102", "--log-level=debug",
               "--log-format=json", "--max-message-size=2MiB", "--max-header-size=16KiB",
               "--handshake-timeout=1500ms", "--heartbeat-interval=0", "--heartbeat-timeout=3s",
               "--close-timeout=2m", "--max-connections=42", "--max-outbound-queue=4M", "--write-timeout=7",
               "--drain-timeout=250ms"),
          NOENV);
  assert_all_changed(&r.cfg);
  arq_config_free(&r.cfg);
}

static void test_env_sets_every_setting(void **state) {
  loaded_t r;
  load_ok(&r, ARGV(),
          ENVP("PATH=/usr/bin", "ARQONBUS_HOST=::1", "ARQONBUS_PORT=19100", "ARQONBUS_TELEMETRY_PORT=19101",
               "ARQONBUS_HTTP_PORT=19102", "ARQONBUS_LOG_LEVEL=debug", "ARQONBUS_LOG_FORMAT=json",
               "ARQONBUS_MAX_MESSAGE_SIZE=2MiB", "ARQONBUS_MAX_HEADER_SIZE=16KiB",
               "ARQONBUS_HANDSHAKE_TIMEOUT=1500ms", "ARQONBUS_HEARTBEAT_INTERVAL=0",
               "ARQONBUS_HEARTBEAT_TIMEOUT=3s", "ARQONBUS_CLOSE_TIMEOUT=2m", "ARQONBUS_MAX_CONNECTIONS=42",
               "ARQONBUS_MAX_OUTBOUND_QUEUE=4M", "ARQONBUS_WRITE_TIMEOUT=7", "ARQONBUS_DRAIN_TIMEOUT=250ms",
               "HOME=/root"));
  assert_all_changed(&r.cfg);
  assert_null(r.cfg.config_file);
  arq_config_free(&r.cfg);
}

static const char every_key_yaml[] = "# every setting\n"
                                     "host: '::1'\n"
                                     "port: 19100\n"
                                     "telemetry_port: \"19101\"\n"
                                     "http_port: 19102\n"
                                     "log_level: debug\n"
                                     "log_format: json\n"
                                     "max_message_size: 2MiB\n"
                                     "max_header_size: 16KiB\n"
                                     "handshake_timeout: 1500ms\n"
                                     "heartbeat_interval: 0\n"
                                     "heartbeat_timeout: 3s\n"
                                     "close_timeout: 2m\n"
                                     "max_connections: 42\n"
                                     "max_outbound_queue: 4M\n"
                                     "write_timeout: 7\n"
                                     "drain_timeout: 250ms\n";

static void test_file_sets_every_setting(void **state) {
  loaded_t r;
  char *path = write_yaml("every.yaml", every_key_yaml);
  load_ok(&r, ARGV("--config", path), NOENV);
  assert_all_changed(&r.cfg);
  assert_string_equal(r.cfg.config_file, path);
  arq_config_free(&r.cfg);

  char flag[512];
  snprintf(flag, sizeof flag, "--config=%s", path);
  load_ok(&r, ARGV(flag), NOENV);
  assert_all_changed(&r.cfg);
  assert_string_equal(r.cfg.config_file, path);
  arq_config_free(&r.cfg);
}

static void test_file_named_by_env(void **state) {
  loaded_t r;
  char *path = write_yaml("by-env.yaml", "port: 19200\n");
  char *other = write_yaml("by-flag.yaml", "port: 19300\n");
  char var[512];
  snprintf(var, sizeof var, "ARQONBUS_CONFIG=%s", path);
  load_ok(&r, ARGV(), ENVP(var));
  assert_int_equal(r.cfg.port, 19200);
  assert_string_equal(r.cfg.config_file, path);
  arq_config_free(&r.cfg);

  /* --config names the file when both do. */
  load_ok(&r, ARGV("--config", other), ENVP(var));
  assert_int_equal(r.cfg.port, 19300);
  assert_string_equal(r.cfg.config_file, other);
  arq_config_free(&r.cfg);

  /* The last --config wins. */
  load_ok(&r, ARGV("--config", other, "--config", path), NOENV);
  assert_int_equal(r.cfg.port, 19200);
  arq_config_free(&r.cfg);
}

static void test_empty_files_keep_defaults(void **state) {
  static const char *const texts[] = {"", "# only a comment\n\n", "---\n", "---\n...\n", "~\n", "null\n"};
  char name[32];
  for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
    loaded_t r;
    snprintf(name, sizeof name, "empty-%zu.yaml", i);
    char *path = write_yaml(name, texts[i]);
    load_ok(&r, ARGV("--config", path), NOENV);
    assert_int_equal(r.cfg.port, 9100);
    assert_string_equal(r.cfg.host, "127.0.0.1");
    assert_string_equal(r.cfg.config_file, path);
    arq_config_free(&r.cfg);
  }
}

static void test_yaml_quoting_and_flow_style(void **state) {
  loaded_t r;
  char *path = write_yaml("flow.yaml", "{port: '19100', log_level: \"WARN\", host: 0.0.0.0}\n");
  load_ok(&r, ARGV("--config", path), NOENV);
  assert_int_equal(r.cfg.port, 19100);
  assert_int_equal(r.cfg.log_level, ARQ_LOG_WARN);
  assert_string_equal(r.cfg.host, "0.0.0.0");
  arq_config_free(&r.cfg);
}

/* ---- precedence ----------------------------------------------------------- */

static void test_precedence_file_env_flag(void **state) {
  loaded_t r;
  char *path = write_yaml("prec.yaml", "port: 11000\n"
                                       "telemetry_port: 11001\n"
                                       "http_port: 11002\n"
                                       "log_level: error\n"
                                       "host: 10.0.0.1\n");
  char var[512];
  snprintf(var, sizeof var, "ARQONBUS_CONFIG=%s", path);

  /* The file alone. */
  load_ok(&r, ARGV(), ENVP(var));
  assert_int_equal(r.cfg.port, 11000);
  assert_int_equal(r.cfg.telemetry_port, 11001);
  assert_int_equal(r.cfg.http_port, 11002);
  assert_int_equal(r.cfg.log_level, ARQ_LOG_ERROR);
  assert_string_equal(r.cfg.host, "10.0.0.1");
  arq_config_free(&r.cfg);

  /* The environment over the file, key by key; the order of envp does not
   * matter. */
  load_ok(&r, ARGV(), ENVP("ARQONBUS_PORT=12000", var, "ARQONBUS_LOG_LEVEL=warn", "ARQONBUS_HOST=10.0.0.2"));
  assert_int_equal(r.cfg.port, 12000);
  assert_int_equal(r.cfg.telemetry_port, 11001);
  assert_int_equal(r.cfg.log_level, ARQ_LOG_WARN);
  assert_string_equal(r.cfg.host, "10.0.0.2");
  arq_config_free(&r.cfg);

  /* Flags over both, wherever they stand relative to --config. */
  load_ok(&r, ARGV("--port", "13000", "--config", path, "--host=10.0.0.3"),
          ENVP("ARQONBUS_PORT=12000", "ARQONBUS_LOG_LEVEL=warn", "ARQONBUS_HOST=10.0.0.2"));
  assert_int_equal(r.cfg.port, 13000);
  assert_int_equal(r.cfg.telemetry_port, 11001);
  assert_int_equal(r.cfg.http_port, 11002);
  assert_int_equal(r.cfg.log_level, ARQ_LOG_WARN);
  assert_string_equal(r.cfg.host, "10.0.0.3");
  arq_config_free(&r.cfg);

  /* A flag over the default without any file or variable. */
  load_ok(&r, ARGV("--log-level", "off"), NOENV);
  assert_int_equal(r.cfg.log_level, ARQ_LOG_OFF);
  arq_config_free(&r.cfg);
}

static void test_last_flag_wins(void **state) {
  loaded_t r;
  load_ok(&r, ARGV("--port", "12000", "--port=12001", "--host", "10.0.0.1", "--host", "10.0.0.2"), NOENV);
  assert_int_equal(r.cfg.port, 12001);
  assert_string_equal(r.cfg.host, "10.0.0.2");
  arq_config_free(&r.cfg);
}

/* The cross-field checks see the final values, not each source's. */
static void test_combination_checked_after_all_sources(void **state) {
  loaded_t r;
  char *path = write_yaml("clash.yaml", "port: 9101\n"); /* the default telemetry_port */
  load_ok(&r, ARGV("--config", path, "--telemetry-port", "9200"), NOENV);
  assert_int_equal(r.cfg.port, 9101);
  assert_int_equal(r.cfg.telemetry_port, 9200);
  arq_config_free(&r.cfg);
  assert_string_equal(load_err(&r, ARGV("--config", path), NOENV),
                      "config: port and telemetry_port are both 9101; the three ports must differ");
}

/* ---- unknown names -------------------------------------------------------- */

static void test_unknown_flag(void **state) {
  loaded_t r;
  assert_string_equal(load_err(&r, ARGV("--nope"), NOENV), "config: unknown flag '--nope' (see --help)");
  /* The value is not part of the name. */
  assert_string_equal(load_err(&r, ARGV("--port", "9200", "--nope=1"), NOENV),
                      "config: unknown flag '--nope' (see --help)");
  /* Flags spell the key with dashes only; single-dash forms are not flags. */
  assert_string_equal(load_err(&r, ARGV("--telemetry_port", "9200"), NOENV),
                      "config: unknown flag '--telemetry_port' (see --help)");
  assert_string_equal(load_err(&r, ARGV("-port", "9200"), NOENV), "config: unknown flag '-port' (see --help)");
  assert_string_equal(load_err(&r, ARGV("--PORT", "9200"), NOENV), "config: unknown flag '--PORT' (see --help)");
  assert_string_equal(load_err(&r, ARGV("--"), NOENV), "config: unknown flag '--' (see --help)");
}

static void test_bad_flag_shapes(void **state) {
  loaded_t r;
  assert_string_equal(load_err(&r, ARGV("--port"), NOENV), "config: flag --port needs a value");
  assert_string_equal(load_err(&r, ARGV("--port", "--host", "::1"), NOENV), "config: flag --port needs a value");
  assert_string_equal(load_err(&r, ARGV("--config"), NOENV), "config: flag --config needs a value");
  assert_string_equal(load_err(&r, ARGV("9100"), NOENV),
                      "config: unexpected argument '9100' (settings are flags, e.g. --port 9100)");
  assert_string_equal(load_err(&r, ARGV("--port", "9200", "9300"), NOENV),
                      "config: unexpected argument '9300' (settings are flags, e.g. --port 9100)");
  assert_string_equal(load_err(&r, ARGV("-"), NOENV),
                      "config: unexpected argument '-' (settings are flags, e.g. --port 9100)");
  assert_string_equal(load_err(&r, ARGV("--help=yes"), NOENV), "config: flag --help takes no value");
  assert_string_equal(load_err(&r, ARGV("--version=1"), NOENV), "config: flag --version takes no value");
  assert_string_equal(load_err(&r, ARGV("--config="), NOENV),
                      "config: invalid value '' for --config: expected a file name");
  assert_string_equal(load_err(&r, ARGV(), ENVP("ARQONBUS_CONFIG=")),
                      "config: invalid value '' for ARQONBUS_CONFIG: expected a file name");
}

static void test_unknown_env(void **state) {
  loaded_t r;
  assert_string_equal(load_err(&r, ARGV(), ENVP("HOME=/root", "ARQONBUS_NOPE=1")),
                      "config: unknown environment variable ARQONBUS_NOPE");
  /* Even an empty value, and even when a flag sets the setting it resembles. */
  assert_string_equal(load_err(&r, ARGV("--port", "9200"), ENVP("ARQONBUS_PROT=")),
                      "config: unknown environment variable ARQONBUS_PROT");
  /* Variables take the key in upper case only. */
  assert_string_equal(load_err(&r, ARGV(), ENVP("ARQONBUS_port=9200")),
                      "config: unknown environment variable ARQONBUS_port");
  assert_string_equal(load_err(&r, ARGV(), ENVP("ARQONBUS_=1")), "config: unknown environment variable ARQONBUS_");
}

static void test_other_env_ignored(void **state) {
  loaded_t r;
  load_ok(&r, ARGV(), ENVP("arqonbus_port=1", "ARQONBUS=1", "ARQONBUSPORT=1", "XARQONBUS_PORT=1", "ARQONBUS_NOEQUALS"));
  assert_defaults(&r.cfg);
  arq_config_free(&r.cfg);
}

static void test_unknown_key_in_file(void **state) {
  loaded_t r;
  char *path = write_yaml("unknown.yaml", "port: 9200\n"
                                          "# a comment\n"
                                          "nope: 1\n");
  char want[600];
  snprintf(want, sizeof want, "config: unknown key 'nope' in %s (line 3)", path);
  assert_string_equal(load_err(&r, ARGV("--config", path), NOENV), want);

  /* The key of a file is the setting's key, not its flag or variable. */
  path = write_yaml("flagkey.yaml", "telemetry-port: 9200\n");
  snprintf(want, sizeof want, "config: unknown key 'telemetry-port' in %s (line 1)", path);
  assert_string_equal(load_err(&r, ARGV("--config", path), NOENV), want);
  path = write_yaml("upperkey.yaml", "\n\nPORT: 9200\n");
  snprintf(want, sizeof want, "config: unknown key 'PORT' in %s (line 3)", path);
  assert_string_equal(load_err(&r, ARGV("--config", path), NOENV), want);
}

/* ---- bad values ----------------------------------------------------------- */

#define SIZE_UNITS " (a number of bytes, or with B, KiB, MiB, GiB)"
#define DURATION_UNITS " (a number with ms, s or m; a bare number is seconds)"

typedef struct bad_value {
  const char *key, *value, *expected;
} bad_value_t;

static const bad_value_t bad_values[] = {
    {"port", "abc", "a port number 1-65535"},
    {"port", "0", "a port number 1-65535"},
    {"port", "65536", "a port number 1-65535"},
    {"port", "-1", "a port number 1-65535"},
    {"port", "", "a port number 1-65535"},
    {"port", " 9200", "a port number 1-65535"},
    {"port", "9200.0", "a port number 1-65535"},
    {"port", "18446744073709551617", "a port number 1-65535"},
    {"telemetry_port", "1k", "a port number 1-65535"},
    {"http_port", "99999", "a port number 1-65535"},
    {"host", "localhost", "an IPv4 or IPv6 address"},
    {"host", "1.2.3.4.5", "an IPv4 or IPv6 address"},
    {"host", "fe80::1%", "an IPv4 or IPv6 address"},
    {"log_level", "loud", "debug, info, warn, error or off"},
    {"log_level", "", "debug, info, warn, error or off"},
    {"log_format", "xml", "logfmt or json"},
    {"max_message_size", "big", "a size 125B-64MiB" SIZE_UNITS},
    {"max_message_size", "124", "a size 125B-64MiB" SIZE_UNITS},
    {"max_message_size", "67108865", "a size 125B-64MiB" SIZE_UNITS},
    {"max_message_size", "65MiB", "a size 125B-64MiB" SIZE_UNITS},
    {"max_message_size", "1MB", "a size 125B-64MiB" SIZE_UNITS},
    {"max_message_size", "1kib", "a size 125B-64MiB" SIZE_UNITS},
    {"max_message_size", "1 MiB", "a size 125B-64MiB" SIZE_UNITS},
    {"max_message_size", "1.5MiB", "a size 125B-64MiB" SIZE_UNITS},
    {"max_message_size", "MiB", "a size 125B-64MiB" SIZE_UNITS},
    {"max_message_size", "17179869184GiB", "a size 125B-64MiB" SIZE_UNITS},
    {"max_header_size", "1023", "a size 1KiB-64KiB" SIZE_UNITS},
    {"max_header_size", "65537", "a size 1KiB-64KiB" SIZE_UNITS},
    {"max_outbound_queue", "65535", "a size 64KiB-1GiB" SIZE_UNITS},
    {"max_outbound_queue", "2G", "a size 64KiB-1GiB" SIZE_UNITS},
    {"handshake_timeout", "0", "a duration 1ms-60m" DURATION_UNITS},
    {"handshake_timeout", "0ms", "a duration 1ms-60m" DURATION_UNITS},
    {"handshake_timeout", "10h", "a duration 1ms-60m" DURATION_UNITS},
    {"handshake_timeout", "1.5s", "a duration 1ms-60m" DURATION_UNITS},
    {"handshake_timeout", "-1s", "a duration 1ms-60m" DURATION_UNITS},
    {"handshake_timeout", "s", "a duration 1ms-60m" DURATION_UNITS},
    {"handshake_timeout", "10S", "a duration 1ms-60m" DURATION_UNITS},
    {"heartbeat_interval", "61m", "a duration 0-60m" DURATION_UNITS},
    {"heartbeat_interval", "3601", "a duration 0-60m" DURATION_UNITS},
    {"heartbeat_timeout", "3600001ms", "a duration 0-60m" DURATION_UNITS},
    {"close_timeout", "soon", "a duration 0-60m" DURATION_UNITS},
    {"write_timeout", "0s", "a duration 1ms-60m" DURATION_UNITS},
    {"drain_timeout", "1d", "a duration 0-60m" DURATION_UNITS},
    {"max_connections", "0", "a whole number 1-1000000"},
    {"max_connections", "1000001", "a whole number 1-1000000"},
    {"max_connections", "10k", "a whole number 1-1000000"},
};

/* Writes the flag ('env' false) or variable name of 'key'. */
static void name_of(const char *key, bool env, char *buf, size_t cap) {
  size_t n = (size_t)snprintf(buf, cap, "%s", env ? "ARQONBUS_" : "--");
  for (const char *k = key; *k != '\0' && n + 1 < cap; k++)
    buf[n++] = env ? (char)(*k >= 'a' && *k <= 'z' ? *k - 'a' + 'A' : *k) : *k == '_' ? '-' : *k;
  buf[n] = '\0';
}

static void test_bad_values_name_key_in_every_source(void **state) {
  char flag[64], flag_eq[128], var[700], origin[600], yaml[256], name[32], want[1024];
  for (size_t i = 0; i < sizeof bad_values / sizeof bad_values[0]; i++) {
    const bad_value_t *b = &bad_values[i];
    loaded_t r;

    name_of(b->key, false, flag, sizeof flag);
    snprintf(want, sizeof want, "config: invalid value '%s' for %s (%s): expected %s", b->value, b->key, flag,
             b->expected);
    assert_string_equal(load_err(&r, ARGV(flag, (char *)b->value), NOENV), want);
    snprintf(flag_eq, sizeof flag_eq, "%s=%s", flag, b->value);
    assert_string_equal(load_err(&r, ARGV(flag_eq), NOENV), want);

    name_of(b->key, true, origin, sizeof origin);
    snprintf(var, sizeof var, "%s=%s", origin, b->value);
    snprintf(want, sizeof want, "config: invalid value '%s' for %s (%s): expected %s", b->value, b->key, origin,
             b->expected);
    assert_string_equal(load_err(&r, ARGV(), ENVP(var)), want);

    /* Single quotes keep the text exactly as it is (none of the values holds
     * a quote); the bad value stands on line 2. */
    snprintf(name, sizeof name, "bad-%zu.yaml", i);
    snprintf(yaml, sizeof yaml, "# line 1\n%s: '%s'\n", b->key, b->value);
    char *path = write_yaml(name, yaml);
    snprintf(origin, sizeof origin, "%s:2", path);
    snprintf(want, sizeof want, "config: invalid value '%s' for %s (%s): expected %s", b->value, b->key, origin,
             b->expected);
    assert_string_equal(load_err(&r, ARGV("--config", path), NOENV), want);
  }
}

static void test_null_yaml_value_is_empty(void **state) {
  loaded_t r;
  char *path = write_yaml("null-value.yaml", "port:\n");
  char want[600];
  snprintf(want, sizeof want, "config: invalid value '' for port (%s:1): expected a port number 1-65535", path);
  assert_string_equal(load_err(&r, ARGV("--config", path), NOENV), want);
}

/* Whatever a user passes, the message stays one line of bounded length. */
static void test_error_text_is_one_bounded_line(void **state) {
  loaded_t r;
  const char *err = load_err(&r, ARGV("--log-level", "de\nbug\t\x7f"), NOENV);
  assert_string_equal(err, "config: invalid value 'de?bug?" "?' for log_level (--log-level): expected debug, info, "
                           "warn, error or off");

  char big[2000];
  memset(big, 'x', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  err = load_err(&r, ARGV("--port", big), NOENV);
  assert_contains(err, "xxx...' for port (--port)");
  assert_true(strlen(err) < 300);

  char longflag[200] = "--";
  memset(longflag + 2, 'y', sizeof longflag - 3);
  longflag[sizeof longflag - 1] = '\0';
  err = load_err(&r, ARGV(longflag), NOENV);
  assert_contains(err, "config: unknown flag '--yyy");
  assert_contains(err, "...' (see --help)");

  /* A small buffer gets a cut, terminated message. */
  arq_config_t c;
  arq_config_action_t action;
  char small[24];
  arq_config_defaults(&c);
  assert_int_equal(arq_config_load(&c, 2, ARGV("--nope"), NOENV, &action, small, sizeof small), ARQ_EINVAL);
  assert_int_equal(strlen(small), sizeof small - 1);
  assert_true(strncmp(small, "config: unknown flag '-", sizeof small - 1) == 0);
  arq_config_free(&c);
}

/* ---- cross-field checks --------------------------------------------------- */

static void test_equal_ports_refused(void **state) {
  loaded_t r;
  assert_string_equal(load_err(&r, ARGV("--port", "9101"), NOENV),
                      "config: port and telemetry_port are both 9101; the three ports must differ");
  assert_string_equal(load_err(&r, ARGV("--http-port", "9100"), NOENV),
                      "config: port and http_port are both 9100; the three ports must differ");
  assert_string_equal(load_err(&r, ARGV(), ENVP("ARQONBUS_TELEMETRY_PORT=9102")),
                      "config: telemetry_port and http_port are both 9102; the three ports must differ");
  /* Three distinct ports are fine, whatever their order. */
  loaded_t ok;
  load_ok(&ok, ARGV("--port", "9102", "--telemetry-port", "9100", "--http-port", "9101"), NOENV);
  arq_config_free(&ok.cfg);
}

static void test_heartbeat_timeout_needs_interval_off(void **state) {
  loaded_t r;
  assert_string_equal(load_err(&r, ARGV("--heartbeat-timeout", "0"), NOENV),
                      "config: heartbeat_timeout must be above 0 while heartbeat_interval is set "
                      "(set heartbeat_interval to 0 to disable pings)");
  load_ok(&r, ARGV("--heartbeat-timeout", "0", "--heartbeat-interval", "0"), NOENV);
  assert_int_equal(r.cfg.heartbeat_interval_ms, 0);
  assert_int_equal(r.cfg.heartbeat_timeout_ms, 0);
  arq_config_free(&r.cfg);
}

static void test_tls_settings(void **state) {
  loaded_t r;
  char *cert = write_yaml("tls-cert.pem", "cert\n");
  char *key = write_yaml("tls-key.pem", "key\n");
  load_ok(&r, ARGV(), NOENV);
  assert_string_equal(r.cfg.tls_cert, "");
  assert_string_equal(r.cfg.tls_key, "");
  assert_int_equal(r.cfg.tls_min_version, ARQ_TLS_1_2);
  arq_config_free(&r.cfg);
  /* Both or neither: which one is missing is named. */
  assert_string_equal(load_err(&r, ARGV("--tls-cert", cert), NOENV),
                      "config: tls_cert and tls_key go together: tls_cert is set but tls_key is empty "
                      "(set both for TLS, neither for plaintext)");
  assert_string_equal(load_err(&r, ARGV(), ENVP("ARQONBUS_TLS_KEY=x")),
                      "config: cannot read 'x' for tls_key (ARQONBUS_TLS_KEY): No such file or directory");
  assert_string_equal(load_err(&r, ARGV("--tls-key", key), NOENV),
                      "config: tls_cert and tls_key go together: tls_key is set but tls_cert is empty "
                      "(set both for TLS, neither for plaintext)");
  load_ok(&r, ARGV("--tls-cert", cert, "--tls-key", key, "--tls-min-version", "1.3"), NOENV);
  assert_string_equal(r.cfg.tls_cert, cert);
  assert_string_equal(r.cfg.tls_key, key);
  assert_int_equal(r.cfg.tls_min_version, ARQ_TLS_1_3);
  arq_config_free(&r.cfg);
  static char *const bad[] = {"1.1", "1.0", "1", "1.30", "TLSv1.3", " 1.2", ""};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    const char *err = load_err(&r, ARGV("--tls-min-version", bad[i]), NOENV);
    if (!strstr(err, "for tls_min_version (--tls-min-version): expected 1.2 or 1.3"))
      fail_msg("%s: %s", bad[i], err);
  }
}

static void test_fixed_channels_must_fit(void **state) {
  loaded_t r;
  /* Duplicates count once, and rooms are counted apart from channels. */
  char *fixed[] = {"--bootstrap-channels", "a:x,a:x,b:y,a:z", "--telemetry-channel", "b:y", "--dashboard-channel",
                   "c:w"};
  load_ok(&r, ARGV(fixed[0], fixed[1], fixed[2], fixed[3], fixed[4], fixed[5], "--max-channels", "4", "--max-rooms",
                   "3"),
          NOENV);
  arq_config_free(&r.cfg);
  assert_string_equal(load_err(&r, ARGV(fixed[0], fixed[1], fixed[2], fixed[3], fixed[4], fixed[5], "--max-channels",
                                        "3"),
                               NOENV),
                      "config: the bootstrap, telemetry and dashboard channels (4 channels in 3 rooms) do not fit "
                      "max_channels 3 and max_rooms 1000");
  assert_string_equal(load_err(&r, ARGV(fixed[0], fixed[1], fixed[2], fixed[3], fixed[4], fixed[5], "--max-rooms",
                                        "2"),
                               NOENV),
                      "config: the bootstrap, telemetry and dashboard channels (4 channels in 3 rooms) do not fit "
                      "max_channels 10000 and max_rooms 2");
  /* Empty telemetry and dashboard channels are none. */
  load_ok(&r, ARGV("--bootstrap-channels", "", "--telemetry-channel", "", "--dashboard-channel", "", "--max-channels",
                   "1", "--max-rooms", "1"),
          NOENV);
  arq_config_free(&r.cfg);
}

static void test_allowed_origins(void **state) {
  loaded_t r;
  load_ok(&r, ARGV("--allowed-origins", "https://app.example, http://[::1]:8080,null,*"), NOENV);
  assert_string_equal(r.cfg.allowed_origins, "https://app.example,http://[::1]:8080,null,*");
  arq_config_free(&r.cfg);
  assert_string_equal(load_err(&r, ARGV("--allowed-origins", "https://app.example/"), NOENV),
                      "config: invalid item 'https://app.example/' in allowed_origins: expected "
                      "scheme://host[:port] (no path), null or *");
  assert_string_equal(load_err(&r, ARGV(), ENVP("ARQONBUS_ALLOWED_ORIGINS=http://a,app.example")),
                      "config: invalid item 'app.example' in allowed_origins: expected scheme://host[:port] (no "
                      "path), null or *");
}

/* ---- value syntax --------------------------------------------------------- */

static void test_size_units(void **state) {
  static const struct {
    const char *key, *text;
    uint64_t bytes;
  } cases[] = {
      {"max-message-size", "125", 125},          /* the minimum, inclusive */
      {"max-message-size", "125B", 125},
      {"max-message-size", "4096", 4096},
      {"max-message-size", "2KiB", 2 * KIB},
      {"max-message-size", "2k", 2 * KIB},
      {"max-message-size", "2K", 2 * KIB},
      {"max-message-size", "3MiB", 3 * MIB},
      {"max-message-size", "3M", 3 * MIB},
      {"max-message-size", "64MiB", 64 * MIB}, /* the maximum, inclusive */
      {"max-message-size", "67108864", 64 * MIB},
      {"max-message-size", "0003MiB", 3 * MIB},
      {"max-header-size", "1KiB", 1 * KIB},
      {"max-header-size", "1024B", 1 * KIB},
      {"max-header-size", "64KiB", 64 * KIB},
      {"max-outbound-queue", "64KiB", 64 * KIB},
      {"max-outbound-queue", "1GiB", 1 * GIB},
      {"max-outbound-queue", "1G", 1 * GIB},
      {"max-outbound-queue", "1073741824", 1 * GIB},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char flag[64];
    loaded_t r;
    snprintf(flag, sizeof flag, "--%s=%s", cases[i].key, cases[i].text);
    load_ok(&r, ARGV(flag), NOENV);
    uint64_t got = strcmp(cases[i].key, "max-message-size") == 0  ? r.cfg.max_message_size
                   : strcmp(cases[i].key, "max-header-size") == 0 ? r.cfg.max_header_size
                                                                   : r.cfg.max_outbound_queue;
    if (got != cases[i].bytes)
      fail_msg("%s read as %llu bytes, want %llu", flag, (unsigned long long)got,
               (unsigned long long)cases[i].bytes);
    arq_config_free(&r.cfg);
  }
}

static void test_duration_units(void **state) {
  static const struct {
    const char *key, *text;
    uint64_t ms;
  } cases[] = {
      {"handshake-timeout", "1ms", 1}, /* the minimum, inclusive */
      {"handshake-timeout", "250ms", 250},
      {"handshake-timeout", "3s", 3000},
      {"handshake-timeout", "7", 7000}, /* a bare number is seconds */
      {"handshake-timeout", "2m", 120000},
      {"handshake-timeout", "60m", 3600000}, /* the maximum, inclusive */
      {"handshake-timeout", "3600", 3600000},
      {"handshake-timeout", "3600000ms", 3600000},
      {"heartbeat-interval", "0", 0},
      {"heartbeat-interval", "0s", 0},
      {"heartbeat-interval", "0ms", 0},
      {"close-timeout", "0m", 0},
      {"drain-timeout", "90s", 90000},
      {"write-timeout", "1500ms", 1500},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char flag[64];
    loaded_t r;
    snprintf(flag, sizeof flag, "--%s=%s", cases[i].key, cases[i].text);
    load_ok(&r, ARGV(flag), NOENV);
    const char *k = cases[i].key;
    uint64_t got = strcmp(k, "handshake-timeout") == 0    ? r.cfg.handshake_timeout_ms
                   : strcmp(k, "heartbeat-interval") == 0 ? r.cfg.heartbeat_interval_ms
                   : strcmp(k, "close-timeout") == 0      ? r.cfg.close_timeout_ms
                   : strcmp(k, "drain-timeout") == 0      ? r.cfg.drain_timeout_ms
                                                          : r.cfg.write_timeout_ms;
    if (got != cases[i].ms)
      fail_msg("%s read as %llu ms, want %llu", flag, (unsigned long long)got, (unsigned long long)cases[i].ms);
    arq_config_free(&r.cfg);
  }
}

static void test_port_bounds(void **state) {
  loaded_t r;
  load_ok(&r, ARGV("--port", "1", "--telemetry-port", "65535", "--http-port", "09200"), NOENV);
  assert_int_equal(r.cfg.port, 1);
  assert_int_equal(r.cfg.telemetry_port, 65535);
  assert_int_equal(r.cfg.http_port, 9200);
  arq_config_free(&r.cfg);
  load_ok(&r, ARGV("--max-connections", "1"), NOENV);
  assert_int_equal(r.cfg.max_connections, 1);
  arq_config_free(&r.cfg);
  load_ok(&r, ARGV("--max-connections", "1000000"), NOENV);
  assert_int_equal(r.cfg.max_connections, 1000000);
  arq_config_free(&r.cfg);
}

static void test_log_words(void **state) {
  static const struct {
    const char *text;
    int level;
  } levels[] = {{"debug", ARQ_LOG_DEBUG}, {"info", ARQ_LOG_INFO},   {"warn", ARQ_LOG_WARN},
                {"warning", ARQ_LOG_WARN}, {"error", ARQ_LOG_ERROR}, {"off", ARQ_LOG_OFF},
                {"DEBUG", ARQ_LOG_DEBUG},  {"Error", ARQ_LOG_ERROR}};
  for (size_t i = 0; i < sizeof levels / sizeof levels[0]; i++) {
    loaded_t r;
    load_ok(&r, ARGV("--log-level", (char *)levels[i].text), NOENV);
    assert_int_equal(r.cfg.log_level, levels[i].level);
    arq_config_free(&r.cfg);
  }
  loaded_t r;
  load_ok(&r, ARGV("--log-format", "JSON"), NOENV);
  assert_int_equal(r.cfg.log_format, ARQ_LOGFMT_JSON);
  arq_config_free(&r.cfg);
  load_ok(&r, ARGV("--log-format", "json", "--log-format", "logfmt"), NOENV);
  assert_int_equal(r.cfg.log_format, ARQ_LOGFMT_LOGFMT);
  arq_config_free(&r.cfg);
}

static void test_addresses(void **state) {
  static const char *const good[] = {"0.0.0.0", "::", "::1", "192.168.1.20", "fe80::1%eth0", "2001:db8::42"};
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    loaded_t r;
    load_ok(&r, ARGV("--host", (char *)good[i]), NOENV);
    assert_string_equal(r.cfg.host, good[i]);
    arq_config_free(&r.cfg);
  }
}

/* ---- --help and --version ------------------------------------------------- */

static void test_help_and_version_actions(void **state) {
  loaded_t r;
  assert_int_equal(load(&r, ARGV("--help"), NOENV), 0);
  assert_int_equal(r.action, ARQ_CONFIG_HELP);
  arq_config_free(&r.cfg);
  assert_int_equal(load(&r, ARGV("-h"), NOENV), 0);
  assert_int_equal(r.action, ARQ_CONFIG_HELP);
  arq_config_free(&r.cfg);
  assert_int_equal(load(&r, ARGV("--version"), NOENV), 0);
  assert_int_equal(r.action, ARQ_CONFIG_VERSION);
  arq_config_free(&r.cfg);
  assert_int_equal(load(&r, ARGV("-V"), NOENV), 0);
  assert_int_equal(r.action, ARQ_CONFIG_VERSION);
  arq_config_free(&r.cfg);

  /* They answer even when the rest would not load, and the first one wins. */
  assert_int_equal(load(&r, ARGV("--nope", "--port", "0", "stray", "--version", "--help"),
                        ENVP("ARQONBUS_NOPE=1", "ARQONBUS_CONFIG=/nonexistent/arqonbus.yaml")),
                   0);
  assert_int_equal(r.action, ARQ_CONFIG_VERSION);
  arq_config_free(&r.cfg);
  assert_int_equal(load(&r, ARGV("--port", "--help"), NOENV), 0);
  assert_int_equal(r.action, ARQ_CONFIG_HELP);
  arq_config_free(&r.cfg);

  /* A flag's value is not a flag, even when it reads like one. */
  assert_string_equal(load_err(&r, ARGV("--log-level", "-h"), NOENV),
                      "config: invalid value '-h' for log_level (--log-level): expected debug, info, warn, error or "
                      "off");
}

static void test_usage_lists_every_setting(void **state) {
  static const char *const rows[][3] = {
      {"--host ADDR", "ARQONBUS_HOST", "default 127.0.0.1\n"},
      {"--port PORT", "ARQONBUS_PORT", "default 9100, range 1-65535\n"},
      {"--telemetry-port PORT", "ARQONBUS_TELEMETRY_PORT", "default 9101, range 1-65535\n"},
      {"--http-port PORT", "ARQONBUS_HTTP_PORT", "default 9102, range 1-65535\n"},
      {"--log-level LEVEL", "ARQONBUS_LOG_LEVEL", "default info\n"},
      {"--log-format FORMAT", "ARQONBUS_LOG_FORMAT", "default logfmt\n"},
      {"--max-message-size SIZE", "ARQONBUS_MAX_MESSAGE_SIZE", "default 1MiB, range 125B-64MiB\n"},
      {"--max-header-size SIZE", "ARQONBUS_MAX_HEADER_SIZE", "default 8KiB, range 1KiB-64KiB\n"},
      {"--handshake-timeout DURATION", "ARQONBUS_HANDSHAKE_TIMEOUT", "default 10s, range 1ms-60m\n"},
      {"--heartbeat-interval DURATION", "ARQONBUS_HEARTBEAT_INTERVAL", "default 25s, range 0-60m\n"},
      {"--heartbeat-timeout DURATION", "ARQONBUS_HEARTBEAT_TIMEOUT", "default 10s, range 0-60m\n"},
      {"--close-timeout DURATION", "ARQONBUS_CLOSE_TIMEOUT", "default 2s, range 0-60m\n"},
      {"--max-connections N", "ARQONBUS_MAX_CONNECTIONS", "default 10000, range 1-1000000\n"},
      {"--max-outbound-queue SIZE", "ARQONBUS_MAX_OUTBOUND_QUEUE", "default 1MiB, range 64KiB-1GiB\n"},
      {"--write-timeout DURATION", "ARQONBUS_WRITE_TIMEOUT", "default 10s, range 1ms-60m\n"},
      {"--drain-timeout DURATION", "ARQONBUS_DRAIN_TIMEOUT", "default 5s, range 0-60m\n"},
  };
  char *text = NULL;
  size_t len = 0;
  FILE *out = open_memstream(&text, &len);
  assert_non_null(out);
  arq_config_usage(out);
  assert_int_equal(fclose(out), 0);

  assert_true(strncmp(text, "Usage: arqonbus ", 16) == 0);
  assert_contains(text, "--config FILE");
  assert_contains(text, "ARQONBUS_CONFIG");
  assert_contains(text, "-h, --help");
  assert_contains(text, "-V, --version");
  const char *at = text;
  for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
    /* Each setting in table order: flag, variable, then (after the meaning)
     * its default and range before the next setting's flag. */
    const char *flag = strstr(at, rows[i][0]);
    if (flag == NULL)
      fail_msg("--help lacks %s after the previous setting", rows[i][0]);
    const char *env = strstr(flag, rows[i][1]);
    const char *def = strstr(flag, rows[i][2]);
    const char *next = i + 1 < sizeof rows / sizeof rows[0] ? strstr(flag, rows[i + 1][0]) : strstr(flag, "-h, --help");
    assert_non_null(env);
    assert_non_null(def);
    assert_non_null(next);
    if (!(env < def && def < next))
      fail_msg("--help: %s is not followed by %s and %s", rows[i][0], rows[i][1], rows[i][2]);
    at = flag + 1;
  }
  free(text);
}

/* ---- the YAML file's shape ------------------------------------------------ */

typedef struct bad_file {
  const char *name, *text;
  const char *before_path, *after_path; /* the message: before_path + the file's path + after_path */
} bad_file_t;

static const bad_file_t bad_files[] = {
    {"list.yaml", "- port\n- 9100\n", "config: ", " must be a mapping of keys to values, like 'port: 9100' (line 1)"},
    {"scalar.yaml", "\n9100\n", "config: ", " must be a mapping of keys to values, like 'port: 9100' (line 2)"},
    {"nested-map.yaml", "port: 9200\nlog_level:\n  level: debug\n", "config: value of 'log_level' in ",
     " (line 3) must be a single value, not a mapping"},
    {"nested-list.yaml", "port: 9200\n\nhost: [127.0.0.1, 10.0.0.1]\n", "config: value of 'host' in ",
     " (line 3) must be a single value, not a list"},
    {"alias.yaml", "port: &p 9200\nhttp_port: *p\n", "config: value of 'http_port' in ",
     " (line 2) must be a single value, not a reference"},
    {"complex-key.yaml", "port: 9200\n? [a, b]\n: 1\n", "config: keys in ", " must be plain names (line 2)"},
    {"twice.yaml", "port: 9200\nhost: '::1'\nport: 9300\n", "config: key 'port' appears twice in ", " (line 3)"},
    {"two-docs.yaml", "port: 9200\n---\nport: 9300\n", "config: ", " holds more than one YAML document (line 2)"},
};

static void test_yaml_shape_errors(void **state) {
  char want[1024];
  for (size_t i = 0; i < sizeof bad_files / sizeof bad_files[0]; i++) {
    loaded_t r;
    char *path = write_yaml(bad_files[i].name, bad_files[i].text);
    snprintf(want, sizeof want, "%s%s%s", bad_files[i].before_path, path, bad_files[i].after_path);
    assert_string_equal(load_err(&r, ARGV("--config", path), NOENV), want);
  }
}

static void test_yaml_syntax_errors_have_lines(void **state) {
  loaded_t r;
  char want[1024];
  /* libyaml's own words follow the line; only the first case pins them. */
  char *path = write_yaml("syntax.yaml", "port: 9200\nhost: 10.0.0.1\n- x\n");
  snprintf(want, sizeof want,
           "config: YAML syntax error in %s (line 3): did not find expected key while parsing a block mapping", path);
  assert_string_equal(load_err(&r, ARGV("--config", path), NOENV), want);

  path = write_yaml("colon.yaml", "port: 9200\nhost: 10.0.0.1: x\n");
  snprintf(want, sizeof want, "config: YAML syntax error in %s (line 2): ", path);
  assert_contains(load_err(&r, ARGV("--config", path), NOENV), want);

  path = write_yaml("tab.yaml", "port: 9200\n\tlog_level: debug\n");
  snprintf(want, sizeof want, "config: YAML syntax error in %s (line 2): ", path);
  assert_contains(load_err(&r, ARGV("--config", path), NOENV), want);

  path = write_yaml("unclosed.yaml", "port: 9200\nhost: \"::1\n\n");
  snprintf(want, sizeof want, "config: YAML syntax error in %s (line 4): ", path);
  assert_contains(load_err(&r, ARGV("--config", path), NOENV), want);

  static const char latin1[] = "port: 9200\nhost: caf\xe9\n";
  path = write_bytes("latin1.yaml", latin1, sizeof latin1 - 1);
  snprintf(want, sizeof want, "config: cannot read %s: ", path);
  assert_contains(load_err(&r, ARGV("--config", path), NOENV), want);

  path = write_yaml("nul.yaml", "port: \"92\\0\"\n"); /* the escape, not a NUL byte */
  snprintf(want, sizeof want, "config: invalid value for port (%s:1): it contains a NUL byte", path);
  assert_string_equal(load_err(&r, ARGV("--config", path), NOENV), want);
}

static void test_unreadable_files(void **state) {
  loaded_t r;
  char want[1024];
  snprintf(want, sizeof want, "config: cannot read config file %s/missing.yaml: No such file or directory", tmpdir);
  char path[512];
  snprintf(path, sizeof path, "%s/missing.yaml", tmpdir);
  assert_string_equal(load_err(&r, ARGV("--config", path), NOENV), want);

  snprintf(want, sizeof want, "config: cannot read config file %s: Is a directory", tmpdir);
  assert_string_equal(load_err(&r, ARGV("--config", tmpdir), NOENV), want);

  /* The same through the variable. */
  char var[600];
  snprintf(var, sizeof var, "ARQONBUS_CONFIG=%s", path);
  snprintf(want, sizeof want, "config: cannot read config file %s/missing.yaml: No such file or directory", tmpdir);
  assert_string_equal(load_err(&r, ARGV(), ENVP(var)), want);
}

/* A value set twice (file, then variable, then flag) replaces the string it
 * owned; ASan's leak check makes this test fail if one is lost. */
/* Lists: comma-separated from flags and variables, a YAML list or a string in
 * the file; spaces around items dropped; each item checked. */
static void test_lists(void **state) {
  loaded_t r;
  load_ok(&r, ARGV("--bootstrap-channels", " a:b , c.d:e-f ", "--admins=ada,bob@x"), NOENV);
  assert_string_equal(r.cfg.bootstrap_channels, "a:b,c.d:e-f");
  assert_string_equal(r.cfg.admins, "ada,bob@x");
  arq_config_free(&r.cfg);

  load_ok(&r, ARGV("--bootstrap-channels", ""), ENVP("ARQONBUS_ADMINS=root"));
  assert_string_equal(r.cfg.bootstrap_channels, "");
  assert_string_equal(r.cfg.admins, "root");
  arq_config_free(&r.cfg);

  char *path = write_yaml("lists.yaml", "bootstrap_channels:\n  - lab:one\n  - lab:two\nadmins: [ada, bob]\n");
  load_ok(&r, ARGV("--config", path), NOENV);
  assert_string_equal(r.cfg.bootstrap_channels, "lab:one,lab:two");
  assert_string_equal(r.cfg.admins, "ada,bob");
  arq_config_free(&r.cfg);

  char *bad[][2] = {
      {"--bootstrap-channels", "nochannel"}, {"--bootstrap-channels", "a:b,,c:d"}, {"--bootstrap-channels", "a:b,"},
      {"--bootstrap-channels", "a:b:c"},     {"--admins", "-ada"},                  {"--admins", "a b"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    const char *msg = load_err(&r, ARGV(bad[i][0], bad[i][1]), NOENV);
    const char *key = strcmp(bad[i][0], "--admins") == 0 ? " for admins " : " for bootstrap_channels ";
    if (!strstr(msg, key))
      fail_msg("'%s %s': %s", bad[i][0], bad[i][1], msg);
  }
  path = write_yaml("badlist.yaml", "admins:\n  - ok\n  - [nested]\n");
  assert_non_null(strstr(load_err(&r, ARGV("--config", path), NOENV), "must hold plain names"));
}

static void test_strings_replaced_without_leaks(void **state) {
  loaded_t r;
  char *path = write_yaml("host.yaml", "host: 10.0.0.1\n");
  load_ok(&r, ARGV("--config", path, "--host", "10.0.0.3", "--config", path),
          ENVP("ARQONBUS_HOST=10.0.0.2"));
  assert_string_equal(r.cfg.host, "10.0.0.3");
  assert_string_equal(r.cfg.config_file, path);
  /* A second load into the same configuration replaces what it holds. */
  arq_config_action_t action;
  char err[256];
  assert_int_equal(arq_config_load(&r.cfg, 3, ARGV("--config", path), NOENV, &action, err, sizeof err), 0);
  assert_string_equal(r.cfg.host, "10.0.0.1");
  arq_config_free(&r.cfg);
  assert_null(r.cfg.host);
  assert_null(r.cfg.config_file);
  arq_config_free(&r.cfg); /* twice is harmless */
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_defaults),
      cmocka_unit_test(test_fixed_channels_must_fit),
      cmocka_unit_test(test_allowed_origins),
      cmocka_unit_test(test_no_sources_keeps_defaults),
      cmocka_unit_test(test_flags_with_space),
      cmocka_unit_test(test_flags_with_equals),
      cmocka_unit_test(test_env_sets_every_setting),
      cmocka_unit_test(test_file_sets_every_setting),
      cmocka_unit_test(test_file_named_by_env),
      cmocka_unit_test(test_empty_files_keep_defaults),
      cmocka_unit_test(test_yaml_quoting_and_flow_style),
      cmocka_unit_test(test_precedence_file_env_flag),
      cmocka_unit_test(test_last_flag_wins),
      cmocka_unit_test(test_combination_checked_after_all_sources),
      cmocka_unit_test(test_unknown_flag),
      cmocka_unit_test(test_bad_flag_shapes),
      cmocka_unit_test(test_unknown_env),
      cmocka_unit_test(test_other_env_ignored),
      cmocka_unit_test(test_unknown_key_in_file),
      cmocka_unit_test(test_bad_values_name_key_in_every_source),
      cmocka_unit_test(test_null_yaml_value_is_empty),
      cmocka_unit_test(test_error_text_is_one_bounded_line),
      cmocka_unit_test(test_equal_ports_refused),
      cmocka_unit_test(test_heartbeat_timeout_needs_interval_off),
      cmocka_unit_test(test_size_units),
      cmocka_unit_test(test_duration_units),
      cmocka_unit_test(test_port_bounds),
      cmocka_unit_test(test_log_words),
      cmocka_unit_test(test_addresses),
      cmocka_unit_test(test_help_and_version_actions),
      cmocka_unit_test(test_usage_lists_every_setting),
      cmocka_unit_test(test_lists),
      cmocka_unit_test(test_yaml_shape_errors),
      cmocka_unit_test(test_yaml_syntax_errors_have_lines),
      cmocka_unit_test(test_unreadable_files),
      cmocka_unit_test(test_strings_replaced_without_leaks),
      cmocka_unit_test(test_tls_settings),
  };
  return cmocka_run_group_tests(tests, make_tmpdir, remove_tmpdir);
}
