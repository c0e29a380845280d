"""Routing by room and channel (docs/protocol.md, Message types and Routing).

Channel events reach the channel's subscribers and nobody else; room-wide
events reach each member of the room once; an event with neither room nor
channel goes to the initial channel; echo; private messages; a client that
vanishes without a close frame leaves every channel and each is told;
ordering within a channel; channels created on demand and removed after
channel_ttl; bootstrap channels.

Deliveries are checked with drain(): a ping answered on the sender's
connection proves the server has routed what the sender sent before it, and a
ping answered on a receiver's connection collects, in order, everything that
reached the receiver before it. No timing is asserted.

Every envelope received goes through envelopes.check() (Bus.recv does it).
"""
import time

from conftest import SLOW
from envelopes import BOOTSTRAP, Bus, error_code
from wsutil import reset

# The telemetry and dashboard channels always exist too, like bootstrap
# channels; with the bootstrap ones, the channels that are always listed.
SPECIAL = ["integriguard:telemetry-stream", "integriguard:dashboard-events"]
ALWAYS = sorted(BOOTSTRAP + SPECIAL)


def drain(bus):
    """The envelopes that reach 'bus' before the answer to a ping it sends now."""
    reply = bus.command("ping")
    assert reply["type"] == "system" and reply["command"] == "pong", reply
    return list(bus.skipped)


def events(bus):
    """The ids of the event and private messages in drain(bus)."""
    return [e["id"] for e in drain(bus) if e["type"] in ("event", "private")]


def listed(bus, room=None):
    """The 'room:channel' keys list_channels returns."""
    r = bus.command("list_channels", **({"room": room} if room else {}))
    assert r["type"] == "system", r
    return ["%s:%s" % (c["room"], c["channel"]) for c in r["payload"]["channels"]]


def wait_until(pred, what, timeout=10.0):
    deadline = time.monotonic() + timeout * SLOW
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError("never happened: " + what)


def test_channel_event_reaches_its_subscribers_only(server):
    sender = Bus(server.port)
    sub1 = Bus(server.port, channel="science:explore")
    sub2 = Bus(server.port)
    sub2.join("science:explore")
    general = Bus(server.port, channel="science:general")
    chat = Bus(server.port, channel="chat:public")
    drain(sub1)

    sender.send({"type": "event", "id": "arq_r1", "room": "science", "channel": "explore", "payload": {"n": 1}})
    assert events(sender) == []  # publishing does not require membership; no echo
    for sub in (sub1, sub2):
        assert events(sub) == ["arq_r1"]
    assert events(general) == [] and events(chat) == []

    # A member publishing: the other members get it, not the sender.
    sub1.send({"type": "event", "id": "arq_r2", "room": "science", "channel": "explore"})
    assert events(sub1) == []
    assert events(sub2) == ["arq_r2"]
    assert events(general) == [] and events(chat) == [] and events(sender) == []


def test_room_wide_event_reaches_each_member_of_the_room_once(server):
    sender = Bus(server.port, channel="science:explore")
    both = Bus(server.port, channel="science:explore")
    both.join("science:general")
    general = Bus(server.port, channel="science:general")
    design = Bus(server.port, channel="science:design")
    lab = Bus(server.port, channel="lab:bench")
    outsider = Bus(server.port)
    for b in (sender, both, general, design, lab):
        drain(b)

    sender.send({"type": "event", "id": "arq_room1", "room": "science", "payload": {"all": True}})
    assert events(sender) == []
    for b in (both, general, design):
        got = [e for e in drain(b) if e["type"] == "event"]
        assert [e["id"] for e in got] == ["arq_room1"], got
        assert got[0]["room"] == "science" and "channel" not in got[0] and got[0]["from"] == sender.id
    assert events(lab) == [] and events(outsider) == []

    # From a client outside the room, too.
    outsider.send({"type": "event", "id": "arq_room2", "room": "science"})
    assert events(outsider) == []
    for b in (sender, both, general, design):
        assert events(b) == ["arq_room2"]
    assert events(lab) == []

    # A room nobody is in: delivered to nobody, and no error.
    outsider.send({"type": "event", "id": "arq_room3", "room": "empty-room"})
    assert events(outsider) == []


def test_event_without_room_or_channel_goes_to_the_initial_channel(server):
    member = Bus(server.port, channel="science:explore")
    sender = Bus(server.port, channel="science:explore")
    other = Bus(server.port, channel="science:general")
    drain(member)
    sender.send({"type": "event", "id": "arq_init1", "payload": {"x": 1}})
    assert events(sender) == []
    got = [e for e in drain(member) if e["type"] == "event"]
    assert len(got) == 1 and (got[0]["room"], got[0]["channel"]) == ("science", "explore"), got
    assert got[0]["id"] == "arq_init1" and got[0]["from"] == sender.id
    assert events(other) == []

    # Still the initial channel after joining (and leaving) others.
    sender.join("chat:public")
    sender.command("leave_channel", {"room": "science", "channel": "explore"})
    sender.send({"type": "event", "id": "arq_init2"})
    assert events(sender) == []
    assert events(member) == ["arq_init2"]

    # Without an initial channel it is an error.
    none = Bus(server.port)
    none.join("science:explore")
    none.send({"type": "event", "id": "arq_init3", "payload": {}})
    err = none.recv()
    assert error_code(err) == "invalid_envelope" and err["correlation_id"] == "arq_init3", err
    assert events(member) == []


def test_echo_true_delivers_own_events_once(server):
    echo = Bus(server.port, channel="science:explore", echo=True)
    echo.join("science:general")
    peer = Bus(server.port, channel="science:explore")
    drain(echo)
    echo.send({"type": "event", "id": "arq_e1", "room": "science", "channel": "explore"})
    assert events(echo) == ["arq_e1"]
    assert events(peer) == ["arq_e1"]
    echo.send({"type": "event", "id": "arq_e2", "room": "science"})  # member of two of the room's channels
    assert events(echo) == ["arq_e2"]
    assert events(peer) == ["arq_e2"]
    echo.send({"type": "private", "id": "arq_e3", "to": [peer.id]})  # not in 'to': not delivered to itself
    assert events(echo) == []
    assert events(peer) == ["arq_e3"]


def test_private_messages(server):
    a = Bus(server.port, client_id="alice", channel="science:explore")
    b = Bus(server.port, client_id="bob", channel="chat:public")
    c = Bus(server.port, client_id="carol")
    d = Bus(server.port, client_id="dave", channel="science:explore")
    drain(a)

    # Exactly the clients in 'to', across rooms; duplicates once.
    a.send({"type": "private", "id": "arq_p1", "to": ["bob", "carol", "bob", "carol"], "payload": {"s": 1}})
    assert events(a) == []
    for x in (b, c):
        got = [e for e in drain(x) if e["type"] == "private"]
        assert [e["id"] for e in got] == ["arq_p1"], got
        assert got[0]["from"] == "alice" and got[0]["payload"] == {"s": 1}
        assert got[0]["to"] == ["bob", "carol", "bob", "carol"]  # as sent
    assert events(d) == []

    # The sender too when it lists itself, once.
    a.send({"type": "private", "id": "arq_p2", "to": ["alice", "dave", "alice"]})
    assert events(a) == ["arq_p2"]
    assert events(d) == ["arq_p2"]
    assert events(b) == [] and events(c) == []

    # Unknown ids: not_found listing them; the known ones still get it.
    a.send({"type": "private", "id": "arq_p3", "to": ["ghost", "bob", "nobody@nowhere"]})
    back = drain(a)
    assert len(back) == 1 and error_code(back[0]) == "not_found", back
    assert back[0]["correlation_id"] == "arq_p3"
    assert sorted(back[0]["payload"]["unknown"]) == ["ghost", "nobody@nowhere"]
    assert events(b) == ["arq_p3"]
    assert events(c) == [] and events(d) == []

    # Nobody connected at all.
    a.send({"type": "private", "id": "arq_p4", "to": ["ghost"]})
    err = a.recv()
    assert error_code(err) == "not_found" and err["payload"]["unknown"] == ["ghost"], err
    assert err["correlation_id"] == "arq_p4"
    for x in (b, c, d):
        assert events(x) == []

    # A client that has left is unknown.
    c.close()
    wait_until(lambda: a.command("status")["payload"]["clients"]["total"] == 3, "carol gone")
    a.send({"type": "private", "id": "arq_p5", "to": ["carol", "bob"]})
    err = a.recv()
    assert error_code(err) == "not_found" and err["payload"]["unknown"] == ["carol"], err
    assert events(b) == ["arq_p5"]


def test_disconnect_without_close_frame_leaves_every_channel(server):
    obs1 = Bus(server.port, client_id="obs1", channel="science:explore")
    obs2 = Bus(server.port, client_id="obs2", channel="chat:public")
    x = Bus(server.port, client_id="vanisher", client_type="ai-agent", screen_name="V", channel="science:explore")
    x.join("chat:public")
    x.join("lab:solo")
    assert [n["payload"]["event"] for n in drain(obs1)] == ["client_joined"]
    assert [n["payload"]["event"] for n in drain(obs2)] == ["client_joined"]

    reset(x.ws.sock)  # SO_LINGER 0: the kernel sends a RST, no close frame, no FIN

    for obs, room, channel in ((obs1, "science", "explore"), (obs2, "chat", "public")):
        note, skipped = obs.recv_until(lambda e: e["type"] == "system")
        assert skipped == []
        assert (note["room"], note["channel"]) == (room, channel), note
        documented = {k: note["payload"].get(k) for k in ("event", "client_id", "client_type", "members", "reason")}
        assert documented == {"event": "client_left", "client_id": "vanisher", "client_type": "ai-agent",
                              "members": 1, "reason": "disconnected"}, note
        info = obs.command("channel_info", {"room": room, "channel": channel})["payload"]
        assert [m["client_id"] for m in info["member_list"]] == [obs.id] and info["members"] == 1
    st = obs1.command("status")["payload"]
    assert st["clients"]["total"] == 2
    info = obs1.command("channel_info", {"room": "lab", "channel": "solo"})["payload"]
    assert info["members"] == 0 and info["member_list"] == []
    # Events to those channels no longer try to reach it (and nothing breaks).
    obs1.send({"type": "event", "id": "arq_after", "room": "chat", "channel": "public"})
    assert events(obs1) == []
    assert events(obs2) == ["arq_after"]


def test_ordering_within_a_channel(server):
    subs = [Bus(server.port, channel="lab:order") for _ in range(2)]
    pubs = [Bus(server.port), Bus(server.port)]
    for s in subs:
        drain(s)
    n = 150
    for i in range(n):
        for k, p in enumerate(pubs):
            p.send({"type": "event", "id": "arq_p%d_%d" % (k, i), "room": "lab", "channel": "order",
                    "payload": {"k": k, "i": i}})
    for p in pubs:
        assert events(p) == []
    seqs = []
    for s in subs:
        got = [e for e in drain(s) if e["type"] == "event"]
        assert len(got) == 2 * n
        seqs.append([e["id"] for e in got])
        for k in range(2):
            mine = [e["payload"]["i"] for e in got if e["payload"]["k"] == k]
            assert mine == list(range(n)), "publisher %d out of order" % k
    # Both subscribers saw the same order: the order the server received them.
    assert seqs[0] == seqs[1]


def test_channels_are_created_on_demand(server):
    a = Bus(server.port)
    assert listed(a) == ALWAYS
    # By joining.
    r = a.command("join_channel", {"room": "lab", "channel": "bench"})
    assert r["payload"]["created"] is True
    # By publishing (no members needed).
    a.send({"type": "event", "room": "ops", "channel": "alerts"})
    # With create_channel.
    assert a.command("create_channel", {"room": "lab", "channel": "shelf"})["type"] == "system"
    keys = listed(a)
    assert keys == sorted(ALWAYS + ["lab:bench", "lab:shelf", "ops:alerts"])
    assert listed(a, "lab") == ["lab:bench", "lab:shelf"]
    info = a.command("channel_info", {"room": "ops", "channel": "alerts"})["payload"]
    assert info["members"] == 0 and info["messages"] == 1 and info["bootstrap"] is False
    st = a.command("status")["payload"]
    assert st["rooms"] == 4 and st["channels"] == len(ALWAYS) + 3  # science, integriguard, lab, ops


def test_channel_ttl_0_removes_an_emptied_channel_at_once(make_server):
    s = make_server(args=["--channel-ttl", "0"])
    a = Bus(s.port)
    b = Bus(s.port)
    a.join("lab:tmp")
    b.join("lab:tmp")
    a.send({"type": "event", "room": "lab", "channel": "tmp"})
    assert "lab:tmp" in listed(a)
    a.command("leave_channel", {"room": "lab", "channel": "tmp"})
    assert "lab:tmp" in listed(a)  # b is still in it
    r = b.command("leave_channel", {"room": "lab", "channel": "tmp"})
    assert r["payload"] == {"room": "lab", "channel": "tmp", "left": True, "members": 0}
    assert "lab:tmp" not in listed(b)
    assert listed(b, "lab") == []
    assert error_code(b.command("channel_info", {"room": "lab", "channel": "tmp"})) == "not_found"
    hist = b.command("history", {"room": "lab", "channel": "tmp"})["payload"]
    assert hist["messages"] == [] and hist["count"] == 0

    # The last member disconnecting removes it too.
    c = Bus(s.port)
    c.join("lab:gone")
    assert "lab:gone" in listed(a)
    c.close()
    wait_until(lambda: "lab:gone" not in listed(a), "lab:gone removed after its last member disconnected")

    # Bootstrap channels are never removed.
    a.join("science:share")
    a.command("leave_channel", {"room": "science", "channel": "share"})
    assert listed(a) == ALWAYS


def test_channel_ttl_keeps_an_empty_channel_then_removes_it(make_server):
    s = make_server(args=["--channel-ttl", "2s"])
    a = Bus(s.port)
    a.join("lab:slow")
    a.send({"type": "event", "id": "arq_slow1", "room": "lab", "channel": "slow"})
    a.send({"type": "event", "id": "arq_slow2", "room": "lab", "channel": "slow"})
    a.command("leave_channel", {"room": "lab", "channel": "slow"})
    # Kept for now, with its history (a client reconnecting within the ttl finds it).
    assert "lab:slow" in listed(a)
    hist = a.command("history", {"room": "lab", "channel": "slow"})["payload"]
    assert [m["id"] for m in hist["messages"]] == ["arq_slow1", "arq_slow2"]
    wait_until(lambda: "lab:slow" not in listed(a), "lab:slow removed after channel_ttl")
    assert error_code(a.command("channel_info", {"room": "lab", "channel": "slow"})) == "not_found"
    hist = a.command("history", {"room": "lab", "channel": "slow"})["payload"]
    assert hist["messages"] == [] and hist["count"] == 0
    assert listed(a) == ALWAYS


def test_bootstrap_channels_always_listed(make_server):
    s = make_server(args=["--channel-ttl", "0"])
    a = Bus(s.port)
    r = a.command("list_channels")["payload"]
    assert [(c["room"], c["channel"]) for c in r["channels"]] == [tuple(k.split(":")) for k in ALWAYS]
    assert all(c["bootstrap"] is True and c["members"] == 0 for c in r["channels"])
    for key in ALWAYS:
        room, ch = key.split(":")
        err = a.command("delete_channel", {"room": room, "channel": ch})
        assert error_code(err) == "forbidden", err
    # Joined and left with channel_ttl 0, they stay too.
    for key in SPECIAL:
        a.join(key)
        left = a.command("leave_channel", dict(zip(("room", "channel"), key.split(":"))))
        assert left["type"] == "system" and left["payload"]["members"] == 0, left
    assert listed(a) == ALWAYS


def test_custom_bootstrap_channels(make_server):
    s = make_server(args=["--bootstrap-channels", "ops:alerts,lab:bench,lab:attic", "--channel-ttl", "0"])
    a = Bus(s.port)
    # The telemetry and dashboard channels are not on the list, and exist all the same.
    assert listed(a) == sorted(["lab:attic", "lab:bench", "ops:alerts"] + SPECIAL)
    info = a.command("channel_info", {"room": "lab", "channel": "bench"})["payload"]
    assert info["bootstrap"] is True and info["members"] == 0
    assert error_code(a.command("delete_channel", {"room": "ops", "channel": "alerts"})) == "forbidden"
    # The default science channels are not bootstrap here: created on demand, removed when emptied.
    r = a.command("join_channel", {"room": "science", "channel": "explore"})
    assert r["payload"]["created"] is True and r["payload"]["bootstrap"] is False
    a.command("leave_channel", {"room": "science", "channel": "explore"})
    a.join("lab:bench")
    a.command("leave_channel", {"room": "lab", "channel": "bench"})
    assert listed(a) == sorted(["lab:attic", "lab:bench", "ops:alerts"] + SPECIAL)
