"""Registry messages in memory: round trips, and every kind of bad field is a RemoteProtocolError."""

from __future__ import annotations

import struct

import msgpack
import pytest

from kvxfer.errors import LocalProtocolError, RemoteProtocolError
from kvxfer.protocol.frames import FrameType, encode_frame
from kvxfer.registry.errors import ErrorCode
from kvxfer.registry.messages import (Ack, AwaitExpect, Cancel, Claim, Complete, ConnectorInfo, EventKind, Expect,
                                      Expectation, Failure, FrameDecoder, Heartbeat, Hello, Lease, Lookup, Mode,
                                      Publish, Pull, Query, Register, RequestEvent, RequestInfo, RequestState, Role,
                                      Unregister, decode_event, decode_reply, decode_request, encode_event,
                                      encode_reply, encode_request)

REQUESTS = [
    Hello("tok", "c1"), Hello(None, "c1"), Register("n", "i", b"\x00meta", 2.5), Heartbeat("n", "i"),
    Unregister("n", "i"), Lookup("n"), Publish("r", "p", (1, 2, 3), 10.0), Pull("r", "c", 0.5),
    Expect("r", "c", (4, 5), 1.0), AwaitExpect("r", "p", 3.0), Complete("r", "c", False, "why"),
    Cancel("r", "p", ""), Query("r"),
]
RESULTS = [
    Ack(), Lease(1.5), ConnectorInfo("n", b"m"), Claim("r", "p", (1,), b"m"), Expectation("r", "c", (), b""),
    RequestInfo("r", Mode.PUSH, RequestState.DELIVERED, None, "c"), Failure(ErrorCode.ALREADY_CLAIMED, "taken"),
]


def _frames(data: bytes, chunk: int = 1):
    dec = FrameDecoder()
    out = []
    for i in range(0, len(data), chunk):
        dec.feed(data[i:i + chunk])
        out.extend(dec.frames())
    return out


def test_requests_round_trip_byte_by_byte():
    data = b"".join(encode_request(i, m) for i, m in enumerate(REQUESTS))
    frames = _frames(data, chunk=1)
    assert [decode_request(f) for f in frames] == list(enumerate(REQUESTS))


def test_results_and_events_round_trip():
    data = b"".join(encode_reply(i, r) for i, r in enumerate(RESULTS))
    assert [decode_reply(f) for f in _frames(data, 7)] == list(enumerate(RESULTS))
    ev = RequestEvent("r", EventKind.EXPIRED, Role.PRODUCER, "ttl")
    assert decode_event(_frames(encode_event(ev))[0]) == ev
    assert EventKind.CONSUMED.is_final and not EventKind.DELIVERED.is_final


def test_encode_refuses_non_requests():
    with pytest.raises(LocalProtocolError):
        encode_request(1, Ack())  # type: ignore[arg-type]


def _req(header: dict) -> bytes:
    return encode_frame(FrameType.REG_REQUEST, header)


@pytest.mark.parametrize("header, match", [
    ({"op": "publish", "request_id": "r", "producer": "p", "blocks": [1], "ttl_s": 1.0}, "id"),
    ({"id": -1, "op": "query", "request_id": "r"}, "id"),
    ({"id": 1, "op": "nope"}, "unknown registry op"),
    ({"id": 1, "op": "publish", "producer": "p", "blocks": [1], "ttl_s": 1.0}, "request_id: missing"),
    ({"id": 1, "op": "publish", "request_id": 5, "producer": "p", "blocks": [1], "ttl_s": 1.0}, "string"),
    ({"id": 1, "op": "publish", "request_id": "r", "producer": "p", "blocks": [-1], "ttl_s": 1.0}, "block id"),
    ({"id": 1, "op": "publish", "request_id": "r", "producer": "p", "blocks": [True], "ttl_s": 1.0}, "block id"),
    ({"id": 1, "op": "publish", "request_id": "r", "producer": "p", "blocks": "x", "ttl_s": 1.0}, "list"),
    ({"id": 1, "op": "publish", "request_id": "r", "producer": "p", "blocks": [], "ttl_s": float("nan")}, "seconds"),
    ({"id": 1, "op": "publish", "request_id": "r", "producer": "p", "blocks": [], "ttl_s": 1e12}, "seconds"),
    ({"id": 1, "op": "publish", "request_id": "r" * 600, "producer": "p", "blocks": [], "ttl_s": 1.0}, "exceeds"),
    ({"id": 1, "op": "register", "name": "n", "instance": "i", "metadata": "str", "lease_s": 1.0}, "bytes"),
    ({"id": 1, "op": "complete", "request_id": "r", "party": "p", "ok": 1, "reason": ""}, "bool"),
])
def test_bad_request_fields(header, match):
    (frame,) = _frames(_req(header), 64)
    with pytest.raises(RemoteProtocolError, match=match):
        decode_request(frame)


def test_bad_enum_in_reply():
    frame = _frames(encode_frame(FrameType.REG_REPLY, {"id": 1, "r": "failure", "code": "zzz", "message": ""}))[0]
    with pytest.raises(RemoteProtocolError, match="ErrorCode"):
        decode_reply(frame)


def test_wrong_frame_type_and_payload():
    (frame,) = _frames(encode_reply(1, Ack()))
    with pytest.raises(RemoteProtocolError, match="REG_REQUEST"):
        decode_request(frame)
    dec = FrameDecoder()
    dec.feed(encode_frame(FrameType.REG_REQUEST, {"id": 1}, payload_len=4) + b"abcd")
    with pytest.raises(RemoteProtocolError, match="payload"):
        list(dec.frames())


@pytest.mark.parametrize("data, match", [
    (b"GARBAGE-GARBAGE-GARBAGE", "magic"),
    (struct.pack("!4sBBHIQ", b"KVXF", 99, 32, 0, 2, 0) + b"\x80\x80", "version"),
    (struct.pack("!4sBBHIQ", b"KVXF", 1, 200, 0, 2, 0), "unknown frame type"),
    (struct.pack("!4sBBHIQ", b"KVXF", 1, 32, 0, 1 << 30, 0), "exceeds"),
    (struct.pack("!4sBBHIQ", b"KVXF", 1, 32, 0, 3, 0) + b"\xc1\xc1\xc1", "msgpack"),
    (struct.pack("!4sBBHIQ", b"KVXF", 1, 32, 0, 2, 0) + msgpack.packb([1]), "map"),
])
def test_decoder_refuses_bad_bytes(data, match):
    dec = FrameDecoder()
    dec.feed(data)
    with pytest.raises(RemoteProtocolError, match=match):
        list(dec.frames())


def test_decoder_header_limit():
    dec = FrameDecoder(max_header=64)
    dec.feed(encode_request(1, Publish("r", "p", tuple(range(100)), 1.0)))
    with pytest.raises(RemoteProtocolError, match="64 B limit"):
        list(dec.frames())
