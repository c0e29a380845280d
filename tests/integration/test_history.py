"""Channel history (docs/protocol.md, History and the history command).

Oldest first and exactly as delivered; the default limit (50), an explicit
limit, the cap (history_max_limit, never above history_size); the ring buffer
dropping its oldest messages; `since` (the reconnect case); `gap`; invalid
arguments; what is not stored (room-wide and private messages); history is
dropped with its channel.

Every envelope received goes through envelopes.check() (Bus.recv does it, and
the messages inside history replies are checked here too).
"""
from envelopes import Bus, check, error_code


def drain(bus):
    """The envelopes that reach 'bus' before the answer to a ping it sends now."""
    reply = bus.command("ping")
    assert reply["type"] == "system" and reply["command"] == "pong", reply
    return list(bus.skipped)


def history(bus, channel, **payload):
    """The payload of a successful history reply; its messages are checked."""
    room, ch = channel.split(":")
    r = bus.command("history", {"room": room, "channel": ch}, **payload)
    assert r["type"] == "system" and r["command"] == "history", r
    p = r["payload"]
    assert (p["room"], p["channel"]) == (room, ch), p
    assert p["count"] == len(p["messages"])
    for m in p["messages"]:
        check(m)
    return p


def ids(p):
    return [m["id"] for m in p["messages"]]


def publish(bus, channel, n, prefix):
    """Sends n events with ids prefix0..prefix{n-1}; returns the ids."""
    room, ch = channel.split(":")
    out = []
    for i in range(n):
        mid = "arq_%s%d" % (prefix, i)
        bus.send({"type": "event", "id": mid, "room": room, "channel": ch, "payload": {"i": i}})
        out.append(mid)
    drain(bus)  # routed (and stored) before anything else is asked
    return out


def test_history_is_oldest_first_and_exactly_as_delivered(server):
    sub = Bus(server.port, channel="science:explore")
    a = Bus(server.port, client_id="alpha")
    b = Bus(server.port, client_id="beta", channel="science:explore")
    drain(sub)
    # Each sender's messages are routed (drain) before the other sends, so the
    # server receives them in this order.
    a.send({"type": "event", "room": "science", "channel": "explore", "payload": {"n": 1}})
    drain(a)
    b.send({"type": "event", "id": "arq_mine", "timestamp": "2025-01-02T03:04:05Z", "room": "science",
            "channel": "explore", "payload": {"n": 2, "s": "\u00e9\U0001F600"}, "metadata": {"m": [1]},
            "correlation_id": "c-1"})
    drain(b)
    a.send({"type": "event", "channel": "science:explore", "from": "beta", "payload": {"n": 3}})
    a.send({"version": "1.3", "type": "event", "room": "science:explore", "payload": {"n": 4}, "extra": {"x": 1}})
    drain(a)
    delivered = [e for e in drain(sub) if e["type"] == "event"]
    assert [e["payload"]["n"] for e in delivered] == [1, 2, 3, 4]
    p = history(sub, "science:explore")
    assert p["messages"] == delivered
    assert (p["count"], p["limit"], p["more"]) == (4, 50, False)
    assert "since" not in p and "gap" not in p
    # Anyone may read a channel's history, member or not.
    assert history(a, "science:explore")["messages"] == delivered
    # A channel without messages (or that does not exist).
    for ch in ("science:general", "lab:none"):
        p = history(a, ch)
        assert (p["messages"], p["count"], p["more"]) == ([], 0, False)


def test_default_limit_is_50_and_explicit_limits(server):
    a = Bus(server.port)
    sent = publish(a, "lab:many", 60, "m")
    p = history(a, "lab:many")
    assert ids(p) == sent[10:] and (p["count"], p["limit"], p["more"]) == (50, 50, True)
    p = history(a, "lab:many", limit=5)
    assert ids(p) == sent[55:] and (p["count"], p["limit"], p["more"]) == (5, 5, True)
    p = history(a, "lab:many", limit=60)
    assert ids(p) == sent and (p["count"], p["limit"], p["more"]) == (60, 60, False)
    p = history(a, "lab:many", limit=100)
    assert ids(p) == sent and (p["count"], p["limit"], p["more"]) == (60, 100, False)
    p = history(a, "lab:many", limit=10 ** 6)  # lowered to the cap (history_max_limit 500)
    assert ids(p) == sent and p["limit"] == 500 and p["more"] is False
    # In the top-level form too (arguments in payload, channel as room:channel).
    r = a.command("history", {"channel": "lab:many"}, limit=1)
    assert r["type"] == "system" and [m["id"] for m in r["payload"]["messages"]] == [sent[-1]]


def test_limit_is_capped_by_history_max_limit(make_server):
    s = make_server(args=["--history-max-limit", "5"])
    a = Bus(s.port)
    sent = publish(a, "lab:cap", 12, "c")
    p = history(a, "lab:cap", limit=10)
    assert ids(p) == sent[7:] and (p["limit"], p["more"]) == (5, True)
    p = history(a, "lab:cap", limit=3)
    assert ids(p) == sent[9:] and (p["limit"], p["more"]) == (3, True)
    p = history(a, "lab:cap", limit=5, since=sent[1])
    assert ids(p) == sent[2:7] and (p["limit"], p["more"], p["gap"]) == (5, True, False)
    p = history(a, "lab:cap", limit=50, since=sent[1])
    assert ids(p) == sent[2:7] and p["limit"] == 5


def test_default_limit_is_lowered_to_history_max_limit(make_server):
    """history_max_limit is the most messages one history command returns:
    the default limit of 50 is lowered to it like any other."""
    s = make_server(args=["--history-max-limit", "5"])
    a = Bus(s.port)
    sent = publish(a, "lab:cap", 12, "c")
    p = history(a, "lab:cap")
    assert (p["count"], p["limit"], p["more"]) == (5, 5, True), \
        "history without a limit returned %d messages with limit %r" % (p["count"], p["limit"])
    assert ids(p) == sent[7:]


def test_ring_buffer_drops_the_oldest(make_server):
    s = make_server(args=["--history-size", "3"])
    a = Bus(s.port)
    sent = publish(a, "lab:ring", 5, "r")
    p = history(a, "lab:ring")
    # Never more than history_size: the limit used is 3, and the 2 oldest are gone.
    assert ids(p) == sent[2:] and (p["count"], p["limit"], p["more"]) == (3, 3, False)
    p = history(a, "lab:ring", limit=2)
    assert ids(p) == sent[3:] and p["more"] is True
    info = a.command("channel_info", {"room": "lab", "channel": "ring"})["payload"]
    assert (info["history"], info["history_capacity"], info["messages"]) == (3, 3, 5)
    # since a message that was dropped: a gap, starting with the oldest held.
    p = history(a, "lab:ring", since=sent[0])
    assert ids(p) == sent[2:] and p["gap"] is True and p["since"] == sent[0]
    # since the oldest held: no gap.
    p = history(a, "lab:ring", since=sent[2])
    assert ids(p) == sent[3:] and p["gap"] is False
    st = a.command("status")["payload"]["history"]
    assert st["messages"] == 3 and st["capacity_per_channel"] == 3


def test_since_returns_exactly_the_messages_after_it(server):
    a = Bus(server.port)
    sent = publish(a, "lab:since", 8, "s")
    p = history(a, "lab:since", since=sent[2])
    assert ids(p) == sent[3:]
    assert (p["since"], p["gap"], p["more"], p["count"]) == (sent[2], False, False, 5)
    p = history(a, "lab:since", since=sent[-1])
    assert (p["messages"], p["gap"], p["more"]) == ([], False, False)
    # Paging forward with limit: more says that newer ones remain.
    p = history(a, "lab:since", since=sent[0], limit=3)
    assert ids(p) == sent[1:4] and p["more"] is True and p["gap"] is False
    p = history(a, "lab:since", since=ids(p)[-1], limit=3)
    assert ids(p) == sent[4:7] and p["more"] is True
    p = history(a, "lab:since", since=ids(p)[-1], limit=3)
    assert ids(p) == sent[7:] and p["more"] is False
    # An id that never was in this channel: a gap, from the oldest held.
    p = history(a, "lab:since", since="arq_never_sent")
    assert ids(p) == sent and p["gap"] is True and p["since"] == "arq_never_sent"
    p = history(a, "lab:since", since="arq_never_sent", limit=2)
    assert ids(p) == sent[:2] and p["gap"] is True and p["more"] is True
    # ... and in a channel without history.
    p = history(a, "lab:empty", since="arq_x")
    assert p["messages"] == [] and p["gap"] is True


def test_reconnect_and_catch_up_with_since(server):
    pub = Bus(server.port, client_id="pub", channel="science:explore")
    rita = Bus(server.port, client_id="rita", channel="science:explore")
    drain(pub)
    publish(pub, "science:explore", 3, "before")
    seen = [e for e in drain(rita) if e["type"] == "event"]
    assert [e["id"] for e in seen] == ["arq_before0", "arq_before1", "arq_before2"]
    last = seen[-1]["id"]
    rita.close()

    # Others keep publishing while rita is away (server-assigned ids too).
    other = Bus(server.port)
    pub.send({"type": "event", "room": "science", "channel": "explore", "payload": {"k": 1}})
    drain(pub)
    other.send({"type": "event", "id": "arq_missed2", "room": "science", "channel": "explore"})
    drain(other)
    pub.send({"type": "event", "room": "science", "channel": "explore", "payload": {"k": 3}})
    missed = [e for e in drain(pub) if e["type"] == "event"]  # pub hears other's only
    assert [e["id"] for e in missed] == ["arq_missed2"]
    publish(pub, "lab:unrelated", 2, "elsewhere")

    rita = Bus(server.port, client_id="rita", channel="science:explore")
    p = history(rita, "science:explore", since=last)
    assert p["gap"] is False and p["more"] is False and p["count"] == 3
    assert [m["from"] for m in p["messages"]] == ["pub", other.id, "pub"]
    assert p["messages"][1]["id"] == "arq_missed2"
    assert [m["payload"] for m in p["messages"]] == [{"k": 1}, {}, {"k": 3}]
    # The whole history is what rita saw plus what she missed.
    whole = history(rita, "science:explore")
    assert whole["messages"][:3] == seen and whole["messages"][3:] == p["messages"]


def test_invalid_limit_and_since(server):
    a = Bus(server.port)
    publish(a, "lab:x", 2, "x")
    for bad in [{"limit": 0}, {"limit": -1}, {"limit": "5"}, {"limit": 2.5}, {"limit": True}, {"limit": None},
                {"limit": [5]}, {"since": 5}, {"since": "nope"}, {"since": ""}, {"since": "arq_"},
                {"since": "arq_bad id"}, {"since": None}, {"since": {"id": "arq_x0"}}]:
        r = a.command("history", {"room": "lab", "channel": "x"}, **bad)
        assert error_code(r) == "invalid_argument", (bad, r)
        assert r["command"] == "history" and r["correlation_id"].startswith("arq_t"), r
    for missing in [{}, {"room": "lab"}]:
        r = a.command("history", missing)
        assert error_code(r) == "invalid_argument", (missing, r)


def test_room_wide_and_private_messages_are_not_stored(server):
    a = Bus(server.port, client_id="a", channel="science:explore")
    b = Bus(server.port, client_id="b", channel="science:general")
    drain(a)
    a.send({"type": "event", "id": "arq_roomwide", "room": "science", "payload": {}})
    a.send({"type": "private", "id": "arq_priv", "to": ["b"], "room": "science", "channel": "general"})
    a.send({"type": "event", "id": "arq_stored", "room": "science", "channel": "general"})
    assert drain(a) == []
    assert [e["id"] for e in drain(b) if e["type"] in ("event", "private")] == ["arq_roomwide", "arq_priv",
                                                                              "arq_stored"]
    assert ids(history(a, "science:general")) == ["arq_stored"]
    assert ids(history(a, "science:explore")) == []
    st = a.command("status")["payload"]["history"]
    assert st["messages"] == 1


def test_delete_channel_drops_its_history(server):
    a = Bus(server.port)
    publish(a, "lab:drop", 4, "d")
    assert len(ids(history(a, "lab:drop"))) == 4
    assert a.command("delete_channel", {"room": "lab", "channel": "drop"})["payload"]["deleted"] is True
    p = history(a, "lab:drop")
    assert (p["messages"], p["count"], p["more"]) == ([], 0, False)
    # Recreated: it starts empty, and since an old id is a gap.
    a.join("lab:drop")
    assert history(a, "lab:drop")["messages"] == []
    p = history(a, "lab:drop", since="arq_d3")
    assert p["messages"] == [] and p["gap"] is True
    new = publish(a, "lab:drop", 1, "new")
    assert ids(history(a, "lab:drop")) == new
    assert a.command("status")["payload"]["history"]["messages"] == 1
