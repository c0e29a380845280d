"""Protocol v1 envelopes as clients write them (docs/protocol.md, Envelopes).

The two short forms of the doc work exactly as written and the server fills in
version, id, timestamp and from; what a client chooses (id, timestamp,
correlation_id, metadata, payload) is kept; 'from' is always the sender's own
id; room:channel in one field is the same as the two fields; versioning (1.0
strict, 1.y forwarded with its unknown fields, other majors refused). One test
speaks through the Python websockets library instead of the raw-socket Bus.

Every envelope received goes through envelopes.check() (Bus.recv does it).
"""
import asyncio
import json
import re

import websockets

from conftest import SLOW
from envelopes import Bus, check, error_code

SHORT_JOIN = '{"type":"command","command":"join_channel","room":"science","channel":"explore"}'
SHORT_EVENT = '{"type":"event","room":"science","channel":"explore","payload":{"message":"hello"}}'
ID_RE = re.compile(r"^arq_[A-Za-z0-9_-]{1,124}$")
SERVER_TS_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$")  # milliseconds


def drain(bus):
    """The envelopes that reach 'bus' before the answer to a ping it sends now,
    in order. A ping answered on the sender's connection also proves that the
    server has routed everything the sender sent before it."""
    reply = bus.command("ping")
    assert reply["type"] == "system" and reply["command"] == "pong", reply
    return list(bus.skipped)


def test_short_forms_work_as_written_and_the_server_fills_in_the_rest(server):
    member = Bus(server.port, channel="science:explore")
    newcomer = Bus(server.port)  # no parameters at all

    newcomer.send(SHORT_JOIN)
    reply = newcomer.recv()
    assert reply["type"] == "system" and reply["command"] == "join_channel", reply
    assert ID_RE.match(reply["correlation_id"]), reply  # the request had no id: the server gave it one
    assert reply["payload"]["room"] == "science" and reply["payload"]["channel"] == "explore", reply
    assert reply["payload"]["joined"] is True and reply["payload"]["created"] is False, reply

    joined = member.recv()
    assert joined["type"] == "system" and joined["payload"]["event"] == "client_joined", joined
    assert joined["payload"]["client_id"] == newcomer.id

    newcomer.send(SHORT_EVENT)
    ev = member.recv()
    assert list(ev) == ["version", "id", "type", "room", "channel", "from", "payload", "timestamp", "position"], ev
    assert re.match(r"^[1-9][0-9]*$", ev["position"]), ev  # its place in the channel's history
    assert ev["version"] == "1.0"
    assert ID_RE.match(ev["id"]), ev
    assert ev["type"] == "event"
    assert (ev["room"], ev["channel"]) == ("science", "explore")
    assert ev["from"] == newcomer.id
    assert ev["payload"] == {"message": "hello"}
    assert SERVER_TS_RE.match(ev["timestamp"]), ev

    # Nothing comes back to the sender (no echo), and the member got it once.
    assert drain(newcomer) == []
    assert drain(member) == []

    # Each message gets its own id.
    newcomer.send(SHORT_EVENT)
    ev2 = member.recv()
    assert ev2["id"] != ev["id"]
    assert int(ev2["position"]) > int(ev["position"])


def test_client_chosen_id_timestamp_and_fields_are_kept(server):
    member = Bus(server.port, channel="science:explore")
    sender = Bus(server.port)
    sent = [
        {"id": "arq_client-chosen_1", "timestamp": "2025-12-31T23:59:59.5Z"},
        {"id": "arq_" + "x" * 124, "timestamp": "2026-01-31T12:00:00.123456789Z"},
        {"id": "arq_leap", "timestamp": "2024-02-29T00:00:00Z"},
        {"id": "arq_lower", "timestamp": "2026-06-01t08:30:00z"},
    ]
    for i, fields in enumerate(sent):
        env = {"type": "event", "room": "science", "channel": "explore", "payload": {"i": i},
               "metadata": {"trace": "t-%d" % i, "tags": ["a", "b"]}, "correlation_id": "req %d: anything" % i}
        env.update(fields)
        sender.send(env)
        got = member.recv()
        assert got["id"] == fields["id"], got
        assert got["timestamp"] == fields["timestamp"], got  # as written, not reformatted
        assert got["metadata"] == env["metadata"], got
        assert got["correlation_id"] == env["correlation_id"], got
        assert got["payload"] == {"i": i}
        assert got["from"] == sender.id


def test_payload_and_metadata_are_forwarded_unchanged(server):
    member = Bus(server.port, channel="science:explore")
    sender = Bus(server.port)
    payload = {"text": "h\u00e9llo \U0001F600 \u4e16\u754c", "quote": "a \"quoted\" \\ back\\slash",
               "n": [0, -1, 2.5, 1e-7, 9007199254740993, -9223372036854775808], "t": True, "f": False, "z": None,
               "nested": {"a": [{"b": {"c": []}}, {}]}, "empty": "", "brackets": "[[[{{{"}
    metadata = {"source": "sensor-7", "deep": {"x": [1, [2, [3]]]}}
    sender.send({"type": "event", "room": "science", "channel": "explore", "payload": payload, "metadata": metadata})
    got = member.recv()
    assert got["payload"] == payload
    assert got["metadata"] == metadata


def test_payload_json_limits_are_as_documented(server):
    """A payload is the application's JSON: "\\u0000" is a valid string escape
    and is forwarded. An integer beyond the signed 64-bit range (what
    JSON.stringify(2 ** 64) writes) is refused as invalid_json, as
    docs/protocol.md says, while the same number with an exponent passes."""
    member = Bus(server.port, channel="science:explore")
    sender = Bus(server.port)
    sender.send('{"type":"event","id":"arq_nul","room":"science","channel":"explore","payload":{"s":"a\\u0000b"}}')
    assert member.recv()["payload"] == {"s": "a\u0000b"}
    sender.send('{"type":"event","id":"arq_bigint","room":"science","channel":"explore",'
                '"payload":{"n":18446744073709552000}}')
    err = sender.recv()
    assert error_code(err) == "invalid_json"
    sender.send('{"type":"event","id":"arq_bigreal","room":"science","channel":"explore",'
                '"payload":{"n":1.8446744073709552e19}}')
    assert member.recv()["payload"] == {"n": 1.8446744073709552e19}
    assert drain(sender) == []


def test_from_sent_by_a_client_is_replaced_by_its_own_id(server):
    victim = Bus(server.port, client_id="victim", channel="science:explore")
    member = Bus(server.port, client_id="member", channel="science:explore")
    mallory = Bus(server.port, client_id="mallory")

    mallory.send({"type": "event", "room": "science", "channel": "explore", "from": "victim", "payload": {"x": 1}})
    assert drain(mallory) == []
    for bus in (victim, member):
        got = [e for e in drain(bus) if e["type"] == "event"]
        assert len(got) == 1 and got[0]["from"] == "mallory", got

    mallory.send({"type": "private", "to": ["member"], "from": "victim", "payload": {"x": 2}})
    got = member.recv()
    assert got["type"] == "private" and got["from"] == "mallory", got

    # An id that is not anyone's at all is replaced too.
    mallory.send({"type": "event", "room": "science", "channel": "explore", "from": "server", "payload": {"x": 3}})
    assert drain(mallory) == []
    got = [e for e in drain(member) if e["type"] == "event"]
    assert len(got) == 1 and got[0]["from"] == "mallory", got


def test_room_channel_in_one_field_equals_the_two_fields(server):
    member = Bus(server.port, channel="science:explore")
    sender = Bus(server.port)
    forms = [
        {"room": "science", "channel": "explore"},
        {"channel": "science:explore"},
        {"room": "science:explore"},
        {"room": "science", "channel": "science:explore"},
    ]
    for i, form in enumerate(forms):
        env = {"type": "event", "id": "arq_form%d" % i, "payload": {"form": i}}
        env.update(form)
        sender.send(env)
        got = member.recv()
        # The server always sends the two fields separately.
        assert (got["room"], got["channel"]) == ("science", "explore"), (form, got)
        assert got["id"] == "arq_form%d" % i and got["payload"] == {"form": i}
    assert drain(sender) == []

    # The same in command arguments, top level and in the payload.
    r = sender.command("join_channel", {"channel": "lab:bench"})
    assert r["type"] == "system" and (r["payload"]["room"], r["payload"]["channel"]) == ("lab", "bench"), r
    r = sender.command("join_channel", {"room": "lab:stool"})
    assert r["type"] == "system" and (r["payload"]["room"], r["payload"]["channel"]) == ("lab", "stool"), r
    r = sender.command("channel_info", channel="lab:bench")
    assert r["type"] == "system" and (r["payload"]["room"], r["payload"]["channel"]) == ("lab", "bench"), r
    assert [m["client_id"] for m in r["payload"]["member_list"]] == [sender.id]

    # A room that contradicts the room part of channel is an error.
    sender.send({"type": "event", "id": "arq_contra", "room": "chat", "channel": "science:explore"})
    err = sender.recv()
    assert error_code(err) == "invalid_envelope" and err["correlation_id"] == "arq_contra", err
    assert drain(member) == []


def test_version_1_0_is_strict_and_names_the_unknown_field(server):
    member = Bus(server.port, channel="science:explore")
    sender = Bus(server.port)
    for i, version in enumerate(["1.0", None]):
        env = {"type": "event", "id": "arq_strict%d" % i, "room": "science", "channel": "explore", "colour": "blue"}
        if version:
            env["version"] = version
        sender.send(env)
        err = sender.recv()
        assert error_code(err) == "invalid_envelope", err
        assert "colour" in err["payload"]["message"], err
        assert err["correlation_id"] == "arq_strict%d" % i
    assert drain(member) == []


def test_version_1_y_forwards_unknown_fields_unchanged(server):
    member = Bus(server.port, client_id="newer-b", channel="science:explore")
    sender = Bus(server.port, client_id="newer-a")
    extra = {"colour": "blue", "priority": 7, "nested": {"a": [1, {"b": None}], "s": "\u00e9"}, "flag": False}
    env = {"version": "1.1", "type": "event", "id": "arq_v11", "room": "science", "channel": "explore",
           "payload": {"k": "v"}}
    env.update(extra)
    sender.send(env)
    got = member.recv()
    assert got["version"] == "1.1", got
    for k, v in extra.items():
        assert got[k] == v, (k, got)
    assert got["from"] == "newer-a" and got["payload"] == {"k": "v"} and got["id"] == "arq_v11"

    # A private 1.y message carries its fields too; a larger minor is fine.
    sender.send({"version": "1.25", "type": "private", "to": ["newer-b"], "hint": {"x": 1}})
    got = member.recv()
    assert got["type"] == "private" and got["version"] == "1.25" and got["hint"] == {"x": 1}, got

    # The fields the server knows are validated as in 1.0.
    sender.send({"version": "1.1", "type": "event", "id": "arq_v11bad", "room": 5, "channel": "explore",
                 "colour": "red"})
    err = sender.recv()
    assert error_code(err) == "invalid_envelope" and err["correlation_id"] == "arq_v11bad", err
    assert drain(member) == []

    # The server's own envelopes stay 1.0.
    r = sender.command("ping")
    assert r["version"] == "1.0"


def test_forwarded_1_y_envelope_keeps_the_senders_version_string(server):
    """"the forwarded envelope keeps the sender's version": "1.01" is a valid
    1.y version (envelope.schema.json allows 1-4 minor digits)."""
    member = Bus(server.port, channel="science:explore")
    sender = Bus(server.port)
    for version in ["1.10", "1.01"]:
        sender.send({"version": version, "type": "event", "room": "science", "channel": "explore", "x": version})
        got = member.recv()
        assert got["x"] == version
        assert got["version"] == version, "sent version %r, forwarded as %r" % (version, got["version"])


def test_other_major_versions_are_unsupported(server):
    member = Bus(server.port, channel="science:explore")
    sender = Bus(server.port)
    for i, version in enumerate(["2.0", "0.9", "3.1", "10.0"]):
        sender.send({"version": version, "type": "event", "id": "arq_major%d" % i, "room": "science",
                     "channel": "explore"})
        err = sender.recv()
        assert error_code(err) == "unsupported_version", (version, err)
        assert err["correlation_id"] == "arq_major%d" % i
    # Not of the form major.minor: invalid_envelope.
    for i, version in enumerate(["1", "1.0.0", "v1.0", "1.x", "", "1.0 "]):
        sender.send({"version": version, "type": "event", "id": "arq_form%d" % i, "room": "science",
                     "channel": "explore"})
        err = sender.recv()
        assert error_code(err) == "invalid_envelope", (version, err)
        assert err["correlation_id"] == "arq_form%d" % i
    assert drain(member) == []


def test_version_strings_the_schema_refuses_are_invalid(server):
    """envelope.schema.json: version matches ^1\\.[0-9]{1,4}$. "01.0" and
    "001.5" are not of that form, so they are not v1 envelopes."""
    member = Bus(server.port, channel="science:explore")
    sender = Bus(server.port)
    problems = []
    for i, version in enumerate(["01.0", "001.5"]):
        sender.send({"version": version, "type": "event", "id": "arq_pad%d" % i, "room": "science",
                     "channel": "explore"})
        back = drain(sender)
        codes = [e["payload"].get("code") for e in back if e["type"] == "error"]
        if codes != ["invalid_envelope"]:
            problems.append("version %r: expected invalid_envelope, got %r" % (version, codes or "delivered"))
    drain(member)
    assert not problems, "\n".join(problems)


def test_with_the_python_websockets_library(server):
    async def recv(ws):
        return check(await asyncio.wait_for(ws.recv(), 10 * SLOW))

    async def run():
        kw = {"open_timeout": 5 * SLOW, "ping_interval": None}
        async with websockets.connect(server.url + "/?client_id=py-reader&channel=science:explore", **kw) as reader:
            welcome = await recv(reader)
            assert welcome["payload"]["event"] == "welcome" and welcome["payload"]["client_id"] == "py-reader"
            assert welcome["payload"]["subscriptions"] == ["science:explore"]
            async with websockets.connect(server.url, **kw) as writer:
                w = await recv(writer)
                writer_id = w["payload"]["client_id"]
                await writer.send(SHORT_JOIN)
                reply = await recv(writer)
                assert reply["command"] == "join_channel" and reply["payload"]["joined"] is True, reply
                note = await recv(reader)
                assert note["payload"]["event"] == "client_joined" and note["payload"]["client_id"] == writer_id
                await writer.send(SHORT_EVENT)
                ev = await recv(reader)
                assert ev["type"] == "event" and ev["from"] == writer_id and ev["version"] == "1.0", ev
                assert ev["payload"] == {"message": "hello"} and ID_RE.match(ev["id"])
                assert SERVER_TS_RE.match(ev["timestamp"])
                # A command through the library, and an error.
                await writer.send(json.dumps({"type": "command", "command": "ping", "id": "arq_py1",
                                              "payload": {"data": [1, "two", {"3": None}]}}))
                pong = await recv(writer)
                assert pong["command"] == "pong" and pong["correlation_id"] == "arq_py1", pong
                assert pong["payload"]["data"] == [1, "two", {"3": None}]
                await writer.send('{"type":"event","id":"arq_py2","room":"science","colour":1}')
                err = await recv(writer)
                assert err["type"] == "error" and err["payload"]["code"] == "invalid_envelope"
                assert err["correlation_id"] == "arq_py2"
            left = await recv(reader)
            assert left["payload"]["event"] == "client_left" and left["payload"]["client_id"] == writer_id
            assert left["payload"]["reason"] == "disconnected"
    asyncio.run(run())
