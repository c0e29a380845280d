/* libFuzzer target for the configuration reader (config.c): the YAML file,
 * the flags and the environment.
 *
 * The first input byte chooses the source. YAML: the rest is written to a
 * file and loaded with --config. Flags or environment: the rest is split at
 * NUL bytes into argv or envp entries. Whatever the input, loading must end
 * in success or in one bounded line starting with "config: " (or naming
 * --help/--version), never crash or leak, and a loaded configuration must
 * satisfy the documented invariants (distinct ports).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

#define MAX_PARTS 32

static char path[64];

static void check(bool ok, const char *what) {
  if (!ok) {
    fprintf(stderr, "fuzz_config: %s\n", what);
    abort();
  }
}

/* Splits 'data' at NUL bytes into at most MAX_PARTS strings, after 'first'. */
static int split(char *buf, size_t n, char **out, int start) {
  int k = start;
  size_t i = 0;
  while (i < n && k < MAX_PARTS) {
    out[k++] = buf + i;
    i += strlen(buf + i) + 1;
  }
  out[k] = NULL;
  return k;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  if (!path[0])
    snprintf(path, sizeof path, "/tmp/fuzz_config.%d.yaml", (int)getpid());
  uint8_t mode = data[0] % 3;
  data++;
  size--;
  char *buf = malloc(size + 1);
  memcpy(buf, data, size);
  buf[size] = '\0';
  char *argv[MAX_PARTS + 3] = {"arqonbus"};
  char *envp[MAX_PARTS + 1] = {NULL};
  int argc = 1;
  if (mode == 0) {
    FILE *f = fopen(path, "wb");
    check(f != NULL, "cannot write the temporary file");
    fwrite(data, 1, size, f);
    fclose(f);
    argv[1] = "--config";
    argv[2] = path;
    argv[3] = NULL;
    argc = 3;
  } else if (mode == 1) {
    argc = split(buf, size, argv, 1);
  } else {
    split(buf, size, envp, 0);
  }
  arq_config_t cfg;
  arq_config_action_t action;
  char err[512];
  memset(err, '#', sizeof err);
  arq_config_defaults(&cfg);
  int rc = arq_config_load(&cfg, argc, argv, envp, &action, err, sizeof err);
  check(memchr(err, '\0', sizeof err) != NULL, "the message is not terminated");
  if (rc == 0) {
    if (action == 0) {
      check(err[0] == '\0', "a message on success");
      check(cfg.port != cfg.telemetry_port && cfg.port != cfg.http_port && cfg.telemetry_port != cfg.http_port,
            "equal ports accepted");
    }
  } else {
    check(strncmp(err, "config: ", 8) == 0 && strchr(err, '\n') == NULL, "a malformed message");
  }
  arq_config_free(&cfg);
  free(buf);
  return 0;
}
