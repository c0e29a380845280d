"""Positions in history (docs/protocol.md, History; docs/envelope.schema.json).

Every message stored in a channel's history (channel events, client
telemetry on the telemetry channel, agent_activity on the dashboard channel)
carries a server-set "position": a decimal string in memory mode, the last
member of the envelope. Positions come from one sequence for all channels, so
they grow within a channel and across channels and never repeat, even in a
channel deleted and created again. Room-wide and private messages are not
stored and get none. What is delivered is byte for byte what history keeps.

The history command's payload.since (and GET /history?since=) takes a
position as well as a message id: the reply has the messages with a greater
position, oldest first, up to limit, and "gap": true when messages after it
were overwritten (the ring was full) or when it is older than the channel's
current life (deleted and created again). since "0" is the channel's
beginning. A position a client sends is accepted (it must be a string) and
replaced by the server's.

Every envelope received goes through envelopes.check(), the messages inside
history replies included.
"""
import json
import re
import urllib.parse

from envelopes import Bus, check, error_code
from rawws import OP_TEXT

POSITION = re.compile(r"^[1-9][0-9]*$")  # memory mode: decimal from 1


# ---- helpers -----------------------------------------------------------------

def recv_raw(bus):
    """The next envelope and its exact bytes, (dict, bytes); checked."""
    bus.ws.sock.settimeout(bus.timeout)
    op, payload = bus.ws.recv_message()
    assert op == OP_TEXT, (op, payload[:200])
    return check(payload), payload


def drain(bus):
    """The envelopes that reach 'bus' before the answer to a ping it sends
    now; the ping also proves that everything it sent before was routed."""
    reply = bus.command("ping")
    assert reply["type"] == "system" and reply["command"] == "pong", reply
    return list(bus.skipped)


def position_of(env):
    """The position of a stored message: present, the last member, decimal."""
    assert "position" in env, env
    assert list(env)[-1] == "position", env
    assert isinstance(env["position"], str) and POSITION.match(env["position"]), env
    return int(env["position"])


def history(bus, channel, **payload):
    """The payload of a successful history reply; its messages are checked
    and each carries a position."""
    room, ch = channel.split(":")
    r = bus.command("history", {"room": room, "channel": ch}, **payload)
    assert r["type"] == "system" and r["command"] == "history", r
    p = r["payload"]
    assert (p["room"], p["channel"]) == (room, ch), p
    assert p["count"] == len(p["messages"])
    for m in p["messages"]:
        check(m)
        position_of(m)
    positions = [int(m["position"]) for m in p["messages"]]
    assert positions == sorted(set(positions)), positions  # oldest first, no repeats
    return p


def history_raw(bus, channel, **payload):
    """The raw bytes of a history reply (and its parsed payload)."""
    room, ch = channel.split(":")
    cid = "arq_raw%d" % id(payload)
    env = {"type": "command", "id": cid, "command": "history", "room": room, "channel": ch}
    if payload:
        env["payload"] = payload
    bus.send(env)
    while True:
        reply, raw = recv_raw(bus)
        if reply.get("correlation_id") == cid:
            break
    assert reply["type"] == "system" and reply["command"] == "history", reply
    for m in reply["payload"]["messages"]:
        check(m)
    return reply["payload"], raw


def positions(p):
    return [m["position"] for m in p["messages"]]


def ids(p):
    return [m["id"] for m in p["messages"]]


def publish(bus, channel, n, prefix):
    """Sends n events with ids prefix0..; returns the ids once routed."""
    room, ch = channel.split(":")
    out = []
    for i in range(n):
        mid = "arq_%s%d" % (prefix, i)
        bus.send({"type": "event", "id": mid, "room": room, "channel": ch, "payload": {"i": i}})
        out.append(mid)
    drain(bus)
    return out


def publish_seen(bus, channel, n, prefix):
    """Like publish, for a member with echo=true: returns [(id, position)] as
    delivered back to it."""
    room, ch = channel.split(":")
    out = []
    for i in range(n):
        mid = "arq_%s%d" % (prefix, i)
        bus.send({"type": "event", "id": mid, "room": room, "channel": ch, "payload": {"i": i}})
        env = bus.recv()
        assert env["type"] == "event" and env["id"] == mid, env
        out.append((mid, env["position"]))
    return out


def get_json(server, path, **params):
    if params:
        path += "?" + urllib.parse.urlencode(params)
    status, headers, body = server.http(path)
    assert headers["Content-Type"] == "application/json", headers
    return status, json.loads(body)


# ---- positions on stored messages ----------------------------------------------

def test_every_stored_message_carries_a_position_from_one_sequence(server):
    # The watcher is in two channels, the telemetry channel and the dashboard
    # channel; the agent sends to both channels and some telemetry, and its
    # activity goes to the dashboard channel.
    watch = Bus(server.port, client_id="watch", client_type="dashboard", channel="lab:a")
    watch.join("lab:b")
    watch.join("integriguard:telemetry-stream")
    watch.join("integriguard:dashboard-events")
    drain(watch)
    agent = Bus(server.port, client_id="agent", client_type="ai-agent")
    agent.send({"type": "event", "room": "lab", "channel": "a", "payload": {"n": 0}})
    agent.send({"type": "event", "room": "lab", "channel": "b", "payload": {"n": 1}})
    agent.send({"type": "telemetry", "eventType": "cpu", "payload": {"load": 3}})
    agent.send({"type": "event", "room": "lab", "channel": "a", "payload": {"n": 2}})
    agent.send({"type": "event", "room": "lab", "channel": "b", "payload": {"n": 3}})
    assert agent.command("ping")["command"] == "pong"
    got = []
    while True:
        env, raw = recv_raw(watch)
        assert env["type"] != "system", env  # the agent joins nothing: no notifications
        got.append((env, raw))
        if env["type"] == "telemetry" and env["payload"].get("activity") == "command_run":
            break
    kinds = [(e["type"], e.get("channel"), e.get("eventType")) for e, _ in got]
    assert kinds == [("telemetry", "dashboard-events", "agent_activity"),  # connected
                     ("event", "a", None), ("telemetry", "dashboard-events", "agent_activity"),
                     ("event", "b", None), ("telemetry", "dashboard-events", "agent_activity"),
                     ("telemetry", "telemetry-stream", "cpu"), ("telemetry", "dashboard-events", "agent_activity"),
                     ("event", "a", None), ("telemetry", "dashboard-events", "agent_activity"),
                     ("event", "b", None), ("telemetry", "dashboard-events", "agent_activity"),
                     ("telemetry", "dashboard-events", "agent_activity")], kinds
    # One sequence: strictly growing in the order stored, across channels.
    seq = [position_of(e) for e, _ in got]
    assert seq == sorted(seq) and len(set(seq)) == len(seq), seq
    # The member is the last one in the very bytes delivered.
    for env, raw in got:
        assert raw.endswith(b',"position":"%s"}' % env["position"].encode()), raw
        assert raw.count(b'"position"') == 1, raw

    # History keeps the same bytes: each delivered text is found verbatim in
    # the history reply, and the messages are equal, key order included.
    for channel in ("lab:a", "lab:b", "integriguard:telemetry-stream", "integriguard:dashboard-events"):
        room, ch = channel.split(":")
        delivered = [(e, raw) for e, raw in got if (e["room"], e["channel"]) == (room, ch)]
        p, reply_raw = history_raw(watch, channel)
        stored = p["messages"]
        assert [list(m.items()) for m in stored] == [list(e.items()) for e, _ in delivered], channel
        for _, raw in delivered:
            assert raw in reply_raw, (channel, raw)
    for c in (watch, agent):
        c.close()


def test_positions_grow_within_and_across_channels_and_never_repeat(server):
    pub = Bus(server.port, client_id="pub", channel="lab:x", echo=True)
    pub.join("lab:y")
    drain(pub)
    seen = []
    for i in range(30):
        ch = "xy"[i % 3 == 0]
        pub.send({"type": "event", "room": "lab", "channel": ch, "payload": {"i": i}})
        env = pub.recv()
        assert env["type"] == "event" and env["channel"] == ch, env
        seen.append((ch, position_of(env)))
    all_positions = [p for _, p in seen]
    assert all_positions == sorted(all_positions) and len(set(all_positions)) == 30
    # Within a channel they grow, with the other channel's positions between.
    for ch in "xy":
        mine = [p for c, p in seen if c == ch]
        p = history(pub, "lab:" + ch)
        assert [int(x) for x in positions(p)] == mine
    # A message in another room continues the same sequence.
    other = Bus(server.port, channel="elsewhere:z", echo=True)
    other.send({"type": "event", "payload": {}})
    env = other.recv()
    assert position_of(env) > all_positions[-1]
    for c in (pub, other):
        c.close()


def test_room_wide_and_private_messages_have_no_position(server):
    a = Bus(server.port, client_id="a", channel="science:general")
    b = Bus(server.port, client_id="b", channel="science:explore")
    drain(a)
    # Room-wide, private, and both with a position of the client's own: none
    # is stored, so none has a position (the client's is not passed on).
    b.send({"type": "event", "id": "arq_room", "room": "science", "payload": {}})
    b.send({"type": "event", "id": "arq_room2", "room": "science", "payload": {}, "position": "7"})
    b.send({"type": "private", "id": "arq_priv", "to": ["a"], "payload": {}})
    b.send({"type": "private", "id": "arq_priv2", "to": ["a"], "payload": {}, "position": "8"})
    b.send({"version": "1.1", "type": "private", "id": "arq_priv3", "to": ["a"], "payload": {}, "position": "9",
            "extra": 1})
    b.send({"type": "event", "id": "arq_stored", "room": "science", "channel": "general", "payload": {}})
    assert drain(b) == []
    got = [e for e in drain(a) if e["type"] in ("event", "private")]
    assert [e["id"] for e in got] == ["arq_room", "arq_room2", "arq_priv", "arq_priv2", "arq_priv3", "arq_stored"]
    for e in got[:-1]:
        assert "position" not in e, e
    assert got[4]["extra"] == 1  # 1.1 unknown fields still travel; position is not one of them
    position_of(got[-1])
    # Nor do replies, errors and notifications.
    r = a.command("ping")
    assert "position" not in r
    r = a.command("history", {"room": "science", "channel": "general"}, since="nope")
    assert error_code(r) == "invalid_argument" and "position" not in r
    assert ids(history(a, "science:general")) == ["arq_stored"]
    for c in (a, b):
        c.close()


def test_a_client_sent_position_is_replaced_by_the_servers(server):
    sub = Bus(server.port, channel="lab:p")
    pub = Bus(server.port, client_id="pub")
    drain(sub)
    sent = [("arq_c1", {"position": "999999"}), ("arq_c2", {"position": "1"}), ("arq_c3", {"position": "junk"}),
            ("arq_c4", {"position": ""}), ("arq_c5", {"version": "1.0", "position": "5-0"}),
            ("arq_c6", {"version": "1.1", "position": "3"})]
    for mid, fields in sent:
        env = {"type": "event", "id": mid, "room": "lab", "channel": "p", "payload": {}}
        env.update(fields)
        pub.send(env)
    # Any other type is an invalid envelope, and goes nowhere.
    for mid, bad in (("arq_b1", 5), ("arq_b2", None), ("arq_b3", ["1"]), ("arq_b4", {"p": "1"}), ("arq_b5", True)):
        pub.send({"type": "event", "id": mid, "room": "lab", "channel": "p", "payload": {}, "position": bad})
        r = pub.recv()
        assert error_code(r) == "invalid_envelope" and r["correlation_id"] == mid, r
        assert "position" in r["payload"]["message"], r
    assert drain(pub) == []
    got = []
    for _ in sent:
        env, raw = recv_raw(sub)
        assert raw.count(b'"position"') == 1, raw
        got.append(env)
    assert [e["id"] for e in got] == [mid for mid, _ in sent]
    ps = [position_of(e) for e in got]
    assert ps == sorted(ps) and len(set(ps)) == len(ps), ps
    assert "999999" not in [e["position"] for e in got]
    assert drain(sub) == []
    assert history(sub, "lab:p")["messages"] == got
    for c in (sub, pub):
        c.close()


# ---- since a position ----------------------------------------------------------

def test_reconnect_since_the_last_position_gets_exactly_what_was_missed(server):
    pub = Bus(server.port, client_id="pub", channel="science:explore")
    rita = Bus(server.port, client_id="rita", channel="science:explore")
    drain(pub)
    publish(pub, "science:explore", 3, "before")
    seen = [e for e in drain(rita) if e["type"] == "event"]
    assert [e["id"] for e in seen] == ["arq_before0", "arq_before1", "arq_before2"]
    last = seen[-1]["position"]
    rita.close()

    # Others publish while rita is away, here and elsewhere (the sequence is
    # shared, so the positions she missed are not consecutive).
    other = Bus(server.port)
    pub.send({"type": "event", "room": "science", "channel": "explore", "payload": {"k": 1}})
    drain(pub)
    publish(other, "lab:unrelated", 2, "elsewhere")
    other.send({"type": "event", "id": "arq_missed2", "room": "science", "channel": "explore"})
    drain(other)
    publish(other, "lab:unrelated", 1, "between")
    pub.send({"type": "event", "room": "science", "channel": "explore", "payload": {"k": 3}})
    drain(pub)

    rita = Bus(server.port, client_id="rita", channel="science:explore")
    p = history(rita, "science:explore", since=last)
    assert (p["since"], p["gap"], p["more"], p["count"]) == (last, False, False, 3), p
    assert [m["from"] for m in p["messages"]] == ["pub", other.id, "pub"]
    assert p["messages"][1]["id"] == "arq_missed2"
    assert [m["payload"] for m in p["messages"]] == [{"k": 1}, {}, {"k": 3}]
    ps = [int(x) for x in positions(p)]
    assert ps[0] > int(last) and ps != list(range(ps[0], ps[0] + 3))  # not consecutive
    # The whole history is what she saw plus what she missed.
    whole = history(rita, "science:explore")
    assert whole["messages"][:3] == seen and whole["messages"][3:] == p["messages"]
    # Paging forward by position.
    q = history(rita, "science:explore", since=last, limit=2)
    assert q["messages"] == p["messages"][:2] and (q["more"], q["gap"]) == (True, False)
    q = history(rita, "science:explore", since=q["messages"][-1]["position"], limit=2)
    assert q["messages"] == p["messages"][2:] and (q["more"], q["gap"]) == (False, False)
    # Since the newest: nothing, no gap. Since a position between two of the
    # channel's (another channel's): what follows it.
    q = history(rita, "science:explore", since=p["messages"][-1]["position"])
    assert (q["messages"], q["gap"], q["more"]) == ([], False, False)
    q = history(rita, "science:explore", since=str(ps[0] + 1))
    assert q["messages"] == p["messages"][1:] and q["gap"] is False
    for c in (pub, rita, other):
        c.close()


def test_overwritten_messages_make_a_gap(make_server):
    s = make_server(args=["--history-size", "3"])
    pub = Bus(s.port, client_id="pub", channel="lab:ring", echo=True)
    pub.join("lab:other")
    drain(pub)
    # ring gets r0..r4, other gets o0..o3 in between: r0 o0 r1 o1 r2 o2 r3 o3 r4.
    ring, other = [], []
    for i in range(5):
        ring += publish_seen(pub, "lab:ring", 1, "r%d_" % i)
        if i < 4:
            other += publish_seen(pub, "lab:other", 1, "o%d_" % i)
    rp = [int(p) for _, p in ring]
    op = [int(p) for _, p in other]
    assert rp[0] < op[0] < rp[1] < op[1] < rp[2] < op[2] < rp[3] < op[3] < rp[4]
    held = [mid for mid, _ in ring[2:]]  # r0 and r1 were overwritten
    p = history(pub, "lab:ring")
    assert ids(p) == held
    # Since the newest overwritten position (r1): nothing is missing.
    p = history(pub, "lab:ring", since=str(rp[1]))
    assert ids(p) == held and (p["gap"], p["more"], p["since"]) == (False, False, str(rp[1]))
    # Since a position after it (another channel's, o1): nothing missing.
    p = history(pub, "lab:ring", since=str(op[1]))
    assert ids(p) == held and p["gap"] is False
    # Since one before it: r1 was lost.
    for before in (rp[1] - 1, op[0], rp[0]):
        p = history(pub, "lab:ring", since=str(before))
        assert ids(p) == held and p["gap"] is True, (before, p)
    p = history(pub, "lab:ring", since=str(rp[0]), limit=2)
    assert ids(p) == held[:2] and (p["gap"], p["more"]) == (True, True)
    # Since "0": the beginning is gone.
    p = history(pub, "lab:ring", since="0")
    assert ids(p) == held and p["gap"] is True
    # Within what is held.
    p = history(pub, "lab:ring", since=str(rp[2]))
    assert ids(p) == held[1:] and p["gap"] is False
    # The other channel kept its 3 newest of 4: o0 is lost.
    p = history(pub, "lab:other", since="0")
    assert ids(p) == [mid for mid, _ in other[1:]] and p["gap"] is True
    p = history(pub, "lab:other", since=str(op[0]))
    assert ids(p) == [mid for mid, _ in other[1:]] and p["gap"] is False
    pub.close()


def test_a_position_from_before_the_channel_was_deleted_is_a_gap(server):
    a = Bus(server.port, client_id="a", channel="lab:life", echo=True)
    old = publish_seen(a, "lab:life", 3, "old")
    assert a.command("delete_channel", {"room": "lab", "channel": "life"})["payload"]["deleted"] is True
    drain(a)
    b = Bus(server.port, channel="lab:spacer", echo=True)
    publish_seen(b, "lab:spacer", 1, "spacer")  # a position given out while lab:life did not exist
    a.join("lab:life")
    new = publish_seen(a, "lab:life", 2, "new")
    # Positions never repeat: the new life's continue the one sequence.
    assert int(new[0][1]) > int(old[-1][1]) + 1
    new_ids = [mid for mid, _ in new]
    for mid, pos in old:
        p = history(a, "lab:life", since=pos)
        assert ids(p) == new_ids and p["gap"] is True, (pos, p)
    p = history(a, "lab:life", since=str(int(new[0][1]) - 1))  # the spacer's: before this life
    assert ids(p) == new_ids and p["gap"] is True
    p = history(a, "lab:life", since=new[0][1])
    assert ids(p) == new_ids[1:] and p["gap"] is False
    p = history(a, "lab:life", since="0")  # the beginning of this life
    assert ids(p) == new_ids and p["gap"] is False
    # Old ids are gaps as well.
    p = history(a, "lab:life", since=old[-1][0])
    assert ids(p) == new_ids and p["gap"] is True
    for c in (a, b):
        c.close()


def test_a_position_from_before_the_channel_was_deleted_is_a_gap_while_it_is_empty(server):
    """The channel was deleted (its messages after the client's position are
    lost with it) and created again: the client must be told of the gap even
    before anything is published in the new life, as it is for an old id."""
    a = Bus(server.port, client_id="a", channel="lab:life", echo=True)
    old = publish_seen(a, "lab:life", 3, "old")
    assert a.command("delete_channel", {"room": "lab", "channel": "life"})["payload"]["deleted"] is True
    drain(a)
    created = a.command("create_channel", {"room": "lab", "channel": "life"})
    assert created["type"] == "system" and created["command"] == "create_channel", created
    assert (created["payload"]["messages"], created["payload"]["history"]) == (0, 0), created
    p = history(a, "lab:life", since=old[-1][0])
    assert p["messages"] == [] and p["gap"] is True  # by id: a gap
    p = history(a, "lab:life", since=old[0][1])
    assert p["messages"] == [], p
    assert p["gap"] is True, \
        "since a position from the channel's former life (messages after it were deleted) says gap false"
    a.close()


def test_since_zero_is_the_beginning(server):
    a = Bus(server.port)
    publish(a, "lab:other", 2, "pre")  # the sequence does not start at this channel
    sent = publish(a, "lab:zero", 4, "z")
    p = history(a, "lab:zero", since="0")
    assert ids(p) == sent and (p["gap"], p["more"], p["since"], p["count"]) == (False, False, "0", 4)
    p = history(a, "lab:zero", since="0", limit=2)
    assert ids(p) == sent[:2] and (p["gap"], p["more"]) == (False, True)  # the oldest, not the newest
    p = history(a, "lab:none", since="0")
    assert (p["messages"], p["gap"], p["more"]) == ([], False, False)
    # Leading zeros are still a number.
    p = history(a, "lab:zero", since="000")
    assert ids(p) == sent and p["gap"] is False
    a.close()


def test_invalid_since_is_invalid_argument(server):
    a = Bus(server.port)
    publish(a, "lab:x", 2, "x")
    bad = ["", "-1", "1-", "-", "1--2", "1-2-3", "abc", "1.5", " 1", "1 ", "+1", "0x10", "1e3", "\u0661",
           "1" * 21, "1-" + "1" * 21, "arq_", "arq_a b", 5, 0, None, True, ["1"], {"position": "1"}]
    for since in bad:
        r = a.command("history", {"room": "lab", "channel": "x"}, since=since)
        assert error_code(r) == "invalid_argument", (since, r)
        assert r["command"] == "history", r
    # The forms that are accepted: digits (up to 20), digits-digits, ids.
    for since in ("1", "1" * 20, "1-0", "1700000000000-5", "arq_x0"):
        r = a.command("history", {"room": "lab", "channel": "x"}, since=since)
        assert r["type"] == "system" and r["payload"]["since"] == since, (since, r)
    # The largest position there can be: nothing after it.
    p = history(a, "lab:x", since="18446744073709551615")
    assert p["messages"] == [] and p["more"] is False
    a.close()


def test_http_history_since_a_position_equals_the_command(make_server):
    s = make_server(args=["--history-size", "4"])
    pub = Bus(s.port, channel="lab:h", echo=True)
    seen = publish_seen(pub, "lab:h", 6, "h")  # h0, h1 overwritten
    publish(pub, "lab:other", 1, "o")
    ps = [p for _, p in seen]
    cases = [{"since": "0"}, {"since": ps[0]}, {"since": ps[1]}, {"since": ps[2]}, {"since": ps[3], "limit": 1},
             {"since": ps[5]}, {"since": str(int(ps[5]) + 1)}, {"since": ps[0], "limit": 2}, {"since": "3-0"}]
    for payload in cases:
        want = pub.command("history", {"room": "lab", "channel": "h"}, **payload)
        assert want["type"] == "system", want
        want = want["payload"]
        for m in want["messages"]:
            check(m)
        code, got = get_json(s, "/history", room="lab", channel="h", **payload)
        assert code == 200 and got == want, (payload, got, want)
        code, got = get_json(s, "/history", channel="lab:h", **payload)
        assert code == 200 and got == want, (payload, got, want)
    assert get_json(s, "/history", room="lab", channel="h", since=ps[0])[1]["gap"] is True
    assert get_json(s, "/history", room="lab", channel="h", since=ps[1])[1]["gap"] is False
    for since in ("-1", "1-", "1-2-3", "abc", "1.5", "+1", "1" * 21, "1-" + "1" * 21):
        code, got = get_json(s, "/history", room="lab", channel="h", since=since)
        assert code == 400 and got["error"] == "invalid_argument", (since, got)
    pub.close()


def test_a_position_from_before_a_restart_is_a_gap(make_server):
    # Positions start from the server's start time, so a restarted server
    # never hands out a position of an earlier run, and a client that resumes
    # with one is told that the history it missed is gone.
    first = make_server()
    with Bus(first.port, channel="science:explore") as sub, Bus(first.port) as pub:
        publish(pub, "science:explore", 3, "before")
        old = [position_of(sub.recv_until(lambda e: e["type"] == "event")[0]) for _ in range(3)]
    assert first.stop() == 0
    second = make_server()
    with Bus(second.port, channel="science:explore") as sub, Bus(second.port) as pub:
        publish(pub, "science:explore", 2, "after")
        new = [position_of(sub.recv_until(lambda e: e["type"] == "event")[0]) for _ in range(2)]
        assert min(new) > max(old)
        p = history(sub, "science:explore", since=str(old[-1]))
        assert p["gap"] is True
        assert [m["id"] for m in p["messages"]] == ["arq_after0", "arq_after1"]
        p = history(sub, "science:explore", since=str(new[0]))
        assert p["gap"] is False and [m["id"] for m in p["messages"]] == ["arq_after1"]
