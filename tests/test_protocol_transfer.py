"""The shared transfer protocol, in memory: every message round-trips through msgpack, every
malformed field is refused, and TransferSession applies the rules without a socket."""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest

from kvxfer.errors import BlockIdError, PeerLostError, RemoteProtocolError, RemoteTransferError, TransferTimeoutError
from kvxfer.handle import Op
from kvxfer.protocol.messages import (
    MAX_IDS, Done, Goodbye, HelloAck, Notify, Progress, Refusal, Request, StagingRef, TransferRequest, decode, encode,
)
from kvxfer.protocol.transfer import TransferSession
from kvxfer.reshard import BlockFormat, HeadOrder, HeadReshard


def _wire(msg):
    """The message as it arrives from a peer: encoded, packed, unpacked."""
    return msgpack.unpackb(msgpack.packb(encode(msg), use_bin_type=True), raw=False)


def _req(xid=3, op=Op.READ, notify=b"n", reshard=None):
    return TransferRequest(xid, op, np.array([1, 2, 70000]), np.array([4, 5, 6]), None, notify, reshard)


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------
def test_request_round_trips_with_and_without_staging():
    rs = HeadReshard(BlockFormat(HeadOrder.NHD, 16, 4, 64, 2), BlockFormat(HeadOrder.HND, 16, 2, 64, 2), (0, 2), 0)
    for staging in (None, StagingRef(0x1000, b"rkey", 96)):
        back = decode(Request, _wire(Request(_req(reshard=rs), staging)))
        t = back.transfer
        assert (t.xfer_id, t.op, t.notify, t.layers) == (3, Op.READ, b"n", None)
        assert t.src_blocks.tolist() == [1, 2, 70000] and t.dst_blocks.tolist() == [4, 5, 6]
        assert t.reshard == rs
        assert back.staging == staging and back.xfer_id == 3
    h = encode(Request(_req()))
    assert h["iw"] == 4 and set(h) == {"x", "op", "iw", "s", "d", "l", "n", "rs"}


@pytest.mark.parametrize("field,value,match", [
    ("x", "3", "'x'"), ("x", None, "'x'"), ("op", "x", "'op'"), ("n", "text", "'n'"),
    ("s", b"\0\0\0", "'s'"), ("d", [1, 2], "'d'"), ("l", 5, "'l'"), ("iw", 3, "'iw'"),
    ("rs", {"bad": 1}, None), ("a", "0x10", "staged"), ("k", 7, "staged"), ("b", -1, "staged"),
])
def test_malformed_request_fields_are_refused(field, value, match):
    h = _wire(Request(_req(), StagingRef(0x1000, b"k", 12)))
    h[field] = value
    with pytest.raises(RemoteProtocolError, match=match):
        decode(Request, h)


def test_request_ids_are_bounded():
    h = _wire(Request(_req()))
    h["iw"], h["s"] = 2, b"\0\0" * (MAX_IDS + 1)
    with pytest.raises(RemoteProtocolError, match="at most"):
        decode(Request, h)


@pytest.mark.parametrize("msg", [Done(7), Done(7, yours=False), Refusal(7, "BlockIdError", "no"), Notify(b"hi"),
                                 Progress(7, 4096), HelloAck(), HelloAck("no layout"), Goodbye()])
def test_replies_round_trip(msg):
    assert decode(type(msg), _wire(msg)) == msg


@pytest.mark.parametrize("cls,h", [
    (Done, {}), (Done, {"x": 1}), (Done, {"x": 1, "m": 1}), (Done, {"x": "1", "m": True}),
    (Refusal, {"x": 1, "k": "E"}), (Refusal, {"x": 1, "k": 2, "m": "m"}), (Refusal, {"x": b"1", "k": "E", "m": "m"}),
    (Notify, {}), (Notify, {"n": "text"}),
    (Progress, {"x": 1}), (Progress, {"x": 1, "b": -1}), (Progress, {"x": 1.0, "b": 3}),
    (Request, [1, 2]), (Done, None),
])
def test_malformed_replies_are_refused(cls, h):
    with pytest.raises(RemoteProtocolError):
        decode(cls, h)


def test_refusal_names_a_local_error_class_or_a_generic_one():
    assert isinstance(Refusal.of(1, BlockIdError("block 9")).error(), BlockIdError)
    assert "block 9" in str(Refusal.of(1, BlockIdError("block 9")).error())
    for kind in ("NoSuchError", "Exception", "os"):  # never a class outside kvxfer's errors
        assert type(Refusal(1, kind, "m").error()) is RemoteTransferError


def test_hello_ack_refusal_is_a_string():
    assert decode(HelloAck, {"ok": False}).refusal == "None"
    assert decode(HelloAck, {"ok": 1, "m": "nope"}).refusal == "nope"
    assert decode(HelloAck, {"ok": True}).refusal is None


# --------------------------------------------------------------------------------------------
# the session's rules
# --------------------------------------------------------------------------------------------
def test_done_finishes_the_named_table_once():
    s: TransferSession[str] = TransferSession("peer")
    s.start(1, "my read")
    s.serve(1, "their write")  # the same id in each table is two transfers
    assert s.on_done(Done(1, yours=False)) == "their write"
    assert s.on_done(Done(1, yours=False)) is None  # a late or repeated answer is ignored
    assert s.initiated(1) == "my read"
    assert s.on_done(Done(1)) == "my read"
    assert s.initiated(1) is None and s.on_done(Done(1)) is None


def test_refusal_fails_only_a_transfer_of_ours():
    s: TransferSession[str] = TransferSession("peer")
    s.serve(4, "theirs")
    assert s.on_refusal(Refusal(4, "BlockIdError", "x")) is None
    assert s.served(4) == "theirs"
    s.start(4, "mine")
    rec, err = s.on_refusal(Refusal(4, "BlockIdError", "block 99 out of range"))
    assert rec == "mine" and isinstance(err, BlockIdError) and "block 99" in str(err)
    assert s.initiated(4) is None


def test_a_reused_id_in_flight_is_a_protocol_error():
    s: TransferSession[str] = TransferSession("peer")
    s.serve(2, "a")
    with pytest.raises(RemoteProtocolError, match="reused"):
        s.serve(2, "b")
    assert s.served(2) == "a"
    assert s.finish_served(2) == "a"
    s.serve(2, "c")  # free again once finished
    assert s.served(2) == "c"


def test_data_before_its_request_waits_then_finds_it_or_its_refusal():
    s: TransferSession[str] = TransferSession("peer")
    threading.Timer(0.05, s.serve, (8, "late")).start()
    assert s.await_served(8, timeout=5) == "late"
    threading.Timer(0.05, s.refuse, (9, BlockIdError("no"))).start()
    assert s.await_served(9, timeout=5) is None
    t0 = time.monotonic()
    with pytest.raises(RemoteProtocolError, match="unknown transfer 10"):
        s.await_served(10, timeout=0.05)
    assert time.monotonic() - t0 < 2


def test_refuse_gives_the_message_to_answer():
    s: TransferSession[str] = TransferSession("peer")
    r = s.refuse(5, BlockIdError("block 7 out of range"))
    assert r == Refusal(5, "BlockIdError", "block 7 out of range")
    assert decode(Refusal, _wire(r)) == r


def test_the_initiator_closes_on_its_own_timeout_only():
    s: TransferSession[str] = TransferSession("peer")
    err = s.on_handle_failed(TransferTimeoutError("late"), finished=False)
    assert isinstance(err, PeerLostError) and "timed out" in str(err)
    assert s.on_handle_failed(TransferTimeoutError("late"), finished=True) is None
    assert s.on_handle_failed(BlockIdError("refused"), finished=False) is None
    assert s.on_handle_failed(None, finished=False) is None


def test_an_abandoned_transfer_is_overdue_after_its_deadline_unless_finished():
    s: TransferSession[str] = TransferSession("peer")
    s.start(1, "a")
    s.start(2, "b")
    s.abandon(1, deadline=100.0)
    s.abandon(3, deadline=0.0)  # unknown: nothing to watch
    assert s.overdue(50.0) is None
    assert s.overdue(150.0) == "a"
    assert "transfer 1" in str(s.overdue_error(1))
    s.finish_initiated(1)
    assert s.overdue(150.0) is None


def test_close_hands_back_everything_once_and_refuses_new_transfers():
    s: TransferSession[str] = TransferSession("peer")
    s.start(1, "m1")
    s.start(2, "m2")
    s.serve(1, "t1")
    waiter: list = []
    th = threading.Thread(target=lambda: waiter.append(s.await_served(77, timeout=10)))
    th.start()
    time.sleep(0.05)
    mine, theirs = s.close()
    th.join(5)
    assert sorted(mine) == ["m1", "m2"] and theirs == ["t1"]
    assert waiter == [None]  # a closed session wakes data waiting for its request
    assert s.close() is None and s.closed
    with pytest.raises(PeerLostError):
        s.start(3, "m3")
    assert s.on_done(Done(1)) is None
