"""Malformed input (docs/protocol.md, Envelopes and Errors).

A corpus of malformed messages: wrong JSON types for each field, missing and
extra fields, bad ids, names and timestamps, oversized strings, nesting over
32 levels, non-object JSON, trailing garbage, binary frames, repeated keys,
unknown types, `to` and `command` on the wrong type. Each gets its documented
error code, with correlation_id set to the message's id when it had a valid
one, and the server stays responsive: a ping is answered after every message.
Then the malformed streak (max_malformed in a row closes with 1008, a valid
envelope resets the count) and the envelope size limit.

Every envelope received goes through envelopes.check() (Bus.recv does it).
"""
import json
import re
import struct

from envelopes import Bus, check, error_code
from rawws import OP_CLOSE, OP_TEXT

VALID_ID = re.compile(r"^arq_[A-Za-z0-9_-]{1,124}$")
MALFORMED = {"invalid_json", "invalid_envelope", "unsupported_version", "unknown_type", "unsupported_frame",
             "payload_too_large"}


class Binary(bytes):
    """A message sent as a binary frame."""


def nest(depth, inner="1"):
    """A JSON value of 'depth' nested objects around 'inner'."""
    return '{"a":' * depth + inner + "}" * depth


def arrays(depth):
    return "[" * depth + "]" * depth


EV = {"type": "event", "room": "science", "channel": "explore"}


def ev(**kw):
    d = dict(EV)
    d.update(kw)
    return d


# (what, message, code). A dict message is sent as JSON with an "id" added in
# front unless it has its own (or "id": None removes it); str is sent as text
# exactly; Binary as a binary frame.
CORPUS = [
    # ---- not an object / not JSON ----------------------------------------
    ("array", "[]", "invalid_envelope"),
    ("array of an envelope", '[{"type":"event","room":"science","channel":"explore"}]', "invalid_envelope"),
    ("string", '"hello"', "invalid_envelope"),
    ("number", "42", "invalid_envelope"),
    ("null", "null", "invalid_envelope"),
    ("true", "true", "invalid_envelope"),
    ("empty text", "", "invalid_json"),
    ("whitespace only", "  \n ", "invalid_json"),
    ("unclosed object", '{"type":"event"', "invalid_json"),
    ("trailing comma", '{"type":"event","room":"science",}', "invalid_json"),
    ("trailing garbage", '{"id":"arq_tg","type":"event","room":"science","channel":"explore"} x', "invalid_json"),
    ("two objects", '{"type":"event","room":"science","channel":"explore"}{}', "invalid_json"),
    ("two objects on two lines", '{"type":"event"}\n{"type":"event"}', "invalid_json"),
    ("plain text", "not json", "invalid_json"),
    ("single quotes", "{'type':'event'}", "invalid_json"),
    ("unquoted key", '{type:"event"}', "invalid_json"),
    ("NaN", '{"type":"event","room":"science","channel":"explore","payload":{"x":NaN}}', "invalid_json"),
    ("leading zero", '{"type":"event","room":"science","channel":"explore","payload":{"x":01}}', "invalid_json"),
    ("bad escape", '{"type":"event","room":"science","channel":"explore","payload":{"s":"\\x41"}}',
     "invalid_json"),
    ("raw control char in a string", '{"type":"event","room":"science","payload":{"s":"a\tb"}}', "invalid_json"),
    ("comment", '{"type":"event" /* hi */}', "invalid_json"),
    # ---- type ------------------------------------------------------------
    ("no type", {"room": "science", "channel": "explore"}, "invalid_envelope"),
    ("empty object", {"id": None}, "invalid_envelope"),
    ("type number", ev(type=5), "invalid_envelope"),
    ("type null", ev(type=None), "invalid_envelope"),
    ("type list", ev(type=["event"]), "invalid_envelope"),
    ("type wrong case", ev(type="Event"), "unknown_type"),
    ("type unknown", ev(type="broadcast"), "unknown_type"),
    ("type empty", ev(type=""), "unknown_type"),
    ("type with space", ev(type="event "), "unknown_type"),
    # ---- version ---------------------------------------------------------
    ("version number", ev(version=1.0), "invalid_envelope"),
    ("version null", ev(version=None), "invalid_envelope"),
    ("version 2.0", ev(version="2.0"), "unsupported_version"),
    ("version 0.9", ev(version="0.9"), "unsupported_version"),
    ("version 1", ev(version="1"), "invalid_envelope"),
    ("version v1.0", ev(version="v1.0"), "invalid_envelope"),
    ("version 1.0.0", ev(version="1.0.0"), "invalid_envelope"),
    ("version empty", ev(version=""), "invalid_envelope"),
    ("second version key",
     '{"id":"arq_twover","version":"1.0","type":"event","room":"science","channel":"explore","version":"1.0"}',
     "invalid_envelope"),
    ("repeated type key", '{"id":"arq_twotype","type":"event","room":"science","channel":"explore","type":"event"}',
     "invalid_envelope"),
    ("repeated key inside payload",
     '{"id":"arq_twopay","type":"event","room":"science","channel":"explore","payload":{"x":1,"x":2}}',
     "invalid_envelope"),
    # ---- id --------------------------------------------------------------
    ("id number", ev(id=42), "invalid_envelope"),
    ("id null", dict(EV, id=None, **{"_keep_null_id": True}), "invalid_envelope"),
    ("id without arq_", ev(id="msg-1"), "invalid_envelope"),
    ("id arq_ alone", ev(id="arq_"), "invalid_envelope"),
    ("id with space", ev(id="arq_a b"), "invalid_envelope"),
    ("id with dot", ev(id="arq_a.b"), "invalid_envelope"),
    ("id upper-case prefix", ev(id="ARQ_x"), "invalid_envelope"),
    ("id non-ASCII", ev(id="arq_\u00e9"), "invalid_envelope"),
    ("id 129 bytes", ev(id="arq_" + "x" * 125), "invalid_envelope"),
    ("id object", ev(id={"v": "arq_x"}), "invalid_envelope"),
    # ---- timestamp -------------------------------------------------------
    ("timestamp 2026-02-29", ev(timestamp="2026-02-29T00:00:00Z"), "invalid_envelope"),
    ("timestamp 1900-02-29", ev(timestamp="1900-02-29T00:00:00Z"), "invalid_envelope"),
    ("timestamp month 13", ev(timestamp="2026-13-01T00:00:00Z"), "invalid_envelope"),
    ("timestamp April 31", ev(timestamp="2026-04-31T12:00:00Z"), "invalid_envelope"),
    ("timestamp hour 24", ev(timestamp="2026-01-01T24:00:00Z"), "invalid_envelope"),
    ("timestamp minute 60", ev(timestamp="2026-01-01T00:60:00Z"), "invalid_envelope"),
    ("timestamp with space", ev(timestamp="2026-01-01 00:00:00Z"), "invalid_envelope"),
    ("timestamp with offset", ev(timestamp="2026-01-01T00:00:00+01:00"), "invalid_envelope"),
    ("timestamp without Z", ev(timestamp="2026-01-01T00:00:00"), "invalid_envelope"),
    ("timestamp empty fraction", ev(timestamp="2026-01-01T00:00:00.Z"), "invalid_envelope"),
    ("timestamp 10 fraction digits", ev(timestamp="2026-01-01T00:00:00.1234567890Z"), "invalid_envelope"),
    ("timestamp date only", ev(timestamp="2026-01-01"), "invalid_envelope"),
    ("timestamp number", ev(timestamp=1767225600), "invalid_envelope"),
    ("timestamp empty", ev(timestamp=""), "invalid_envelope"),
    # ---- room and channel ------------------------------------------------
    ("room number", ev(room=5), "invalid_envelope"),
    ("room null", ev(room=None), "invalid_envelope"),
    ("room empty", ev(room=""), "invalid_envelope"),
    ("room 65 bytes", ev(room="r" * 65), "invalid_envelope"),
    ("channel 65 bytes", ev(channel="c" * 65), "invalid_envelope"),
    ("room:channel with a 65-byte channel", {"type": "event", "channel": "science:" + "c" * 65}, "invalid_envelope"),
    ("room starting with -", ev(room="-bad"), "invalid_envelope"),
    ("room starting with _", ev(room="_bad"), "invalid_envelope"),
    ("room with space", ev(room="sci ence"), "invalid_envelope"),
    ("room non-ASCII", ev(room="sc\u00efence"), "invalid_envelope"),
    ("channel with slash", ev(channel="a/b"), "invalid_envelope"),
    ("channel list", ev(channel=["science", "explore"]), "invalid_envelope"),
    ("channel a:b:c", {"type": "event", "channel": "a:b:c"}, "invalid_envelope"),
    ("room contradicts channel", ev(room="chat", channel="science:explore"), "invalid_envelope"),
    ("channel without room", {"type": "event", "channel": "explore"}, "invalid_envelope"),
    ("room:channel in room and a channel", ev(room="science:explore", channel="x"), "invalid_envelope"),
    ("room: with empty channel", {"type": "event", "room": "science:"}, "invalid_envelope"),
    (":channel with empty room", {"type": "event", "channel": ":explore"}, "invalid_envelope"),
    ("event with nowhere to go", {"type": "event", "payload": {}}, "invalid_envelope"),
    # ---- from ------------------------------------------------------------
    ("from number", ev(**{"from": 5}), "invalid_envelope"),
    ("from empty", ev(**{"from": ""}), "invalid_envelope"),
    ("from null", ev(**{"from": None}), "invalid_envelope"),
    # ---- to --------------------------------------------------------------
    ("to on an event", ev(to=["someone"]), "invalid_envelope"),
    ("to on a command", {"type": "command", "command": "ping", "to": ["someone"]}, "invalid_envelope"),
    ("private without to", {"type": "private", "payload": {}}, "invalid_envelope"),
    ("to empty", {"type": "private", "to": []}, "invalid_envelope"),
    ("to a string", {"type": "private", "to": "someone"}, "invalid_envelope"),
    ("to a number in it", {"type": "private", "to": [5]}, "invalid_envelope"),
    ("to a bad client id", {"type": "private", "to": ["ok", "bad id!"]}, "invalid_envelope"),
    ("to a 65-byte client id", {"type": "private", "to": ["c" * 65]}, "invalid_envelope"),
    ("to 101 ids", {"type": "private", "to": ["c%d" % i for i in range(101)]}, "invalid_envelope"),
    ("to null", {"type": "private", "to": None}, "invalid_envelope"),
    # ---- command ---------------------------------------------------------
    ("command on an event", ev(command="ping"), "invalid_envelope"),
    ("command on a private", {"type": "private", "to": ["x"], "command": "ping"}, "invalid_envelope"),
    ("command type without command", {"type": "command"}, "invalid_envelope"),
    ("command empty", {"type": "command", "command": ""}, "invalid_envelope"),
    ("command 33 bytes", {"type": "command", "command": "c" * 33}, "invalid_envelope"),
    ("command number", {"type": "command", "command": 7}, "invalid_envelope"),
    ("command null", {"type": "command", "command": None}, "invalid_envelope"),
    # ---- eventType and telemetry -------------------------------------------
    ("eventType on an event", ev(eventType="x"), "invalid_envelope"),
    ("eventType on a command", {"type": "command", "command": "ping", "eventType": "x"}, "invalid_envelope"),
    ("eventType on a private", {"type": "private", "to": ["x"], "eventType": "x"}, "invalid_envelope"),
    ("telemetry without eventType", {"type": "telemetry", "payload": {"x": 1}}, "invalid_envelope"),
    ("telemetry without payload", {"type": "telemetry", "eventType": "x"}, "invalid_envelope"),
    ("telemetry payload a string", {"type": "telemetry", "eventType": "x", "payload": "p"}, "invalid_envelope"),
    ("telemetry payload null", {"type": "telemetry", "eventType": "x", "payload": None}, "invalid_envelope"),
    ("eventType number", {"type": "telemetry", "eventType": 5, "payload": {}}, "invalid_envelope"),
    ("eventType null", {"type": "telemetry", "eventType": None, "payload": {}}, "invalid_envelope"),
    ("eventType empty", {"type": "telemetry", "eventType": "", "payload": {}}, "invalid_envelope"),
    ("eventType 65 bytes", {"type": "telemetry", "eventType": "e" * 65, "payload": {}}, "invalid_envelope"),
    ("eventType with space", {"type": "telemetry", "eventType": "agent activity", "payload": {}},
     "invalid_envelope"),
    ("eventType starting with .", {"type": "telemetry", "eventType": ".x", "payload": {}}, "invalid_envelope"),
    ("eventType in the wrong case", {"type": "telemetry", "eventtype": "x", "payload": {}}, "invalid_envelope"),
    # ---- payload, metadata, correlation_id --------------------------------
    ("payload list", ev(payload=[]), "invalid_envelope"),
    ("payload string", ev(payload="x"), "invalid_envelope"),
    ("payload null", ev(payload=None), "invalid_envelope"),
    ("payload number", ev(payload=5), "invalid_envelope"),
    ("metadata list", ev(metadata=[]), "invalid_envelope"),
    ("metadata string", ev(metadata="m"), "invalid_envelope"),
    ("correlation_id empty", ev(correlation_id=""), "invalid_envelope"),
    ("correlation_id 129 bytes", ev(correlation_id="c" * 129), "invalid_envelope"),
    ("correlation_id number", ev(correlation_id=5), "invalid_envelope"),
    # ---- unknown fields (1.0) --------------------------------------------
    ("unknown field", ev(colour="blue"), "invalid_envelope"),
    ("unknown field in 1.0", ev(version="1.0", colour="blue"), "invalid_envelope"),
    ("field name in the wrong case", ev(Payload={}), "invalid_envelope"),
    ("field name with a trailing space", ev(**{"room ": "science"}), "invalid_envelope"),
    # ---- nesting ---------------------------------------------------------
    ("payload nested 33 deep (objects)",
     '{"id":"arq_deep33","type":"event","room":"science","channel":"explore","payload":' + nest(31, "{}") + "}",
     "invalid_envelope"),
    ("metadata nested 33 deep (arrays)",
     '{"id":"arq_deep33a","type":"event","room":"science","channel":"explore","metadata":{"a":' + arrays(31)
     + "}}", "invalid_envelope"),
    ("payload nested 200 deep",
     '{"id":"arq_deep200","type":"event","room":"science","channel":"explore","payload":' + nest(199, "{}") + "}",
     "invalid_envelope"),
    # ---- binary frames ---------------------------------------------------
    ("binary envelope", Binary(json.dumps(ev(id="arq_bin")).encode()), "unsupported_frame"),
    ("binary empty", Binary(b""), "unsupported_frame"),
    ("binary bytes", Binary(b"\x00\xff\xfe\x01"), "unsupported_frame"),
]


def encode(i, message):
    """Returns (frame kind, bytes, the id the message carries if it is a valid
    one in a JSON object, else None)."""
    if isinstance(message, Binary):
        return "binary", bytes(message), None
    if isinstance(message, dict):
        d = dict(message)
        keep_null = d.pop("_keep_null_id", False)
        if "id" not in d:
            d = dict([("id", "arq_m%d" % i)] + list(d.items()))
        elif d["id"] is None and not keep_null:
            del d["id"]
        text = json.dumps(d)
    else:
        text = message

    def no_constants(c):
        raise ValueError(c)
    try:
        obj = json.loads(text, parse_constant=no_constants, object_pairs_hook=dict)
    except ValueError:
        obj = None
    mid = obj.get("id") if isinstance(obj, dict) else None
    return "text", text.encode(), mid if isinstance(mid, str) and VALID_ID.match(mid) else None


def run_corpus(port):
    """Sends every corpus message, each followed by a ping. Returns a list of
    (what, sent text, expected code, the error received, the id it carried)."""
    observer = Bus(port, channel="science:explore")
    stream = Bus(port, channel="integriguard:telemetry-stream")  # where valid client telemetry goes
    m = Bus(port)
    results = []
    for i, (what, message, code) in enumerate(CORPUS):
        kind, data, mid = encode(i, message)
        if kind == "binary":
            m.send_binary(data)
        else:
            m.send(data)
        got = m.recv()
        results.append((what, data[:200], code, got, mid))
        # Still healthy: the next message is understood and answered.
        pong = m.command("ping", data=i)
        assert pong["command"] == "pong" and pong["payload"]["data"] == i, (what, pong)
        assert m.skipped == [], (what, m.skipped)  # exactly one answer per malformed message
    # Nothing malformed was routed, and the connection is still open.
    for bus in (observer, stream):
        ping = bus.command("ping")
        assert ping["command"] == "pong" and bus.skipped == [], bus.skipped
    st = m.command("status")["payload"]
    assert st["clients"]["total"] == 3
    return results


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 50
    assert len({w for w, _, _ in CORPUS}) == len(CORPUS)


def test_each_malformed_message_gets_its_documented_code(server):
    problems = []
    for what, data, code, got, mid in run_corpus(server.port):
        if got["type"] != "error" or got["payload"]["code"] != code:
            problems.append("%s: expected %s, got %s (sent %r)" % (
                what, code, got["payload"].get("code") if got["type"] == "error" else json.dumps(got), data))
    assert not problems, "\n".join(problems)


def test_errors_carry_the_id_of_the_message_when_it_had_a_valid_one(server):
    """"correlation_id is the offending message's id when it had a valid one":
    checked for every message that is a JSON object (invalid_json and binary
    messages are not envelopes); an error for a message without a valid id has
    no correlation_id."""
    problems = []
    for what, data, code, got, mid in run_corpus(server.port):
        if code in ("invalid_json", "unsupported_frame", "payload_too_large"):
            continue
        if mid is not None and got.get("correlation_id") != mid:
            problems.append("%s: correlation_id %r, expected %r (sent %r)" % (
                what, got.get("correlation_id"), mid, data))
        if mid is None and "correlation_id" in got:
            problems.append("%s: correlation_id %r for a message without a valid id" % (what, got["correlation_id"]))
    assert not problems, "\n".join(problems)


def test_boundaries_are_accepted(server):
    """The largest and smallest valid values are not malformed."""
    observer = Bus(server.port, channel="science:explore")
    observer.join("%s:%s" % ("r" * 64, "c" * 64))
    m = Bus(server.port, client_id="edge")
    accepted = [
        ev(id="arq_" + "x" * 124),
        ev(id="arq_A-_9"),
        ev(correlation_id="c" * 128),
        ev(correlation_id="x"),
        ev(timestamp="2024-02-29T00:00:00Z"),
        ev(timestamp="2000-02-29T23:59:59.999999999Z"),
        {"type": "event", "room": "r" * 64, "channel": "c" * 64},
        {"type": "event", "channel": "%s:%s" % ("r" * 64, "c" * 64)},
        '{"type":"event","room":"science","channel":"explore","payload":' + nest(30, "{}") + "}",  # depth 32
        '{"type":"event","room":"science","channel":"explore","metadata":{"a":' + arrays(30) + "}}",
        '{"type":"event","room":"science","channel":"explore","payload":{"s":"' + "[" * 100 + '\\"{{{{"}}',
        '{"type":"event","room":"science","channel":"explore"}  \n\t ',
        ev(payload={}, metadata={}),
        ev(**{"from": "anyone"}),
    ]
    for env in accepted:
        m.send(env)
    m.command("ping")
    assert m.skipped == [], m.skipped
    observer.command("ping")
    assert [e["type"] for e in observer.skipped] == ["event"] * len(accepted), observer.skipped
    # Valid envelopes whose errors are not malformed.
    r = m.command("c" * 32)
    assert error_code(r) == "unknown_command"
    m.send({"type": "private", "id": "arq_to100", "to": ["c%d" % i for i in range(99)] + ["edge"]})
    got = m.recv()
    assert got["type"] == "private" and got["id"] == "arq_to100"
    err = m.recv()
    assert error_code(err) == "not_found" and len(err["payload"]["unknown"]) == 99, err


def test_system_and_error_from_a_client_are_forbidden_and_telemetry_goes_to_its_channel(server):
    observer = Bus(server.port, channel="science:explore")
    stream = Bus(server.port, channel="integriguard:telemetry-stream")
    m = Bus(server.port)
    for t in ("system", "error"):
        m.send({"type": t, "id": "arq_%s" % t, "room": "science", "channel": "explore", "payload": {"event": "x"}})
        err = m.recv()
        assert error_code(err) == "forbidden" and err["correlation_id"] == "arq_%s" % t, err
    # Telemetry needs "eventType" and "payload"...
    m.send({"type": "telemetry", "id": "arq_telemetry", "room": "science", "channel": "explore",
            "payload": {"event": "x"}})
    err = m.recv()
    assert error_code(err) == "invalid_envelope" and err["correlation_id"] == "arq_telemetry", err
    assert m.command("ping")["command"] == "pong" and m.skipped == []
    assert observer.command("ping")["command"] == "pong" and observer.skipped == []
    assert stream.command("ping")["command"] == "pong" and stream.skipped == []
    # ... and then goes to the telemetry channel, whatever room and channel it names.
    m.send({"type": "telemetry", "id": "arq_telemetry2", "eventType": "probe", "room": "science",
            "channel": "explore", "payload": {"event": "x"}})
    assert m.command("ping")["command"] == "pong" and m.skipped == []
    assert observer.command("ping")["command"] == "pong" and observer.skipped == []
    assert stream.command("ping")["command"] == "pong"
    [got] = stream.skipped
    assert {k: got.get(k) for k in ("type", "id", "eventType", "room", "channel", "from", "payload")} == \
        {"type": "telemetry", "id": "arq_telemetry2", "eventType": "probe", "room": "integriguard",
         "channel": "telemetry-stream", "from": m.id, "payload": {"event": "x"}}, got


def read_until_close(bus):
    """Returns (envelopes received, (code, reason)) up to the close frame."""
    envs = []
    while True:
        op, payload = bus.ws.recv_message()
        if op == OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            return envs, (code, payload[2:].decode("utf-8", "replace"))
        assert op == OP_TEXT, op
        envs.append(check(payload))


def test_malformed_streak_closes_with_1008_and_a_valid_message_resets_it(make_server):
    s = make_server(args=["--max-malformed", "3", "--max-envelope-size", "1KiB"])
    watcher = Bus(s.port, channel="lab:streak")
    m = Bus(s.port, client_id="streaker", channel="lab:streak")
    assert watcher.recv()["payload"]["event"] == "client_joined"
    bad = [lambda: m.send("{"),                                       # invalid_json
           lambda: m.send_binary(b"{}"),                              # unsupported_frame
           lambda: m.send(json.dumps(ev(payload={"x": "y" * 2000}))),  # payload_too_large
           lambda: m.send({"type": "nope"}),                          # unknown_type
           lambda: m.send({"type": "event", "version": "9.0"}),       # unsupported_version
           lambda: m.send({"type": "event", "room": 1})]              # invalid_envelope

    def two_bad(k):
        bad[k % len(bad)]()
        bad[(k + 1) % len(bad)]()
        codes = [error_code(m.recv()), error_code(m.recv())]
        assert set(codes) <= MALFORMED, codes

    # Resets: a ping, an unknown command, a forbidden type, an event, a private
    # message to nobody: all valid envelopes.
    resets = [lambda: m.command("ping"),
              lambda: m.command("no_such_command"),
              lambda: (m.send({"type": "system", "id": "arq_sys"}), m.recv()),
              lambda: (m.send(ev(id="arq_ok")), m.command("ping")),
              lambda: (m.send({"type": "private", "to": ["ghost"]}), m.recv())]
    for k, reset in enumerate(resets):
        two_bad(k)
        reset()
    two_bad(4)
    # The third in a row: its error, then the close.
    m.send("[]")
    envs, close = read_until_close(m)
    assert [error_code(e) for e in envs] == ["invalid_envelope"], envs
    assert close == (1008, "too many malformed messages")
    m.close()
    # Its channel was told.
    note = watcher.recv()
    assert note["payload"]["event"] == "client_left" and note["payload"]["client_id"] == "streaker"
    assert note["payload"]["reason"] == "disconnected"
    assert watcher.command("ping")["command"] == "pong"


def test_default_streak_is_10(server):
    m = Bus(server.port)
    for _ in range(9):
        m.send("nope")
        assert error_code(m.recv()) == "invalid_json"
    assert m.command("ping")["command"] == "pong"
    for _ in range(9):
        m.send_binary(b"x")
        assert error_code(m.recv()) == "unsupported_frame"
    m.send('{"type":"event","room":"science","channel":"explore","colour":1}')  # the tenth in a row
    envs, close = read_until_close(m)
    assert [error_code(e) for e in envs] == ["invalid_envelope"] and close == (1008, "too many malformed messages")
    m.close()


def test_max_malformed_0_never_closes(make_server):
    s = make_server(args=["--max-malformed", "0"])
    m = Bus(s.port)
    for i in range(30):
        m.send("x" if i % 2 else "[]")
        assert error_code(m.recv()) in ("invalid_json", "invalid_envelope")
    assert m.command("ping")["command"] == "pong"


def test_envelope_size_limit(make_server):
    s = make_server(args=["--max-envelope-size", "1KiB", "--max-message-size", "4KiB"])
    observer = Bus(s.port, channel="science:explore")
    m = Bus(s.port)

    def sized(n, mid):
        base = json.dumps(ev(id=mid, payload={"pad": ""}))
        text = json.dumps(ev(id=mid, payload={"pad": "p" * (n - len(base))}))
        assert len(text) == n
        return text

    m.send(sized(1024, "arq_exactly"))  # exactly max_envelope_size: accepted
    got = observer.recv()
    assert got["id"] == "arq_exactly"
    for n in (1025, 3000, 4096):
        m.send(sized(n, "arq_big%d" % n))
        err = m.recv()
        assert error_code(err) == "payload_too_large", err
    # The connection stays open and works.
    assert m.command("ping")["command"] == "pong" and m.skipped == []
    m.send(sized(1000, "arq_after"))
    assert observer.recv()["id"] == "arq_after"
    # Over max_message_size: closed with 1009 instead.
    m.send(sized(4097, "arq_huge"))
    envs, close = read_until_close(m)
    assert envs == [] and close[0] == 1009, (envs, close)
    m.close()
    assert observer.command("ping")["command"] == "pong" and observer.skipped == []


def test_event_with_nowhere_to_go_counts_toward_the_streak(make_server):
    """An event with neither room nor channel on a connection without an
    initial channel is an invalid_envelope error, one of the malformed codes:
    it counts toward max_malformed like any other (and does not reset it)."""
    s = make_server(args=["--max-malformed", "2"])
    m = Bus(s.port)
    m.send({"type": "event", "id": "arq_nowhere1"})
    m.send({"type": "event", "id": "arq_nowhere2"})
    m.send({"type": "command", "id": "arq_after", "command": "ping"})
    envs = []
    while True:
        op, payload = m.ws.recv_message()
        if op == OP_CLOSE:
            close = struct.unpack("!H", payload[:2])[0], payload[2:].decode()
            break
        envs.append(check(payload))
        if envs[-1].get("correlation_id") == "arq_after":
            close = None
            break
    m.close()
    assert [e["payload"].get("code") for e in envs[:2]] == ["invalid_envelope", "invalid_envelope"], envs
    assert close == (1008, "too many malformed messages"), \
        "two invalid_envelope errors in a row with max_malformed 2, but the ping was answered: %r" % envs
