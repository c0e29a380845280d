"""The built-in commands (docs/protocol.md, Commands): each command's reply
and each error its row of the command table lists; privileged commands with
and without `admins`; replies go to the caller alone and carry the request's
id as correlation_id (a request without an id is given one).

Every envelope received goes through envelopes.check() (Bus.recv does it).
"""
import re

from envelopes import BOOTSTRAP, Bus, error_code

# The telemetry and dashboard channels always exist too, like bootstrap channels.
SPECIAL = ["integriguard:telemetry-stream", "integriguard:dashboard-events"]

TS_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$")
ID_RE = re.compile(r"^arq_[A-Za-z0-9_-]{1,124}$")
SUMMARY_KEYS = {"room", "channel", "members", "bootstrap", "created_at", "messages", "history"}
ALL_COMMANDS = ["status", "create_channel", "delete_channel", "join_channel", "leave_channel", "list_channels",
                "channel_info", "ping", "history", "help", "authenticate"]


def drain(bus):
    """The envelopes that reach 'bus' before the answer to a ping it sends now."""
    reply = bus.command("ping")
    assert reply["type"] == "system" and reply["command"] == "pong", reply
    return list(bus.skipped)


def ok(reply, command):
    assert reply["type"] == "system" and reply["command"] == command, reply
    return reply["payload"]


def err(reply, code, command):
    """Asserts an error envelope with 'code' that answers 'command'."""
    assert error_code(reply) == code, reply
    assert reply["command"] == command, reply
    assert reply["payload"]["message"], reply
    return reply["payload"]


def at(channel):
    room, ch = channel.split(":")
    return {"room": room, "channel": ch}


def history_by_channel(status):
    """{'room:channel': messages held} of the channels of a status payload
    that hold any."""
    return {"%s:%s" % (r["room"], c["channel"]): c["history"]
            for r in status["room_details"] for c in r["channels"] if c["history"]}


def test_status(server):
    a = Bus(server.port, client_type="ai-agent", screen_name="A")
    b = Bus(server.port, client_id="bee", channel="science:explore")
    p = ok(a.command("status"), "status")
    assert set(p) >= {"server", "clients", "rooms", "channels", "room_details", "messages", "history", "you"}
    assert p["server"]["name"] == "arqonbus" and TS_RE.match(p["server"]["started_at"])
    assert isinstance(p["server"]["version"], str) and p["server"]["version"]
    assert isinstance(p["server"]["uptime_seconds"], int) and p["server"]["uptime_seconds"] >= 0
    assert p["clients"]["total"] == 2
    assert p["clients"]["by_type"] == {"human": 1, "ai-agent": 1, "dashboard": 0, "service": 0}
    # The science room of the bootstrap channels, and integriguard.
    assert p["rooms"] == 2 and p["channels"] == len(BOOTSTRAP) + len(SPECIAL)
    assert p["history"]["backend"] == "memory" and p["history"]["capacity_per_channel"] == 500
    # a is an ai-agent: its connection was published on the dashboard channel.
    assert p["history"]["messages"] == 1
    assert history_by_channel(p) == {"integriguard:dashboard-events": 1}
    assert p["you"]["client_id"] == a.id and p["you"]["client_type"] == "ai-agent"
    assert p["you"]["screen_name"] == "A" and p["you"]["subscriptions"] == []
    received, delivered = p["messages"]["received"], p["messages"]["delivered"]

    b.join("lab:bench")
    for _ in range(3):
        b.send({"type": "event", "room": "science", "channel": "explore"})
    drain(b)
    a.join("science:explore")
    p = ok(a.command("status"), "status")
    assert p["rooms"] == 3 and p["channels"] == len(BOOTSTRAP) + len(SPECIAL) + 1
    # b's three events, and a's status and join_channel commands published on
    # the dashboard channel after its connection (b is human: nothing there).
    assert p["history"]["messages"] == 3 + 3
    assert history_by_channel(p) == {"science:explore": 3, "integriguard:dashboard-events": 3}
    assert p["messages"]["received"] > received and p["messages"]["delivered"] > delivered
    assert p["you"]["subscriptions"] == ["science:explore"]


def test_create_channel(server):
    a = Bus(server.port)
    watcher = Bus(server.port, channel="lab:old")    # a member of the room's other channels
    watcher.join("lab:older")
    elsewhere = Bus(server.port, channel="chat:public")
    a.join("lab:old")
    drain(watcher)

    p = ok(a.command("create_channel", at("lab:new")), "create_channel")
    creator_notes = a.skipped
    assert set(p) == SUMMARY_KEYS, p
    assert (p["room"], p["channel"], p["members"], p["bootstrap"], p["messages"], p["history"]) == \
        ("lab", "new", 0, False, 0, 0)
    assert TS_RE.match(p["created_at"])
    # Members of the room's other channels are told once each; the envelope
    # names the new channel.
    for notes in (drain(watcher), creator_notes):  # the creator is a member of lab:old too
        assert len(notes) == 1 and (notes[0]["room"], notes[0]["channel"]) == ("lab", "new"), notes
        assert notes[0]["type"] == "system" and notes[0]["payload"] == {"event": "channel_created", "by": a.id}
    assert drain(elsewhere) == []
    # The creator is not made a member.
    assert ok(a.command("channel_info", at("lab:new")), "channel_info")["member_list"] == []

    # In the payload, and as room:channel.
    p = ok(a.command("create_channel", room="lab", channel="newer"), "create_channel")
    assert (p["room"], p["channel"]) == ("lab", "newer")
    p = ok(a.command("create_channel", {"channel": "fresh:one"}), "create_channel")
    assert (p["room"], p["channel"]) == ("fresh", "one")

    # Errors.
    err(a.command("create_channel", at("lab:new")), "already_exists", "create_channel")
    err(a.command("create_channel", at("science:explore")), "already_exists", "create_channel")
    err(a.command("create_channel"), "invalid_argument", "create_channel")
    err(a.command("create_channel", {"room": "lab"}), "invalid_argument", "create_channel")
    err(a.command("create_channel", room="lab", channel="bad name!"), "invalid_argument", "create_channel")
    err(a.command("create_channel", room="lab", channel=5), "invalid_argument", "create_channel")
    err(a.command("create_channel", channel="a:b:c"), "invalid_argument", "create_channel")


def test_privileged_commands_with_admins(make_server):
    s = make_server(args=["--admins", "boss,root@ops"])
    user = Bus(s.port, client_id="user")
    boss = Bus(s.port, client_id="boss")
    err(user.command("create_channel", at("lab:x")), "forbidden", "create_channel")
    assert error_code(user.command("channel_info", at("lab:x"))) == "not_found"  # nothing was created
    ok(boss.command("create_channel", at("lab:x")), "create_channel")
    err(user.command("delete_channel", at("lab:x")), "forbidden", "delete_channel")
    ok(user.command("channel_info", at("lab:x")), "channel_info")  # still there
    root = Bus(s.port, client_id="root@ops")
    p = ok(root.command("delete_channel", at("lab:x")), "delete_channel")
    assert p["deleted"] is True
    # Everyone may run the other commands.
    for name in ("join_channel", "channel_info", "leave_channel"):
        ok(user.command(name, at("science:explore")), name)
    # help says which commands are privileged.
    cmds = {c["name"]: c["privileged"] for c in ok(user.command("help"), "help")["commands"]}
    assert {n for n, priv in cmds.items() if priv} == {"create_channel", "delete_channel", "status"}


def test_delete_channel(server):
    admin = Bus(server.port)
    m1 = Bus(server.port, channel="lab:doomed")
    m2 = Bus(server.port)
    m2.join("lab:doomed")
    m2.join("lab:safe")
    publisher = Bus(server.port)
    publisher.send({"type": "event", "room": "lab", "channel": "doomed"})
    drain(publisher)
    drain(m1)
    drain(m2)

    p = ok(admin.command("delete_channel", at("lab:doomed")), "delete_channel")
    assert p == {"room": "lab", "channel": "doomed", "deleted": True, "removed_members": 2}
    for m in (m1, m2):
        notes = drain(m)
        assert len(notes) == 1, notes
        assert notes[0]["type"] == "system" and (notes[0]["room"], notes[0]["channel"]) == ("lab", "doomed")
        assert notes[0]["payload"] == {"event": "channel_deleted", "by": admin.id, "reason": "deleted"}
    assert drain(admin) == []  # the admin was not a member
    err(admin.command("channel_info", at("lab:doomed")), "not_found", "channel_info")
    assert ok(m2.command("status"), "status")["you"]["subscriptions"] == ["lab:safe"]
    assert ok(m1.command("status"), "status")["you"]["subscriptions"] == []

    # The former members are no longer subscribed: an event to it (which
    # recreates the channel) does not reach them.
    publisher.send({"type": "event", "id": "arq_after_delete", "room": "lab", "channel": "doomed"})
    drain(publisher)
    assert drain(m1) == [] and drain(m2) == []
    assert ok(admin.command("channel_info", at("lab:doomed")), "channel_info")["members"] == 0
    # Leaving it now: not a member.
    err(m1.command("leave_channel", at("lab:doomed")), "not_found", "leave_channel")

    # Errors.
    err(admin.command("delete_channel", at("lab:never")), "not_found", "delete_channel")
    err(admin.command("delete_channel", at("science:general")), "forbidden", "delete_channel")
    err(admin.command("delete_channel"), "invalid_argument", "delete_channel")
    err(admin.command("delete_channel", room="lab"), "invalid_argument", "delete_channel")
    err(admin.command("delete_channel", room="lab", channel="-x"), "invalid_argument", "delete_channel")


def test_join_channel(server):
    a = Bus(server.port, screen_name="Ann")
    b = Bus(server.port)
    p = ok(a.command("join_channel", at("lab:bench")), "join_channel")
    assert set(p) == SUMMARY_KEYS | {"joined", "created"}, p
    assert (p["room"], p["channel"], p["members"], p["joined"], p["created"], p["bootstrap"]) == \
        ("lab", "bench", 1, True, True, False)
    p = ok(a.command("join_channel", at("lab:bench")), "join_channel")
    assert (p["members"], p["joined"], p["created"]) == (1, False, False)
    p = ok(b.command("join_channel", room="lab", channel="bench"), "join_channel")  # in the payload
    assert (p["members"], p["joined"], p["created"]) == (2, True, False)
    notes = drain(a)
    assert len(notes) == 1 and notes[0]["payload"] == {"event": "client_joined", "client_id": b.id,
                                                      "client_type": "human", "members": 2}, notes
    p = ok(b.command("join_channel", at("science:explore")), "join_channel")
    assert (p["bootstrap"], p["created"], p["joined"]) == (True, False, True)
    # Errors.
    err(a.command("join_channel"), "invalid_argument", "join_channel")
    err(a.command("join_channel", {"room": "lab"}), "invalid_argument", "join_channel")
    err(a.command("join_channel", channel="bench"), "invalid_argument", "join_channel")  # no room
    err(a.command("join_channel", room="lab", channel="x" * 65), "invalid_argument", "join_channel")


def test_leave_channel(server):
    a = Bus(server.port, channel="lab:bench")
    b = Bus(server.port, channel="lab:bench")
    drain(a)
    p = ok(a.command("leave_channel", at("lab:bench")), "leave_channel")
    assert p == {"room": "lab", "channel": "bench", "left": True, "members": 1}
    notes = drain(b)
    assert len(notes) == 1 and (notes[0]["room"], notes[0]["channel"]) == ("lab", "bench")
    assert notes[0]["payload"] == {"event": "client_left", "client_id": a.id, "client_type": "human",
                                   "members": 1, "reason": "left"}
    # No longer a member: events do not reach it.
    b.send({"type": "event", "room": "lab", "channel": "bench"})
    drain(b)
    assert drain(a) == []
    # Errors.
    err(a.command("leave_channel", at("lab:bench")), "not_found", "leave_channel")     # not a member
    err(a.command("leave_channel", at("science:explore")), "not_found", "leave_channel")
    err(a.command("leave_channel", at("lab:nothing")), "not_found", "leave_channel")   # no such channel
    err(a.command("leave_channel"), "invalid_argument", "leave_channel")
    err(a.command("leave_channel", channel="lab:a:b"), "invalid_argument", "leave_channel")


def test_list_channels(server):
    a = Bus(server.port)
    for key in ["zeta:a", "lab:b", "lab:a", "lab-2:x", "Lab:c", "lab:a.b", "lab:a-b", "0room:z"]:
        a.join(key)
    a.send({"type": "event", "room": "lab", "channel": "b"})
    p = ok(a.command("list_channels"), "list_channels")
    keys = ["%s:%s" % (c["room"], c["channel"]) for c in p["channels"]]
    expected = sorted(BOOTSTRAP + SPECIAL +
                      ["zeta:a", "lab:b", "lab:a", "lab-2:x", "Lab:c", "lab:a.b", "lab:a-b", "0room:z"])
    assert keys == expected, keys
    assert p["count"] == len(expected) and "room" not in p
    for c in p["channels"]:
        assert set(c) == SUMMARY_KEYS, c
    assert [k for k, c in zip(keys, p["channels"]) if c["bootstrap"]] == sorted(BOOTSTRAP + SPECIAL)
    labb = [c for c in p["channels"] if (c["room"], c["channel"]) == ("lab", "b")][0]
    assert (labb["members"], labb["messages"], labb["history"], labb["bootstrap"]) == (1, 1, 1, False)

    p = ok(a.command("list_channels", room="lab"), "list_channels")
    assert [c["channel"] for c in p["channels"]] == ["a", "a-b", "a.b", "b"]
    assert p["count"] == 4 and p["room"] == "lab"
    p = ok(a.command("list_channels", {"room": "lab"}), "list_channels")  # top level
    assert p["count"] == 4 and p["room"] == "lab"
    p = ok(a.command("list_channels", room="nope"), "list_channels")
    assert p["channels"] == [] and p["count"] == 0 and p["room"] == "nope"
    err(a.command("list_channels", room="bad room"), "invalid_argument", "list_channels")
    err(a.command("list_channels", room=7), "invalid_argument", "list_channels")


def test_channel_info(server):
    a = Bus(server.port, client_id="ann", client_type="service", screen_name="Ann", channel="lab:bench")
    b = Bus(server.port, client_id="ben")
    assert a.id == "ann"
    b.join("lab:bench")
    for _ in range(2):
        b.send({"type": "event", "room": "lab", "channel": "bench"})
    p = ok(b.command("channel_info", at("lab:bench")), "channel_info")
    assert set(p) == SUMMARY_KEYS | {"member_list", "history_capacity"}, p
    assert (p["room"], p["channel"], p["members"], p["bootstrap"], p["messages"], p["history"]) == \
        ("lab", "bench", 2, False, 2, 2)
    assert p["history_capacity"] == 500 and TS_RE.match(p["created_at"])
    assert sorted(p["member_list"], key=lambda m: m["client_id"]) == [
        {"client_id": "ann", "client_type": "service", "screen_name": "Ann"},
        {"client_id": "ben", "client_type": "human"}]
    p = ok(b.command("channel_info", channel="science:general"), "channel_info")
    assert (p["bootstrap"], p["members"], p["member_list"]) == (True, 0, [])
    err(b.command("channel_info", at("lab:nothing")), "not_found", "channel_info")
    err(b.command("channel_info", {"room": "lab"}), "invalid_argument", "channel_info")
    err(b.command("channel_info"), "invalid_argument", "channel_info")
    err(b.command("channel_info", room="lab", channel=""), "invalid_argument", "channel_info")


def test_ping(server):
    a = Bus(server.port)
    for data in [{"k": [1, 2, {"x": None}]}, [1, "two"], "text \u00e9", 42, 2.5, True, False, None, {}]:
        r = a.command("ping", data=data)
        assert r["type"] == "system" and r["command"] == "pong", r
        assert r["payload"]["data"] == data and "data" in r["payload"]
        assert TS_RE.match(r["payload"]["server_time"])
    r = a.command("ping")
    assert r["command"] == "pong" and set(r["payload"]) == {"server_time"}, r


def test_help(server):
    a = Bus(server.port)
    p = ok(a.command("help"), "help")
    names = [c["name"] for c in p["commands"]]
    assert sorted(names) == sorted(ALL_COMMANDS) and len(names) == 11
    for c in p["commands"]:
        assert set(c) == {"name", "arguments", "description", "privileged", "roles"}, c
        assert isinstance(c["arguments"], str) and c["description"] and isinstance(c["privileged"], bool)
        # By default (command_roles) only create_channel, delete_channel and
        # status are restricted, to admins.
        if c["name"] in ("create_channel", "delete_channel", "status"):
            assert c["privileged"] is True and c["roles"] == ["admin"], c
        else:
            assert c["privileged"] is False and c["roles"] == ["admin", "user", "guest"], c


def test_unknown_command(server):
    a = Bus(server.port)
    for name in ["nope", "Status", "join-channel", "x" * 32]:
        r = a.command(name)
        p = err(r, "unknown_command", name)
    assert p["message"]


def test_replies_go_to_the_caller_alone_with_the_request_id(server):
    a = Bus(server.port, channel="science:explore")
    b = Bus(server.port, channel="science:explore")
    drain(a)
    a.send({"type": "command", "id": "arq_mine", "command": "status"})
    a.send({"type": "command", "id": "arq_mine2", "command": "channel_info", "room": "science",
            "channel": "explore"})
    a.send({"type": "command", "id": "arq_mine3", "command": "nope"})
    a.send({"type": "command", "id": "arq_mine4", "command": "leave_channel", "room": "lab", "channel": "x"})
    got = [a.recv() for _ in range(4)]
    assert [g["correlation_id"] for g in got] == ["arq_mine", "arq_mine2", "arq_mine3", "arq_mine4"]
    assert [g["type"] for g in got] == ["system", "system", "error", "error"]
    assert [g["command"] for g in got] == ["status", "channel_info", "nope", "leave_channel"]
    for g in got:
        assert g["id"] != g["correlation_id"] and ID_RE.match(g["id"])
    assert drain(b) == []  # nothing of it reached the other member


def test_request_without_id_gets_a_correlation_id(server):
    a = Bus(server.port)
    seen = set()
    for env in [{"type": "command", "command": "ping"},
                {"type": "command", "command": "list_channels"},
                {"type": "command", "command": "nope"},
                {"type": "command", "command": "channel_info", "room": "lab", "channel": "none"}]:
        a.send(env)
        r = a.recv()
        assert r["command"] == ("pong" if env["command"] == "ping" else env["command"]), r
        assert ID_RE.match(r["correlation_id"]) and r["correlation_id"] != r["id"], r
        seen.add(r["correlation_id"])
    assert len(seen) == 4


def test_many_commands_in_a_row_are_answered_in_order(server):
    a = Bus(server.port)
    n = 200
    for i in range(n):
        a.send({"type": "command", "id": "arq_q%d" % i, "command": "ping", "payload": {"data": i}})
    for i in range(n):
        r = a.recv()
        assert r["correlation_id"] == "arq_q%d" % i and r["payload"]["data"] == i
