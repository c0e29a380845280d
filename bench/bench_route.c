/* bench_route: the cost of the bus core alone, without sockets.
 *
 *   build/release/bench_route [SUBSCRIBERS] [MESSAGES] [PAYLOAD_BYTES]
 *
 * Creates a bus whose "connections" only count what they are given, joins
 * SUBSCRIBERS clients to bench:fanout, then feeds MESSAGES event envelopes
 * from one more client through arq_bus_receive(), exactly as the network
 * shell does. Prints messages and deliveries per second and the time per
 * message: parsing and validating once, building and encoding once, storing
 * in history and handing the one frame to every subscriber. Compare runs of
 * this program, not its numbers with the network benchmark (bench/README.md).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bus/bus.h"
#include "util/alloc.h"

static unsigned long long delivered, bytes;

static bool count_send(void *ud, void *conn, arq_rcbuf_t *frame) {
  delivered++;
  bytes += frame->len;
  return true;
}

static void no_close(void *ud, void *conn, uint16_t code, const char *why) {}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  unsigned subs = argc > 1 ? (unsigned)atoi(argv[1]) : 1000;
  unsigned msgs = argc > 2 ? (unsigned)atoi(argv[2]) : 20000;
  unsigned size = argc > 3 ? (unsigned)atoi(argv[3]) : 64;
  arq_bus_opts_t o;
  arq_bus_opts_defaults(&o);
  /* The limits the server always enforces, as high as its settings go, so
   * that each message pays for the rate check without being refused. */
  o.rate_messages = 1000000;
  o.rate_bytes = UINT64_C(1) << 30;
  o.rate_close_after = 100;
  o.max_subscriptions = 256;
  o.max_channels = 10000;
  o.max_rooms = 1000;
  arq_bus_io_t io = {.send = count_send, .close = no_close};
  char err[256];
  arq_bus_t *bus = arq_bus_new(&o, &io, arq_history_mem_new(o.history_size), err, sizeof err);
  if (!bus) {
    fprintf(stderr, "bench_route: %s\n", err);
    return 1;
  }
  arq_client_t **clients = arq_calloc(subs + 1, sizeof *clients);
  arq_client_params_t p;
  static const char query[] = "channel=bench:fanout";
  arq_bus_parse_params(query, sizeof query - 1, &p, err, sizeof err);
  for (unsigned i = 0; i < subs; i++)
    clients[i] = arq_bus_connect(bus, &clients[i], &p, "bench");
  arq_bus_parse_params("", 0, &p, err, sizeof err);
  arq_client_t *pub = clients[subs] = arq_bus_connect(bus, &clients[subs], &p, "bench");

  char *msg = arq_malloc(size + 128);
  char *fill = arq_malloc(size + 1);
  memset(fill, 'x', size);
  fill[size] = '\0';
  int len = snprintf(msg, size + 128, "{\"type\":\"event\",\"room\":\"bench\",\"channel\":\"fanout\",\"payload\":{\"m\":\"%s\"}}",
                     fill);
  delivered = bytes = 0;
  double t0 = now_s();
  for (unsigned i = 0; i < msgs; i++)
    arq_bus_receive(bus, pub, msg, (size_t)len, false);
  double dt = now_s() - t0;
  printf("bench_route: %u subscribers, %u messages of %d bytes in, %.0f bytes out each\n", subs, msgs, len,
         delivered ? (double)bytes / (double)delivered : 0.0);
  printf("  elapsed        %.3f s\n", dt);
  printf("  messages/s     %.0f\n", msgs / dt);
  printf("  deliveries/s   %.0f (%llu deliveries)\n", (double)delivered / dt, delivered);
  printf("  per message    %.2f us (parse, validate, encode once, store, hand to %u subscribers)\n",
         dt * 1e6 / msgs, subs);

  for (unsigned i = 0; i <= subs; i++)
    arq_bus_disconnect(bus, clients[i]);
  arq_bus_free(bus);
  arq_free(clients);
  arq_free(msg);
  arq_free(fill);
  return delivered == (unsigned long long)subs * msgs ? 0 : 1;
}
