/* The telemetry stream: monitoring clients on the telemetry port.
 *
 * A monitoring client connects with WebSocket to the telemetry port,
 * optionally naming the event types it wants (?events=client_connected,stats),
 * and receives telemetry envelopes. Each event is encoded once and the frame
 * shared by every monitoring client that wants it. A client whose queue holds
 * more than telemetry_queue bytes misses events (they are dropped for it and
 * counted) instead of slowing the bus or being disconnected.
 */
#ifndef ARQ_NET_TELEMETRY_H
#define ARQ_NET_TELEMETRY_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "bus/bus.h"
#include "net/server.h"

/* Parses the 'events' parameter of the upgrade query ('n' bytes at 'q') into
 * '*mask' (all kinds when absent). Returns 0, or ARQ_EINVAL with a message. */
int arq_telemetry_parse_query(const char *q, size_t n, uint32_t *mask, char *err, size_t errcap);

/* Adds the just-opened monitoring connection 'c' with its 'mask' and sends
 * its welcome. */
/* Closes the monitoring connections whose token has expired (4002). */
void arq_telemetry_expire(arq_server_t *srv, uint64_t now_wall_ms);

void arq_telemetry_attach(arq_server_t *srv, arq_conn_t *c, uint32_t mask);
/* Removes 'c' (closing). */
void arq_telemetry_detach(arq_server_t *srv, arq_conn_t *c);

/* Sends the telemetry envelope 'env' (borrowed) of kind 'ev' to every
 * monitoring client that wants it. */
void arq_telemetry_publish(arq_server_t *srv, arq_tel_event_t ev, json_t *env);
/* Reports an event the shell observed: 'payload' is stolen. */
void arq_telemetry_report(arq_server_t *srv, arq_tel_event_t ev, json_t *payload);
/* Sends the periodic stats snapshot. */
void arq_telemetry_stats(arq_server_t *srv);
/* Returns the stats snapshot (caller owns), also used for the stats log. */
json_t *arq_telemetry_snapshot(arq_server_t *srv);

#endif
