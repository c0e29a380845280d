/* Authorization: what a client's roles and credential let it do.
 *
 * Three rules, checked where a client acts (commands.c, bus.c):
 *
 *   commands      each command is open to the roles command_roles lists for
 *                 it (default: create_channel and delete_channel need admin),
 *                 to every role when it is not listed;
 *   rooms         a room in protected_rooms may be joined, published to and
 *                 read only by the roles listed for it, by admins, or by a
 *                 client whose token names the room in its 'rooms' claim; a
 *                 token with a 'rooms' claim limits its client to those rooms,
 *                 protected or not;
 *   guests        may read (join, history, the informational commands) but
 *                 not publish: no events, private messages or telemetry.
 *
 * Every denial is one 'forbidden' error to the client, a count by action in
 * the bus's figures and a report to the shell (io.denied) for the log.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "bus/bus_int.h"
#include "util/alloc.h"
#include "util/err.h"

static const char *const deny_names[ARQ_DENY_NACTIONS] = {"command", "room", "publish", "authenticate", "connect"};

const char *arq_deny_name(arq_deny_t a) { return (unsigned)a < ARQ_DENY_NACTIONS ? deny_names[a] : "?"; }

static int set_command_roles(const char *name, unsigned roles, void *ud) {
  arq_bus_t *b = ud;
  for (size_t i = 0; arq_bus_command_name(i); i++) {
    if (strcmp(arq_bus_command_name(i), name) == 0) {
      b->cmd_roles[i] = roles;
      return 0;
    }
  }
  return ARQ_ENOTFOUND;
}

static int add_protected(const char *name, unsigned roles, void *ud) {
  arq_bus_t *b = ud;
  if (!arq_names_valid_channel(name, strlen(name)))
    return ARQ_EINVAL;
  b->protected_rooms = arq_realloc(b->protected_rooms, (b->nprotected + 1) * sizeof *b->protected_rooms);
  arq_protected_t *p = &b->protected_rooms[b->nprotected++];
  snprintf(p->room, sizeof p->room, "%s", name);
  p->roles = roles;
  return 0;
}

int arq_access_init(arq_bus_t *b, const arq_bus_opts_t *o, char *err, size_t errcap) {
  for (size_t i = 0; i < sizeof b->cmd_roles / sizeof b->cmd_roles[0]; i++)
    b->cmd_roles[i] = ARQ_ROLES_ALL;
  char bad[96];
  if (arq_role_entries(o->command_roles, set_command_roles, b, bad, sizeof bad) != 0) {
    snprintf(err, errcap, "command_roles entry \"%s\" is not command=role[+role...] with a known command", bad);
    return ARQ_EINVAL;
  }
  if (arq_role_entries(o->protected_rooms, add_protected, b, bad, sizeof bad) != 0) {
    snprintf(err, errcap, "protected_rooms entry \"%s\" is not room=role[+role...] with a valid room", bad);
    return ARQ_EINVAL;
  }
  return 0;
}

void arq_access_free(arq_bus_t *b) {
  arq_free(b->protected_rooms);
  b->protected_rooms = NULL;
  b->nprotected = 0;
}

unsigned arq_access_default_roles(const arq_bus_t *b, const char *client_id) {
  if (!b->admins[0])
    return ARQ_ROLE_ADMIN | ARQ_ROLE_USER;
  for (size_t i = 0; b->admins[i]; i++)
    if (strcmp(b->admins[i], client_id) == 0)
      return ARQ_ROLE_ADMIN | ARQ_ROLE_USER;
  return ARQ_ROLE_USER;
}

void arq_bus_set_auth(arq_bus_t *b, arq_auth_t *auth) { b->o.auth = auth; }

json_t *arq_access_roles_json(unsigned roles) {
  json_t *a = json_array();
  static const char *const names[] = {"admin", "user", "guest"};
  for (unsigned i = 0; i < 3; i++)
    if (roles & (1u << i))
      json_array_append_new(a, json_string(names[i]));
  return a;
}

unsigned arq_access_command_roles(const arq_bus_t *b, size_t cmd) {
  return cmd < sizeof b->cmd_roles / sizeof b->cmd_roles[0] ? b->cmd_roles[cmd] : ARQ_ROLES_ALL;
}

bool arq_access_protected(const arq_bus_t *b, const char *room) {
  for (size_t i = 0; i < b->nprotected; i++)
    if (strcmp(b->protected_rooms[i].room, room) == 0)
      return true;
  return false;
}

bool arq_bus_may_use_room(const arq_bus_t *b, unsigned roles, const char *rooms, const char *room) {
  bool named = rooms && arq_auth_list_has(rooms, room);
  if (rooms && !named)
    return false;
  for (size_t i = 0; i < b->nprotected; i++)
    if (strcmp(b->protected_rooms[i].room, room) == 0)
      return named || (roles & (b->protected_rooms[i].roles | ARQ_ROLE_ADMIN)) != 0;
  return true;
}

void arq_access_deny(arq_bus_t *b, arq_client_t *c, const char *correlation_id, const char *command,
                     arq_deny_t action, const char *fmt, ...) {
  char why[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  b->st.forbidden[action]++;
  if (b->io.denied)
    b->io.denied(b->io.ud, c->id, c->remote, arq_deny_name(action), why);
  arq_bus_error(b, c, correlation_id, command, ARQ_CODE_FORBIDDEN, NULL, "%s", why);
}

bool arq_access_room(arq_bus_t *b, arq_client_t *c, const char *correlation_id, const char *command,
                     const char *room) {
  if (arq_bus_may_use_room(b, c->roles, c->rooms, room))
    return true;
  arq_access_deny(b, c, correlation_id, command, ARQ_DENY_ROOM, "room \"%s\" is not open to this client", room);
  return false;
}
