/* Server configuration (see config.h).
 *
 * One row of 'settings' per setting drives every source: the YAML key is the
 * row's key, the environment variable is ARQONBUS_ plus the key in upper case
 * and the flag is -- plus the key with '-' for '_'. The same parser checks a
 * value whatever its source, so a value means the same thing in the file, the
 * environment and on the command line, and every error names the key and
 * where the value came from.
 *
 * arq_config_load() works in passes so that later sources override earlier
 * ones while the file itself can be named by a flag or a variable:
 *
 *   1. argv, looking only for --help and --version (they win over any error);
 *   2. argv, checking its shape and finding --config;
 *   3. envp, checking the names and finding ARQONBUS_CONFIG;
 *   4. the YAML file; 5. envp values; 6. flag values; 7. cross-field checks.
 */
#include "config.h"

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "bus/bus.h"
#include "bus/names.h"
#include "obs/log.h"
#include "store/redis_url.h"
#include "util/alloc.h"
#include "util/err.h"
#include "wire/handshake.h"

#define KIB (UINT64_C(1) << 10)
#define MIB (UINT64_C(1) << 20)
#define GIB (UINT64_C(1) << 30)
#define SEC UINT64_C(1000)
#define MIN (60 * SEC)
#define HOUR (60 * MIN)

#define ENV_PREFIX "ARQONBUS_"
#define ENV_CONFIG "ARQONBUS_CONFIG"

typedef enum {
  T_ADDR,     /* char *: an IPv4 or IPv6 address */
  T_PORT,     /* int: 1-65535 */
  T_COUNT,    /* uint64_t: a plain number within min..max */
  T_SIZE,     /* uint64_t: bytes, with an optional unit */
  T_DURATION, /* uint64_t: milliseconds; the text has a unit, or is seconds */
  T_LOGLEVEL, /* int: ARQ_LOG_* */
  T_LOGFMT,   /* arq_logfmt_t */
  T_CHANNELS, /* char *: comma-separated room:channel names, may be empty */
  T_IDS,      /* char *: comma-separated client ids, may be empty */
  T_CHANNEL,  /* char *: one room:channel name, or empty */
  T_REDIS,    /* char *: comma-separated redis:// URLs, or empty */
  T_BOOL,     /* bool: true/false, yes/no, on/off, 1/0 */
  T_NODE,     /* char *: a node name (as a client id), or empty */
  T_PATH,     /* char *: a readable file, or empty */
  T_LIST,     /* char *: comma-separated items of printable ASCII (checked further by the setting's user), may be empty */
  T_TEXT,     /* char *: printable ASCII (spaces too), may be empty */
  T_OPTADDR,  /* char *: an IPv4 or IPv6 address, or empty */
  T_AUTH,     /* arq_auth_mode_t: none, api_key, jwt */
  T_JWTALG,   /* arq_jwt_alg_t: HS256, RS256, ES256 */
  T_TLSVER,   /* int: a TLS version, 1.2 or 1.3, stored as its protocol number (0x0303, 0x0304) */
} kind_t;

typedef struct setting {
  const char *key;
  kind_t kind;
  size_t offset; /* of the field in arq_config_t */
  uint64_t min, max;
  const char *def; /* default, in the syntax a user would write */
  const char *meaning;
} setting_t;

/* Field offsets that fail to compile when the field does not have the type the
 * row's kind stores through (comparing distinct pointer types is an error
 * under -Werror). */
#define FIELD(f, type) (offsetof(arq_config_t, f) + 0 * sizeof(&((arq_config_t *)0)->f == (type *)0))
#define STR(f) FIELD(f, char *)
#define INT(f) FIELD(f, int)
#define U64(f) FIELD(f, uint64_t)
#define FMT(f) FIELD(f, arq_logfmt_t)
#define BOOL(f) FIELD(f, bool)
#define AUTH(f) FIELD(f, arq_auth_mode_t)
#define JWTALG(f) FIELD(f, arq_jwt_alg_t)

static const char *const auth_modes[] = {"none", "api_key", "jwt", NULL};
static const char *const jwt_algs[] = {"HS256", "RS256", "ES256", NULL};

/* The order is the order of --help and of docs/configuration.md. */
static const setting_t settings[] = {
    {"host", T_ADDR, STR(host), 0, 0, "127.0.0.1",
     "address the three listeners bind to (0.0.0.0 or :: for every interface)"},
    {"http_host", T_OPTADDR, STR(http_host), 0, 0, "",
     "address the ops port binds to (127.0.0.1 keeps it local); empty: the same as host"},
    {"port", T_PORT, INT(port), 1, 65535, "9100", "port of the WebSocket bus"},
    {"telemetry_port", T_PORT, INT(telemetry_port), 1, 65535, "9101", "port of the telemetry WebSocket server"},
    {"http_port", T_PORT, INT(http_port), 1, 65535, "9102", "port of the HTTP ops endpoints (/health, /version, /metrics)"},
    {"tls_cert", T_PATH, STR(tls_cert), 0, 0, "",
     "PEM certificate chain; with tls_key, all three ports speak TLS only (wss://, https://); empty: plaintext"},
    {"tls_key", T_PATH, STR(tls_key), 0, 0, "", "PEM private key of tls_cert (reloaded with it on SIGHUP)"},
    {"tls_min_version", T_TLSVER, INT(tls_min_version), 0, 0, "1.2", "oldest TLS version accepted: 1.2 or 1.3"},
    {"log_level", T_LOGLEVEL, INT(log_level), 0, 0, "info", "least severe log level written: debug, info, warn, error or off"},
    {"log_format", T_LOGFMT, FMT(log_format), 0, 0, "logfmt", "log line format: logfmt or json"},
    {"max_message_size", T_SIZE, U64(max_message_size), 125, 64 * MIB, "1MiB",
     "largest WebSocket message a client may send; larger ones close with 1009"},
    {"max_header_size", T_SIZE, U64(max_header_size), 1 * KIB, 64 * KIB, "8KiB",
     "largest HTTP request head; larger ones are refused with 431"},
    {"handshake_timeout", T_DURATION, U64(handshake_timeout_ms), 1, 60 * MIN, "10s",
     "time a new connection has to complete its opening handshake (else 408)"},
    {"heartbeat_interval", T_DURATION, U64(heartbeat_interval_ms), 0, 60 * MIN, "25s",
     "how often the server pings each WebSocket client; 0 disables pings"},
    {"heartbeat_timeout", T_DURATION, U64(heartbeat_timeout_ms), 0, 60 * MIN, "10s",
     "how long a ping may go unanswered before the client is closed with 1011"},
    {"close_timeout", T_DURATION, U64(close_timeout_ms), 0, 60 * MIN, "2s",
     "how long the server waits for the client to close after its close frame"},
    {"max_connections", T_COUNT, U64(max_connections), 1, 1000000, "10000",
     "most WebSocket connections open at once, all ports together (then 503)"},
    {"max_connections_per_ip", T_COUNT, U64(max_connections_per_ip), 1, 1000000, "256",
     "most WebSocket connections on the bus port from one remote address (then 429)"},
    {"max_handshakes_per_ip", T_COUNT, U64(max_handshakes_per_ip), 1, 1000000, "128",
     "connections from one address still in their opening handshake, any port; more are dropped at once"},
    {"rate_limit_messages", T_COUNT, U64(rate_limit_messages), 1, 1000000, "2000",
     "messages per second one client may send (commands included), with bursts of up to a second's worth; more get "
     "rate_limited errors"},
    {"rate_limit_bytes", T_SIZE, U64(rate_limit_bytes), 1 * KIB, 1 * GIB, "16MiB",
     "bytes of messages per second one client may send, with bursts of up to a second's worth; more get "
     "rate_limited errors"},
    {"rate_limit_close_after", T_COUNT, U64(rate_limit_close_after), 1, 1000000, "100",
     "rate_limited messages within one second after which a client is closed with 1008"},
    {"max_subscriptions", T_COUNT, U64(max_subscriptions), 1, 1000000, "256",
     "channels one client may have joined at once (the initial channel included); more get limit_exceeded"},
    {"max_channels_per_client", T_COUNT, U64(max_channels_per_client), 1, 10000000, "1000",
     "channels one client's requests created that still exist and no other client joined; more get limit_exceeded"},
    {"max_channels", T_COUNT, U64(max_channels), 1, 10000000, "10000",
     "channels that may exist on this node (bootstrap, telemetry and dashboard channels included); more get "
     "limit_exceeded"},
    {"max_rooms", T_COUNT, U64(max_rooms), 1, 10000000, "1000",
     "rooms that may exist on this node; a channel in a new room beyond it gets limit_exceeded"},
    {"allowed_origins", T_LIST, STR(allowed_origins), 0, 0, "",
     "Origin values accepted on WebSocket upgrades (scheme://host[:port], or * for any; comma-separated, or a YAML "
     "list); empty accepts only requests without Origin or from the Host they address; others get 403"},
    {"max_outbound_queue", T_SIZE, U64(max_outbound_queue), 64 * KIB, 1 * GIB, "1MiB",
     "most bytes queued to one client before it is closed as a slow consumer"},
    {"write_timeout", T_DURATION, U64(write_timeout_ms), 1, 60 * MIN, "10s",
     "how long a write to a client may make no progress before it is closed"},
    {"drain_timeout", T_DURATION, U64(drain_timeout_ms), 0, 60 * MIN, "5s",
     "how long a graceful shutdown waits for clients before dropping them"},
    {"max_envelope_size", T_SIZE, U64(max_envelope_size), 125, 64 * MIB, "512KiB",
     "largest envelope accepted; larger ones get a payload_too_large error (the connection stays open)"},
    {"max_malformed", T_COUNT, U64(max_malformed), 0, 1000000, "10",
     "malformed envelopes in a row after which a client is closed with 1008; 0 never closes"},
    {"history_size", T_COUNT, U64(history_size), 0, 100000, "500", "messages kept per channel (Redis mode: streams keep about this many, at least 1000); 0 keeps none in memory"},
    {"history_max_limit", T_COUNT, U64(history_max_limit), 1, 100000, "500",
     "most messages one history command returns"},
    {"channel_ttl", T_DURATION, U64(channel_ttl_ms), 0, 24 * HOUR, "5m",
     "how long an empty channel (and its history) is kept; 0 removes it when its last member leaves"},
    {"bootstrap_channels", T_CHANNELS, STR(bootstrap_channels), 0, 0,
     "science:general,science:explore,science:hypothesize,science:design,science:execute,science:interpret,"
     "science:share",
     "room:channel names that always exist and cannot be deleted (comma-separated, or a YAML list)"},
    {"admins", T_IDS, STR(admins), 0, 0, "",
     "with auth none: client ids that get the admin role (comma-separated, or a YAML list); empty gives it to everyone"},
    {"auth", T_AUTH, AUTH(auth), 0, 0, "none",
     "how clients authenticate: none (anyone may connect; a warning is logged), api_key or jwt (docs/security.md)"},
    {"api_keys", T_LIST, STR(api_keys), 0, 0, "",
     "API keys as SHA256HEX:client_id:roles[:client_type] (roles joined with +; comma-separated, or a YAML list)"},
    {"api_keys_file", T_PATH, STR(api_keys_file), 0, 0, "",
     "file of API keys, one SHA256HEX:client_id:roles[:client_type] per line (# starts a comment)"},
    {"jwt_algorithm", T_JWTALG, JWTALG(jwt_algorithm), 0, 0, "HS256",
     "the one algorithm tokens must be signed with: HS256 (a secret), RS256 or ES256 (a public key)"},
    {"jwt_secret", T_TEXT, STR(jwt_secret), 0, 0, "", "HS256 secret, at least 32 bytes (jwt_key_file is safer: no secret in the environment)"},
    {"jwt_key_file", T_PATH, STR(jwt_key_file), 0, 0, "",
     "file holding the HS256 secret, or the PEM public key for RS256 and ES256"},
    {"jwt_audience", T_TEXT, STR(jwt_audience), 0, 0, "", "required aud claim of tokens; empty checks none"},
    {"jwt_issuer", T_TEXT, STR(jwt_issuer), 0, 0, "", "required iss claim of tokens; empty checks none"},
    {"jwt_leeway", T_DURATION, U64(jwt_leeway_ms), 0, 10 * MIN, "30s", "clock skew allowed when checking exp, nbf and iat"},
    {"command_roles", T_LIST, STR(command_roles), 0, 0, "create_channel=admin,delete_channel=admin,status=admin",
     "roles allowed to run a command, as command=role+role (comma-separated); commands not listed are open to every role"},
    {"protected_rooms", T_LIST, STR(protected_rooms), 0, 0, "",
     "rooms only some roles may join, publish to and read, as room=role+role (comma-separated); a token's rooms claim also opens a room"},
    {"ops_token", T_TEXT, STR(ops_token), 0, 0, "",
     "bearer token the ops endpoints require (Authorization: Bearer ...), except /health; empty requires none"},
    {"telemetry_channel", T_CHANNEL, STR(telemetry_channel), 0, 0, "integriguard:telemetry-stream",
     "room:channel where telemetry envelopes from clients are published; empty publishes them on the telemetry port only"},
    {"dashboard_channel", T_CHANNEL, STR(dashboard_channel), 0, 0, "integriguard:dashboard-events",
     "room:channel of agent_activity events about ai-agent and service clients; empty publishes none on the bus"},
    {"telemetry_stats_interval", T_DURATION, U64(telemetry_stats_interval_ms), 0, 60 * MIN, "5s",
     "how often telemetry clients get a stats snapshot; 0 sends none"},
    {"telemetry_queue", T_SIZE, U64(telemetry_queue), 4 * KIB, 64 * MIB, "256KiB",
     "most bytes queued to one telemetry client; events beyond it are dropped for that client and counted"},
    {"stats_log_interval", T_DURATION, U64(stats_log_interval_ms), 0, 24 * HOUR, "60s",
     "how often a stats line is logged; 0 turns it off"},
    {"redis_url", T_REDIS, STR(redis_url), 0, 0, "",
     "Redis to store history in and share with other nodes, redis://[:password@]host[:port][/db]; several "
     "comma-separated URLs spread channels over them by a hash of the name (every node must list the same ones in "
     "the same order); empty runs in memory only"},
    {"redis_timeout", T_DURATION, U64(redis_timeout_ms), 1, 60 * MIN, "2s",
     "how long Redis may leave a request unanswered before the connection counts as lost"},
    {"redis_strict", T_BOOL, BOOL(redis_strict), 0, 0, "false",
     "refuse publishes with storage_unavailable while Redis is unreachable, instead of delivering them on this node "
     "and writing them back later"},
    {"redis_buffer_messages", T_COUNT, U64(redis_buffer_messages), 0, 10000000, "10000",
     "most messages held in memory while Redis is unreachable; beyond it publishes get storage_unavailable"},
    {"redis_buffer_bytes", T_SIZE, U64(redis_buffer_bytes), 0, 4 * GIB, "64MiB",
     "most bytes of messages held in memory while Redis is unreachable"},
    {"history_max_age", T_DURATION, U64(history_max_age_ms), 0, 365 * 24 * HOUR, "0",
     "with Redis, streams are also trimmed to messages younger than this; 0 trims by count only"},
    {"node_id", T_NODE, STR(node_id), 0, 0, "",
     "this node's name among the nodes sharing Redis (1-64 of A-Z a-z 0-9 _ - . @); empty picks a random one"},
    {"node_ttl", T_DURATION, U64(node_ttl_ms), 1000, 10 * MIN, "10s",
     "with Redis, how long the clients of a node that stopped answering stay present on the other nodes"},
};

#define NSETTINGS (sizeof settings / sizeof settings[0])

typedef struct unit {
  const char *name;
  uint64_t scale;
} unit_t;

static const unit_t size_units[] = {{"", 1},    {"B", 1},   {"KiB", KIB}, {"MiB", MIB}, {"GiB", GIB},
                                    {"k", KIB}, {"K", KIB}, {"M", MIB},   {"G", GIB},   {NULL, 0}};
/* A bare number is seconds, as in most server configuration files. */
static const unit_t duration_units[] = {{"", SEC}, {"ms", 1}, {"s", SEC}, {"m", MIN}, {NULL, 0}};

/* ---- names -------------------------------------------------------------- */

/* Writes 'prefix' and then the key of 's' into 'buf', either upper-cased
 * (the environment variable) or with '-' for '_' (the flag). */
static const char *derive_name(const setting_t *s, const char *prefix, bool env, char *buf, size_t cap) {
  size_t n = 0;
  for (const char *p = prefix; *p != '\0' && n + 1 < cap; p++)
    buf[n++] = *p;
  for (const char *k = s->key; *k != '\0' && n + 1 < cap; k++)
    buf[n++] = env ? (char)(*k >= 'a' && *k <= 'z' ? *k - 'a' + 'A' : *k) : *k == '_' ? '-' : *k;
  buf[n] = '\0';
  return buf;
}

static const char *env_name(const setting_t *s, char *buf, size_t cap) {
  return derive_name(s, ENV_PREFIX, true, buf, cap);
}

static const char *flag_name(const setting_t *s, char *buf, size_t cap) {
  return derive_name(s, "--", false, buf, cap);
}

static const setting_t *find_key(const char *key, size_t n) {
  for (size_t i = 0; i < NSETTINGS; i++)
    if (strlen(settings[i].key) == n && memcmp(settings[i].key, key, n) == 0)
      return &settings[i];
  return NULL;
}

/* Finds the setting whose flag, without its "--", is the 'n' bytes at 'name'. */
static const setting_t *find_flag(const char *name, size_t n) {
  for (size_t i = 0; i < NSETTINGS; i++) {
    const char *k = settings[i].key;
    if (strlen(k) != n)
      continue;
    size_t j = 0;
    while (j < n && (k[j] == '_' ? name[j] == '-' : name[j] == k[j]))
      j++;
    if (j == n)
      return &settings[i];
  }
  return NULL;
}

/* Finds the setting of the variable named by the 'n' bytes at 'name'. */
static const setting_t *find_env(const char *name, size_t n) {
  char buf[64];
  for (size_t i = 0; i < NSETTINGS; i++) {
    env_name(&settings[i], buf, sizeof buf);
    if (strlen(buf) == n && memcmp(buf, name, n) == 0)
      return &settings[i];
  }
  return NULL;
}

/* Copies 'n' bytes of untrusted text into 'buf' for an error message: control
 * bytes become '?' so that the message stays one line, and a long text is cut
 * with "...". */
static const char *show(char *buf, size_t cap, const char *s, size_t n) {
  size_t o = 0;
  for (size_t i = 0; i < n && o + 1 < cap; i++, o++)
    buf[o] = (unsigned char)s[i] < 0x20 || s[i] == 0x7f ? '?' : s[i];
  if (o < n && cap > 4) {
    o = cap - 4;
    memcpy(buf + o, "...", 3);
    o += 3;
  }
  buf[o] = '\0';
  return buf;
}

/* ---- values ------------------------------------------------------------- */

static void fmt_size(char *buf, size_t cap, uint64_t v) {
  if (v >= GIB && v % GIB == 0)
    snprintf(buf, cap, "%" PRIu64 "GiB", v / GIB);
  else if (v >= MIB && v % MIB == 0)
    snprintf(buf, cap, "%" PRIu64 "MiB", v / MIB);
  else if (v >= KIB && v % KIB == 0)
    snprintf(buf, cap, "%" PRIu64 "KiB", v / KIB);
  else
    snprintf(buf, cap, "%" PRIu64 "B", v);
}

static void fmt_duration(char *buf, size_t cap, uint64_t ms) {
  if (ms == 0)
    snprintf(buf, cap, "0");
  else if (ms % MIN == 0)
    snprintf(buf, cap, "%" PRIu64 "m", ms / MIN);
  else if (ms % SEC == 0)
    snprintf(buf, cap, "%" PRIu64 "s", ms / SEC);
  else
    snprintf(buf, cap, "%" PRIu64 "ms", ms);
}

/* Writes 'v', a size or a duration as 'kind' says, the way a user would. */
static void fmt_amount(kind_t kind, char *buf, size_t cap, uint64_t v) {
  if (kind == T_SIZE)
    fmt_size(buf, cap, v);
  else
    fmt_duration(buf, cap, v);
}

/* Writes what a value of 's' must look like, e.g. "a port number 1-65535". */
static void expected(const setting_t *s, char *buf, size_t cap) {
  char lo[32], hi[32];
  switch (s->kind) {
  case T_ADDR:
    snprintf(buf, cap, "an IPv4 or IPv6 address");
    break;
  case T_PORT:
    snprintf(buf, cap, "a port number %" PRIu64 "-%" PRIu64, s->min, s->max);
    break;
  case T_COUNT:
    snprintf(buf, cap, "a whole number %" PRIu64 "-%" PRIu64, s->min, s->max);
    break;
  case T_SIZE:
    fmt_amount(T_SIZE, lo, sizeof lo, s->min);
    fmt_amount(T_SIZE, hi, sizeof hi, s->max);
    snprintf(buf, cap, "a size %s-%s (a number of bytes, or with B, KiB, MiB, GiB)", lo, hi);
    break;
  case T_DURATION:
    fmt_amount(T_DURATION, lo, sizeof lo, s->min);
    fmt_amount(T_DURATION, hi, sizeof hi, s->max);
    snprintf(buf, cap, "a duration %s-%s (a number with ms, s or m; a bare number is seconds)", lo, hi);
    break;
  case T_LOGLEVEL:
    snprintf(buf, cap, "debug, info, warn, error or off");
    break;
  case T_LOGFMT:
    snprintf(buf, cap, "logfmt or json");
    break;
  case T_CHANNELS:
    snprintf(buf, cap, "room:channel names separated by commas (names: 1-64 of A-Z a-z 0-9 _ - .)");
    break;
  case T_IDS:
    snprintf(buf, cap, "client ids separated by commas (1-64 of A-Z a-z 0-9 _ - . @)");
    break;
  case T_CHANNEL:
    snprintf(buf, cap, "one room:channel name (names: 1-64 of A-Z a-z 0-9 _ - .), or empty");
    break;
  case T_REDIS:
    snprintf(buf, cap, "redis://[:password@]host[:port][/db] (several separated by commas), or empty");
    break;
  case T_BOOL:
    snprintf(buf, cap, "true or false");
    break;
  case T_NODE:
    snprintf(buf, cap, "a name of 1-64 of A-Z a-z 0-9 _ - . @, or empty");
    break;
  case T_PATH:
    snprintf(buf, cap, "the path of a readable file, or empty");
    break;
  case T_LIST:
    snprintf(buf, cap, "items of printable ASCII separated by commas, or empty");
    break;
  case T_TEXT:
    snprintf(buf, cap, "printable ASCII text, or empty");
    break;
  case T_OPTADDR:
    snprintf(buf, cap, "an IPv4 or IPv6 address, or empty");
    break;
  case T_AUTH:
    snprintf(buf, cap, "none, api_key or jwt");
    break;
  case T_JWTALG:
    snprintf(buf, cap, "HS256, RS256 or ES256");
    break;
  case T_TLSVER:
    snprintf(buf, cap, "1.2 or 1.3");
    break;
  }
}

static bool printable_ascii(const char *s) {
  for (; *s; s++)
    if (*s < 0x21 || *s > 0x7e)
      return false;
  return true;
}

/* Normalises the comma-separated list 'text' (spaces around items dropped)
 * into a new string (caller owns), checking each item; NULL when one is bad. */
static char *parse_list(const char *text, kind_t kind) {
  size_t n = strlen(text);
  char *out = arq_malloc(n + 1), *o = out;
  const char *p = text;
  while (*p) {
    while (*p == ' ' || *p == '\t')
      p++;
    const char *start = p;
    while (*p && *p != ',')
      p++;
    const char *end = p;
    while (end > start && (end[-1] == ' ' || end[-1] == '\t'))
      end--;
    size_t len = (size_t)(end - start);
    char item[512], room[ARQ_NAME_MAX + 1], channel[ARQ_NAME_MAX + 1], why[160];
    arq_redis_url_t url;
    bool ok = len > 0 && len < (kind == T_REDIS || kind == T_LIST ? sizeof item : 2 * ARQ_NAME_MAX + 2);
    if (ok) {
      memcpy(item, start, len);
      item[len] = '\0';
      ok = kind == T_IDS     ? arq_names_valid_client_id(item, len)
           : kind == T_REDIS ? arq_redis_parse_url(item, &url, why, sizeof why) == 0
           : kind == T_LIST  ? printable_ascii(item)
                             : arq_names_split(item, room, channel) == 0 && channel[0] != '\0';
    }
    if (!ok) {
      arq_free(out);
      return NULL;
    }
    if (o != out)
      *o++ = ',';
    memcpy(o, item, len);
    o += len;
    if (*p == ',') {
      p++;
      if (*p == '\0') {
        arq_free(out);
        return NULL;
      }
    }
  }
  *o = '\0';
  return out;
}

/* Reads a decimal number followed by one of 'units' (the whole of 's').
 * Returns 0 and sets '*out', or ARQ_EINVAL on anything else or on overflow. */
static int parse_scaled(const char *s, const unit_t *units, uint64_t *out) {
  uint64_t n = 0;
  const char *p = s;
  if (*p < '0' || *p > '9')
    return ARQ_EINVAL;
  for (; *p >= '0' && *p <= '9'; p++) {
    uint64_t d = (uint64_t)(*p - '0');
    if (n > (UINT64_MAX - d) / 10)
      return ARQ_EINVAL;
    n = n * 10 + d;
  }
  for (const unit_t *u = units; u->name != NULL; u++) {
    if (strcmp(p, u->name) != 0)
      continue;
    if (n > UINT64_MAX / u->scale)
      return ARQ_EINVAL;
    *out = n * u->scale;
    return 0;
  }
  return ARQ_EINVAL;
}

static bool is_address(const char *s) {
  unsigned char addr[sizeof(struct in6_addr)];
  char v6[64];
  if (inet_pton(AF_INET, s, addr) == 1)
    return true;
  /* An IPv6 address may carry a zone ("fe80::1%eth0"), which libuv resolves
   * when it binds; only the address part is checked here. */
  size_t n = strcspn(s, "%");
  if (n >= sizeof v6 || (s[n] == '%' && s[n + 1] == '\0'))
    return false;
  memcpy(v6, s, n);
  v6[n] = '\0';
  return inet_pton(AF_INET6, v6, addr) == 1;
}

/* Parses 'text' as a value of 's' and stores it in 'c'. On an error writes a
 * message naming the key and 'origin' (the flag, the variable or file:line). */
static int set_value(arq_config_t *c, const setting_t *s, const char *text, const char *origin, char *err,
                     size_t errcap) {
  void *field = (char *)c + s->offset;
  uint64_t v = 0;
  int level;
  switch (s->kind) {
  case T_ADDR:
  case T_OPTADDR:
    if (!is_address(text) && !(s->kind == T_OPTADDR && !text[0]))
      goto invalid;
    arq_free(*(char **)field);
    *(char **)field = arq_strdup(text);
    return 0;
  case T_PORT:
  case T_COUNT:
    if (parse_scaled(text, (const unit_t[]){{"", 1}, {NULL, 0}}, &v) != 0 || v < s->min || v > s->max)
      goto invalid;
    if (s->kind == T_PORT)
      *(int *)field = (int)v;
    else
      *(uint64_t *)field = v;
    return 0;
  case T_SIZE:
  case T_DURATION:
    if (parse_scaled(text, s->kind == T_SIZE ? size_units : duration_units, &v) != 0 || v < s->min || v > s->max)
      goto invalid;
    *(uint64_t *)field = v;
    return 0;
  case T_LOGLEVEL:
    if ((level = arq_log_level_parse(text)) < 0)
      goto invalid;
    *(int *)field = level;
    return 0;
  case T_CHANNELS:
  case T_IDS:
  case T_CHANNEL: {
    char *list = parse_list(text, s->kind == T_CHANNEL ? T_CHANNELS : s->kind);
    if (!list || (s->kind == T_CHANNEL && strchr(list, ','))) {
      arq_free(list);
      goto invalid;
    }
    arq_free(*(char **)field);
    *(char **)field = list;
    return 0;
  }
  case T_REDIS:
  case T_LIST: {
    char *list = parse_list(text, s->kind);
    if (!list)
      goto invalid;
    arq_free(*(char **)field);
    *(char **)field = list;
    return 0;
  }
  case T_BOOL:
    if (strcasecmp(text, "true") == 0 || strcasecmp(text, "yes") == 0 || strcasecmp(text, "on") == 0 ||
        strcmp(text, "1") == 0)
      *(bool *)field = true;
    else if (strcasecmp(text, "false") == 0 || strcasecmp(text, "no") == 0 || strcasecmp(text, "off") == 0 ||
             strcmp(text, "0") == 0)
      *(bool *)field = false;
    else
      goto invalid;
    return 0;
  case T_TEXT:
    for (const char *t = text; *t; t++)
      if (*t < 0x20 || *t > 0x7e)
        goto invalid;
    arq_free(*(char **)field);
    *(char **)field = arq_strdup(text);
    return 0;
  case T_AUTH:
  case T_JWTALG: {
    const char *const *names = s->kind == T_AUTH ? auth_modes : jwt_algs;
    int i = 0;
    while (names[i] && strcasecmp(names[i], text) != 0)
      i++;
    if (!names[i])
      goto invalid;
    *(int *)field = i;
    return 0;
  }
  case T_PATH:
    if (text[0] && access(text, R_OK) != 0) {
      snprintf(err, errcap, "config: cannot read '%s' for %s (%s): %s", text, s->key, origin, strerror(errno));
      return ARQ_EINVAL;
    }
    arq_free(*(char **)field);
    *(char **)field = arq_strdup(text);
    return 0;
  case T_NODE:
    if (text[0] && !arq_names_valid_client_id(text, strlen(text)))
      goto invalid;
    arq_free(*(char **)field);
    *(char **)field = arq_strdup(text);
    return 0;
  case T_TLSVER:
    if (strcmp(text, "1.2") == 0)
      *(int *)field = ARQ_TLS_1_2;
    else if (strcmp(text, "1.3") == 0)
      *(int *)field = ARQ_TLS_1_3;
    else
      goto invalid;
    return 0;
  case T_LOGFMT:
    if (strcasecmp(text, "logfmt") == 0)
      *(arq_logfmt_t *)field = ARQ_LOGFMT_LOGFMT;
    else if (strcasecmp(text, "json") == 0)
      *(arq_logfmt_t *)field = ARQ_LOGFMT_JSON;
    else
      goto invalid;
    return 0;
  }
invalid:;
  char shown[96], want[160];
  expected(s, want, sizeof want);
  /* A secret is never repeated, not even in an error. */
  bool secret = strcmp(s->key, "jwt_secret") == 0 || strcmp(s->key, "ops_token") == 0;
  snprintf(err, errcap, "config: invalid value '%s' for %s (%s): expected %s",
           secret ? "(secret not shown)" : show(shown, sizeof shown, text, strlen(text)), s->key, origin, want);
  return ARQ_EINVAL;
}

/* ---- defaults ----------------------------------------------------------- */

void arq_config_defaults(arq_config_t *c) {
  memset(c, 0, sizeof *c);
  for (size_t i = 0; i < NSETTINGS; i++) {
    int rc = set_value(c, &settings[i], settings[i].def, "default", NULL, 0);
    assert(rc == 0 && "a default in the settings table does not parse");
    (void)rc;
  }
}

/* Kinds whose field is a char * the configuration owns. */
static bool owns_string(kind_t kind) {
  switch (kind) {
  case T_ADDR:
  case T_CHANNELS:
  case T_IDS:
  case T_CHANNEL:
  case T_REDIS:
  case T_NODE:
  case T_PATH:
  case T_LIST:
  case T_TEXT:
  case T_OPTADDR:
    return true;
  default:
    return false;
  }
}

void arq_config_free(arq_config_t *c) {
  for (size_t i = 0; i < NSETTINGS; i++) {
    if (owns_string(settings[i].kind)) {
      char **field = (char **)((char *)c + settings[i].offset);
      arq_free(*field);
      *field = NULL;
    }
  }
  arq_free(c->config_file);
  c->config_file = NULL;
}

/* ---- the YAML file ------------------------------------------------------ */

typedef struct yaml_file {
  const char *path;
  yaml_parser_t parser;
  yaml_event_t event;
  bool live; /* 'event' holds a parsed event to delete */
} yaml_file_t;

/* Replaces the current event with the next one. */
static int next_event(yaml_file_t *f, char *err, size_t errcap) {
  char path[1024];
  if (f->live)
    yaml_event_delete(&f->event);
  f->live = false;
  if (yaml_parser_parse(&f->parser, &f->event)) {
    f->live = true;
    return 0;
  }
  show(path, sizeof path, f->path, strlen(f->path));
  if (f->parser.error == YAML_READER_ERROR)
    snprintf(err, errcap, "config: cannot read %s: %s", path, f->parser.problem ? f->parser.problem : "read error");
  else
    snprintf(err, errcap, "config: YAML syntax error in %s (line %zu): %s%s%s", path,
             f->parser.problem_mark.line + 1, f->parser.problem ? f->parser.problem : "invalid YAML",
             f->parser.context ? " " : "", f->parser.context ? f->parser.context : "");
  return ARQ_EINVAL;
}

static size_t event_line(const yaml_file_t *f) { return f->event.start_mark.line + 1; }

static bool is_null_scalar(const yaml_event_t *e) {
  const char *v = (const char *)e->data.scalar.value;
  return e->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
         (e->data.scalar.length == 0 || strcmp(v, "~") == 0 || strcmp(v, "null") == 0);
}

/* Reads a YAML list of names (the current event is its start) as the value of
 * 's': the items are joined with commas and parsed as a comma-separated list. */
static int read_list(arq_config_t *c, yaml_file_t *f, const setting_t *s, char *err, size_t errcap) {
  char path[1024], origin[1100];
  show(path, sizeof path, f->path, strlen(f->path));
  snprintf(origin, sizeof origin, "%s:%zu", path, event_line(f));
  size_t len = 0;
  char *joined = arq_calloc(1, 1);
  int rc = ARQ_EINVAL;
  for (;;) {
    if (next_event(f, err, errcap) != 0)
      goto free_joined;
    if (f->event.type == YAML_SEQUENCE_END_EVENT)
      break;
    const char *item = (const char *)f->event.data.scalar.value;
    size_t n = f->event.type == YAML_SCALAR_EVENT ? f->event.data.scalar.length : 0;
    if (f->event.type != YAML_SCALAR_EVENT || n == 0 || strlen(item) != n || strchr(item, ',')) {
      snprintf(err, errcap, "config: the list '%s' in %s (line %zu) must hold plain names", s->key, path,
               event_line(f));
      goto free_joined;
    }
    joined = arq_realloc(joined, len + n + 2);
    if (len)
      joined[len++] = ',';
    memcpy(joined + len, item, n + 1);
    len += n;
  }
  rc = set_value(c, s, joined, origin, err, errcap);
free_joined:
  arq_free(joined);
  return rc;
}

/* Reads the pairs of the root mapping, whose start is the current event. */
static int read_pairs(arq_config_t *c, yaml_file_t *f, char *err, size_t errcap) {
  char path[1024], shown[96], origin[1100];
  bool seen[NSETTINGS] = {false};
  show(path, sizeof path, f->path, strlen(f->path));
  for (;;) {
    if (next_event(f, err, errcap) != 0)
      return ARQ_EINVAL;
    if (f->event.type == YAML_MAPPING_END_EVENT)
      return 0;
    if (f->event.type != YAML_SCALAR_EVENT) {
      snprintf(err, errcap, "config: keys in %s must be plain names (line %zu)", path, event_line(f));
      return ARQ_EINVAL;
    }
    const char *key = (const char *)f->event.data.scalar.value;
    size_t keylen = f->event.data.scalar.length;
    const setting_t *s = find_key(key, keylen);
    if (s == NULL) {
      snprintf(err, errcap, "config: unknown key '%s' in %s (line %zu)", show(shown, sizeof shown, key, keylen), path,
               event_line(f));
      return ARQ_EINVAL;
    }
    if (seen[s - settings]) {
      snprintf(err, errcap, "config: key '%s' appears twice in %s (line %zu)", s->key, path, event_line(f));
      return ARQ_EINVAL;
    }
    seen[s - settings] = true;

    if (next_event(f, err, errcap) != 0)
      return ARQ_EINVAL;
    if (f->event.type == YAML_SEQUENCE_START_EVENT && (s->kind == T_CHANNELS || s->kind == T_IDS || s->kind == T_LIST)) {
      if (read_list(c, f, s, err, errcap) != 0)
        return ARQ_EINVAL;
      continue;
    }
    if (f->event.type != YAML_SCALAR_EVENT) {
      snprintf(err, errcap, "config: value of '%s' in %s (line %zu) must be a single value, not a %s", s->key, path,
               event_line(f),
               f->event.type == YAML_SEQUENCE_START_EVENT  ? "list"
               : f->event.type == YAML_MAPPING_START_EVENT ? "mapping"
                                                            : "reference");
      return ARQ_EINVAL;
    }
    const char *value = (const char *)f->event.data.scalar.value;
    snprintf(origin, sizeof origin, "%s:%zu", path, event_line(f));
    /* A "\0" escape would hide the rest of the value from the parsers. */
    if (strlen(value) != f->event.data.scalar.length) {
      snprintf(err, errcap, "config: invalid value for %s (%s): it contains a NUL byte", s->key, origin);
      return ARQ_EINVAL;
    }
    if (set_value(c, s, value, origin, err, errcap) != 0)
      return ARQ_EINVAL;
  }
}

/* Reads 'path': nothing, or one document whose root is a mapping of setting
 * keys to single values. */
static int load_file(arq_config_t *c, const char *path, char *err, size_t errcap) {
  char shown[1024];
  struct stat st;
  yaml_file_t f = {.path = path, .live = false};
  int rc = ARQ_EINVAL;

  show(shown, sizeof shown, path, strlen(path));
  FILE *fp = fopen(path, "rb");
  if (fp == NULL) {
    snprintf(err, errcap, "config: cannot read config file %s: %s", shown, strerror(errno));
    return ARQ_EINVAL;
  }
  if (fstat(fileno(fp), &st) == 0 && S_ISDIR(st.st_mode)) {
    snprintf(err, errcap, "config: cannot read config file %s: %s", shown, strerror(EISDIR));
    goto close_file;
  }
  if (!yaml_parser_initialize(&f.parser)) {
    snprintf(err, errcap, "config: cannot read config file %s: out of memory", shown);
    goto close_file;
  }
  yaml_parser_set_input_file(&f.parser, fp);

  if (next_event(&f, err, errcap) != 0) /* stream start */
    goto delete_parser;
  if (next_event(&f, err, errcap) != 0)
    goto delete_parser;
  if (f.event.type == YAML_STREAM_END_EVENT) { /* empty, or only comments */
    rc = 0;
    goto delete_parser;
  }
  if (next_event(&f, err, errcap) != 0) /* the root node, after the document start */
    goto delete_parser;
  if (f.event.type == YAML_MAPPING_START_EVENT) {
    if (read_pairs(c, &f, err, errcap) != 0)
      goto delete_parser;
  } else if (!(f.event.type == YAML_SCALAR_EVENT && is_null_scalar(&f.event))) { /* "---" alone is empty */
    snprintf(err, errcap, "config: %s must be a mapping of keys to values, like 'port: 9100' (line %zu)", shown,
             event_line(&f));
    goto delete_parser;
  }
  if (next_event(&f, err, errcap) != 0) /* document end */
    goto delete_parser;
  if (next_event(&f, err, errcap) != 0)
    goto delete_parser;
  if (f.event.type != YAML_STREAM_END_EVENT) {
    snprintf(err, errcap, "config: %s holds more than one YAML document (line %zu)", shown, event_line(&f));
    goto delete_parser;
  }
  rc = 0;

delete_parser:
  if (f.live)
    yaml_event_delete(&f.event);
  yaml_parser_delete(&f.parser);
close_file:
  fclose(fp);
  return rc;
}

/* ---- flags -------------------------------------------------------------- */

typedef enum { ARG_SETTING, ARG_CONFIG, ARG_HELP, ARG_VERSION, ARG_BAD } arg_kind_t;

typedef struct arg {
  arg_kind_t kind;
  const setting_t *setting; /* ARG_SETTING */
  const char *value;        /* ARG_SETTING, ARG_CONFIG */
  char flag[48];            /* the flag as written, without any "=value" */
} arg_t;

/* Reads the argument at argv[*i], and its value from the same argument
 * ("--port=9100") or the next one ("--port 9100"), and advances '*i'. On
 * ARG_BAD writes the problem into 'err' (which may be NULL). */
static arg_kind_t next_arg(int argc, char **argv, int *i, arg_t *a, char *err, size_t errcap) {
  const char *arg = argv[(*i)++];
  char shown[96];
  a->setting = NULL;
  a->value = NULL;
  show(a->flag, sizeof a->flag, arg, strcspn(arg, "="));

  if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0)
    return a->kind = ARG_HELP;
  if (strcmp(arg, "-V") == 0 || strcmp(arg, "--version") == 0)
    return a->kind = ARG_VERSION;
  if (arg[0] != '-' || arg[1] == '\0') {
    snprintf(err, errcap, "config: unexpected argument '%s' (settings are flags, e.g. --port 9100)",
             show(shown, sizeof shown, arg, strlen(arg)));
    return a->kind = ARG_BAD;
  }
  const char *name = arg + 2;
  size_t namelen = strcspn(name, "=");
  if (arg[1] == '-' && namelen == strlen("config") && memcmp(name, "config", namelen) == 0)
    a->kind = ARG_CONFIG;
  else if (arg[1] == '-' && (a->setting = find_flag(name, namelen)) != NULL)
    a->kind = ARG_SETTING;
  else if (strcmp(a->flag, "--help") == 0 || strcmp(a->flag, "--version") == 0) {
    snprintf(err, errcap, "config: flag %s takes no value", a->flag);
    return a->kind = ARG_BAD;
  } else {
    snprintf(err, errcap, "config: unknown flag '%s' (see --help)", a->flag);
    return a->kind = ARG_BAD;
  }

  if (name[namelen] == '=') {
    a->value = name + namelen + 1;
  } else if (*i < argc && strncmp(argv[*i], "--", 2) != 0) {
    a->value = argv[(*i)++];
  } else {
    snprintf(err, errcap, "config: flag %s needs a value", a->flag);
    return a->kind = ARG_BAD;
  }
  return a->kind;
}

/* ---- loading ------------------------------------------------------------ */

/* Splits "K=V" at the '='. Returns false for an entry without one. */
static bool split_env(const char *entry, size_t *namelen, const char **value) {
  const char *eq = strchr(entry, '=');
  if (eq == NULL)
    return false;
  *namelen = (size_t)(eq - entry);
  *value = eq + 1;
  return true;
}

static bool is_config_var(const char *name, size_t n) {
  return n == strlen(ENV_CONFIG) && memcmp(name, ENV_CONFIG, n) == 0;
}

static int check_env(char **envp, const char **config, char *err, size_t errcap) {
  char shown[96];
  for (char **e = envp; e != NULL && *e != NULL; e++) {
    size_t n;
    const char *value;
    if (!split_env(*e, &n, &value) || strncmp(*e, ENV_PREFIX, strlen(ENV_PREFIX)) != 0)
      continue;
    if (is_config_var(*e, n)) {
      *config = value;
    } else if (find_env(*e, n) == NULL) {
      snprintf(err, errcap, "config: unknown environment variable %s", show(shown, sizeof shown, *e, n));
      return ARQ_EINVAL;
    }
  }
  return 0;
}

static int apply_env(arq_config_t *c, char **envp, char *err, size_t errcap) {
  char origin[64];
  for (char **e = envp; e != NULL && *e != NULL; e++) {
    size_t n;
    const char *value;
    const setting_t *s;
    if (!split_env(*e, &n, &value) || strncmp(*e, ENV_PREFIX, strlen(ENV_PREFIX)) != 0)
      continue;
    if ((s = find_env(*e, n)) == NULL)
      continue; /* ARQONBUS_CONFIG; check_env() refused the rest */
    if (set_value(c, s, value, env_name(s, origin, sizeof origin), err, errcap) != 0)
      return ARQ_EINVAL;
  }
  return 0;
}

/* True when the first 'n' bytes of 's' equal an earlier item of the
 * comma-separated 'items', among the 'count' items before, cut at 'stop'
 * (':' compares rooms, ',' whole names). */
static bool seen_before(const char *const *items, size_t count, const char *s, size_t n, char stop) {
  for (size_t i = 0; i < count; i++)
    if (strcspn(items[i], stop == ':' ? ":," : ",") == n && memcmp(items[i], s, n) == 0)
      return true;
  return false;
}

/* Counts the distinct channels and rooms that always exist: the bootstrap
 * channels, the telemetry channel and the dashboard channel (each already
 * checked as room:channel names). */
static void count_fixed(const arq_config_t *c, size_t *nchannels, size_t *nrooms) {
  const char *lists[3] = {c->bootstrap_channels, c->telemetry_channel, c->dashboard_channel};
  size_t n = 3;
  for (int k = 0; k < 3; k++)
    for (const char *p = lists[k]; *p; p++)
      n += *p == ',';
  const char **items = arq_calloc(n, sizeof *items);
  size_t count = 0;
  *nchannels = *nrooms = 0;
  for (int k = 0; k < 3; k++) {
    for (const char *p = lists[k]; *p;) {
      size_t len = strcspn(p, ",");
      if (!seen_before(items, count, p, len, ',')) {
        ++*nchannels;
        *nrooms += !seen_before(items, count, p, strcspn(p, ":"), ':');
        items[count++] = p;
      }
      p += len + (p[len] == ',');
    }
  }
  arq_free(items);
}

/* The channels that always exist must fit max_channels and max_rooms. */
static int check_bootstrap_fits(const arq_config_t *c, char *err, size_t errcap) {
  size_t nchannels, nrooms;
  count_fixed(c, &nchannels, &nrooms);
  if (nchannels > c->max_channels || nrooms > c->max_rooms) {
    snprintf(err, errcap,
             "config: the bootstrap, telemetry and dashboard channels (%zu channels in %zu rooms) do not fit "
             "max_channels %" PRIu64 " and max_rooms %" PRIu64,
             nchannels, nrooms, c->max_channels, c->max_rooms);
    return ARQ_EINVAL;
  }
  return 0;
}

/* The checks no single value can make. */
/* Reads the whole file 'path' (at most 1 MiB) into a new NUL-terminated
 * buffer (caller owns), its length in '*len'. NULL with a message on failure. */
static char *read_small_file(const char *key, const char *path, size_t *len, char *err, size_t errcap) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(err, errcap, "config: cannot read %s '%s': %s", key, path, strerror(errno));
    return NULL;
  }
  size_t cap = 1 << 20;
  char *buf = arq_malloc(cap + 1);
  size_t n = fread(buf, 1, cap + 1, f);
  bool failed = ferror(f) != 0;
  fclose(f);
  if (failed || n > cap) {
    snprintf(err, errcap, "config: cannot read %s '%s': %s", key, path, failed ? "read error" : "over 1 MiB");
    arq_free(buf);
    return NULL;
  }
  buf[n] = '\0';
  *len = n;
  return buf;
}

int arq_config_auth(const arq_config_t *c, arq_auth_t **out, char *err, size_t errcap) {
  *out = NULL;
  if (c->auth == ARQ_AUTH_NONE)
    return 0;
  arq_auth_opts_t o = {.mode = c->auth, .jwt_alg = c->jwt_algorithm, .jwt_audience = c->jwt_audience,
                       .jwt_issuer = c->jwt_issuer, .leeway_ms = c->jwt_leeway_ms};
  char *file = NULL, *keys = NULL;
  size_t flen = 0;
  int rc = ARQ_EINVAL;
  if (c->auth == ARQ_AUTH_API_KEY) {
    if (c->api_keys_file[0] && !(file = read_small_file("api_keys_file", c->api_keys_file, &flen, err, errcap)))
      goto done;
    keys = arq_malloc(strlen(c->api_keys) + flen + 2);
    sprintf(keys, "%s\n%s", c->api_keys, file ? file : "");
    o.api_keys = keys;
  } else {
    if (c->jwt_secret[0] && c->jwt_key_file[0]) {
      snprintf(err, errcap, "config: jwt_secret and jwt_key_file are both set; set one");
      goto done;
    }
    if (c->jwt_algorithm != ARQ_JWT_HS256 && c->jwt_secret[0]) {
      snprintf(err, errcap, "config: jwt_secret is for HS256; %s needs jwt_key_file (a PEM public key)",
               c->jwt_algorithm == ARQ_JWT_RS256 ? "RS256" : "ES256");
      goto done;
    }
    if (c->jwt_key_file[0]) {
      if (!(file = read_small_file("jwt_key_file", c->jwt_key_file, &flen, err, errcap)))
        goto done;
      if (c->jwt_algorithm == ARQ_JWT_HS256) /* a secret in a file usually ends with a newline */
        while (flen > 0 && (file[flen - 1] == '\n' || file[flen - 1] == '\r'))
          file[--flen] = '\0';
      o.jwt_key = (const unsigned char *)file;
      o.jwt_key_len = flen;
    } else {
      o.jwt_key = (const unsigned char *)c->jwt_secret;
      o.jwt_key_len = strlen(c->jwt_secret);
    }
  }
  char why[240];
  *out = arq_auth_new(&o, why, sizeof why);
  if (!*out) {
    snprintf(err, errcap, "config: auth %s: %s", auth_modes[c->auth], why);
    goto done;
  }
  rc = 0;
done:
  if (file) {
    memset(file, 0, flen);
    arq_free(file);
  }
  arq_free(keys);
  return rc;
}

/* Checks the entries "name=role+role" of the list setting 'key' ('list');
 * 'valid' says whether a name is acceptable. */
static int check_role_entries(const char *key, const char *list, arq_role_entry_fn valid, char *err,
                              size_t errcap) {
  char bad[96];
  if (arq_role_entries(list, valid, NULL, bad, sizeof bad) == 0)
    return 0;
  snprintf(err, errcap, "config: %s entry '%s' must be NAME=role[+role...] with roles admin, user, guest", key, bad);
  return ARQ_EINVAL;
}

static int valid_room(const char *name, unsigned roles, void *ud) {
  return arq_names_valid_channel(name, strlen(name)) ? 0 : ARQ_EINVAL;
}

static int valid_command(const char *name, unsigned roles, void *ud) {
  for (size_t i = 0; arq_bus_command_name(i); i++)
    if (strcmp(arq_bus_command_name(i), name) == 0)
      return 0;
  return ARQ_ENOTFOUND;
}

static int check_combination(const arq_config_t *c, char *err, size_t errcap) {
  if (check_role_entries("protected_rooms", c->protected_rooms, valid_room, err, errcap) != 0 ||
      check_role_entries("command_roles", c->command_roles, valid_command, err, errcap) != 0)
    return ARQ_EINVAL;
  arq_auth_t *auth = NULL;
  if (arq_config_auth(c, &auth, err, errcap) != 0)
    return ARQ_EINVAL;
  arq_auth_free(auth);
  const struct {
    const char *key;
    int port;
  } ports[] = {{"port", c->port}, {"telemetry_port", c->telemetry_port}, {"http_port", c->http_port}};
  for (size_t i = 0; i < 3; i++)
    for (size_t j = i + 1; j < 3; j++)
      if (ports[i].port == ports[j].port) {
        snprintf(err, errcap, "config: %s and %s are both %d; the three ports must differ", ports[i].key,
                 ports[j].key, ports[i].port);
        return ARQ_EINVAL;
      }
  if (!c->tls_cert[0] != !c->tls_key[0]) {
    snprintf(err, errcap, "config: tls_cert and tls_key go together: %s is set but %s is empty (set both for TLS, "
                          "neither for plaintext)", c->tls_cert[0] ? "tls_cert" : "tls_key",
             c->tls_cert[0] ? "tls_key" : "tls_cert");
    return ARQ_EINVAL;
  }
  if (c->heartbeat_interval_ms > 0 && c->heartbeat_timeout_ms == 0) {
    snprintf(err, errcap, "config: heartbeat_timeout must be above 0 while heartbeat_interval is set "
                          "(set heartbeat_interval to 0 to disable pings)");
    return ARQ_EINVAL;
  }
  for (const char *p = c->allowed_origins; *p;) {
    size_t len = strcspn(p, ",");
    if (!arq_ws_origin_valid(p, len)) {
      char shown[96];
      snprintf(err, errcap, "config: invalid item '%s' in allowed_origins: expected scheme://host[:port] (no path), "
               "null or *", show(shown, sizeof shown, p, len));
      return ARQ_EINVAL;
    }
    p += len + (p[len] == ',');
  }
  return check_bootstrap_fits(c, err, errcap);
}

int arq_config_load(arq_config_t *c, int argc, char **argv, char **envp, arq_config_action_t *action, char *err,
                    size_t errcap) {
  const char *config = NULL;
  arg_t a;
  *action = ARQ_CONFIG_RUN;
  if (errcap > 0)
    err[0] = '\0';

  /* --help and --version answer even when the rest would not load. */
  for (int i = 1; i < argc;) {
    next_arg(argc, argv, &i, &a, NULL, 0);
    if (a.kind == ARG_HELP || a.kind == ARG_VERSION) {
      *action = a.kind == ARG_HELP ? ARQ_CONFIG_HELP : ARQ_CONFIG_VERSION;
      return 0;
    }
  }

  const char *config_flag = NULL;
  for (int i = 1; i < argc;) {
    if (next_arg(argc, argv, &i, &a, err, errcap) == ARG_BAD)
      return ARQ_EINVAL;
    if (a.kind == ARG_CONFIG)
      config_flag = a.value;
  }
  if (check_env(envp, &config, err, errcap) != 0)
    return ARQ_EINVAL;
  if (config_flag != NULL)
    config = config_flag;

  if (config != NULL) {
    if (config[0] == '\0') {
      snprintf(err, errcap, "config: invalid value '' for %s: expected a file name",
               config_flag != NULL ? "--config" : ENV_CONFIG);
      return ARQ_EINVAL;
    }
    if (load_file(c, config, err, errcap) != 0)
      return ARQ_EINVAL;
    arq_free(c->config_file);
    c->config_file = arq_strdup(config);
  }
  if (apply_env(c, envp, err, errcap) != 0)
    return ARQ_EINVAL;
  for (int i = 1; i < argc;) {
    next_arg(argc, argv, &i, &a, NULL, 0);
    if (a.kind == ARG_SETTING && set_value(c, a.setting, a.value, a.flag, err, errcap) != 0)
      return ARQ_EINVAL;
  }
  return check_combination(c, err, errcap);
}

/* ---- --help ------------------------------------------------------------- */

static const char *metavar(kind_t kind) {
  switch (kind) {
  case T_ADDR:
    return "ADDR";
  case T_PORT:
    return "PORT";
  case T_COUNT:
    return "N";
  case T_SIZE:
    return "SIZE";
  case T_DURATION:
    return "DURATION";
  case T_LOGLEVEL:
    return "LEVEL";
  case T_LOGFMT:
    return "FORMAT";
  case T_CHANNELS:
    return "LIST";
  case T_IDS:
    return "LIST";
  case T_CHANNEL:
    return "CHANNEL";
  case T_REDIS:
    return "URL";
  case T_BOOL:
    return "BOOL";
  case T_NODE:
    return "NAME";
  case T_PATH:
    return "FILE";
  case T_LIST:
    return "LIST";
  case T_TEXT:
    return "TEXT";
  case T_OPTADDR:
    return "ADDR";
  case T_AUTH:
    return "MODE";
  case T_JWTALG:
    return "ALG";
  case T_TLSVER:
    return "VERSION";
  }
  return "VALUE";
}

void arq_config_usage(FILE *out) {
  char flag[96], env[64], range[96], lo[32], hi[32];
  fprintf(out, "Usage: arqonbus [--config FILE] [--SETTING VALUE]...\n"
               "\n"
               "Runs the ArqonBus WebSocket message bus. Each setting comes from, lowest\n"
               "precedence first: its default, the YAML file named by --config or\n"
               "ARQONBUS_CONFIG, its ARQONBUS_* environment variable, its flag.\n"
               "Flags take their value as --port 9100 or --port=9100. Sizes are bytes,\n"
               "or take B, KiB, MiB, GiB (k, M, G mean the same); durations take ms, s\n"
               "or m, and a bare number is seconds. See docs/configuration.md.\n"
               "\n");
  fprintf(out, "  %-30s %s\n      %s\n", "--config FILE", ENV_CONFIG, "YAML file of settings, one 'key: value' per line");
  for (size_t i = 0; i < NSETTINGS; i++) {
    const setting_t *s = &settings[i];
    snprintf(flag, sizeof flag, "%s %s", flag_name(s, env, sizeof env), metavar(s->kind));
    range[0] = '\0';
    if (s->kind == T_SIZE || s->kind == T_DURATION) {
      fmt_amount(s->kind, lo, sizeof lo, s->min);
      fmt_amount(s->kind, hi, sizeof hi, s->max);
      snprintf(range, sizeof range, ", range %s-%s", lo, hi);
    } else if (s->kind == T_COUNT || s->kind == T_PORT) {
      snprintf(range, sizeof range, ", range %" PRIu64 "-%" PRIu64, s->min, s->max);
    }
    fprintf(out, "  %-30s %s\n      %s\n      default %s%s\n", flag, env_name(s, env, sizeof env), s->meaning,
            s->def[0] ? s->def : "\"\"", range);
  }
  fprintf(out, "  %-30s print this help and exit\n", "-h, --help");
  fprintf(out, "  %-30s print the version and exit\n", "-V, --version");
}
