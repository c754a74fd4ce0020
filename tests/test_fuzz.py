"""Property-based fuzzing of every decoder of bytes (or decoded maps) that come from a peer.

Each test feeds at least 10,000 generated inputs to one decoder: raw random bytes, valid
messages with fields deleted, retyped or replaced, and valid encodings cut short or with bytes
flipped. The only exceptions allowed out are the protocol's own: RemoteProtocolError (frames,
TCP and UCX control, metadata, registry messages), LayoutError (layout geometry) and, where a
decoded request is planned against our own layout, BlockIdError. Anything else (TypeError,
ValueError, OverflowError, ...) is a decoder bug. Valid inputs must also round-trip.

All in memory: no sockets, no threads besides hypothesis'.
"""

from __future__ import annotations

import os
import struct
import threading
from types import SimpleNamespace
from typing import Any

import msgpack
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e .[test])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvxfer.backends.base import plan_for_responder  # noqa: E402
from kvxfer.backends.tcp import TcpLink  # noqa: E402
from kvxfer.protocol.messages import Request, TransferRequest, decode, encode  # noqa: E402
from kvxfer.protocol.transfer import TransferSession  # noqa: E402
from kvxfer.errors import BlockIdError, LayoutError, RemoteProtocolError  # noqa: E402
from kvxfer.handle import Op  # noqa: E402
from kvxfer.layout import KVLayout, LayoutGeometry  # noqa: E402
from kvxfer.metadata import PeerMetadata  # noqa: E402
from kvxfer.protocol.frames import (  # noqa: E402
    FRAME_PREFIX_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    Frame,
    FrameReader,
    FrameType,
    decode_header,
    encode_frame,
    parse_prefix,
)
from kvxfer.registry import messages as regmsg  # noqa: E402
from kvxfer.registry.errors import ErrorCode  # noqa: E402

N = int(os.environ.get("KVXFER_FUZZ_EXAMPLES", "10000"))
FUZZ = settings(
    max_examples=N,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# --------------------------------------------------------------------------------------------
# inputs: hypothesis draws plain bytes; Src turns them into structure
# --------------------------------------------------------------------------------------------
# Composite hypothesis strategies cost several ms per example on a small CI box; one binary
# draw interpreted by Src costs about one, and hypothesis still shrinks the bytes.
seeds = st.binary(max_size=512)


class Src:
    """Deterministic structure from fuzz bytes (zeros once they run out)."""

    _INTS = (0, 1, -1, 2, 255, 256, 2**31, 2**32, 2**62, 2**63 - 1, 2**64 - 1, -(2**63), 1 << 20, 1 << 30)

    def __init__(self, data: bytes):
        self.data = data
        self.i = 0

    def byte(self) -> int:
        b = self.data[self.i] if self.i < len(self.data) else 0
        self.i += 1
        return b

    def int(self, lo: int, hi: int) -> int:
        """An int in [lo, hi]."""
        span = hi - lo + 1
        v = 0
        for _ in range(max(1, (span.bit_length() + 7) // 8)):
            v = (v << 8) | self.byte()
        return lo + v % span

    def bool(self) -> bool:
        return bool(self.byte() & 1)

    def choice(self, seq: Any) -> Any:
        return seq[self.int(0, len(seq) - 1)]

    def bytes(self, max_size: int) -> bytes:
        n = self.int(0, max_size)
        out = self.data[self.i:self.i + n]
        self.i += n
        return bytes(out)

    def value(self, depth: int = 2) -> Any:
        """Any msgpack value (maps with string keys)."""
        k = self.int(0, 11 if depth > 0 else 9)
        if k == 0:
            return None
        if k == 1:
            return self.bool()
        if k == 2:
            return self.int(-(2**63), 2**64 - 1)
        if k == 3:
            return self.choice(self._INTS)
        if k == 4:
            return self.int(-4, 16)
        if k == 5:
            return self.choice([0.0, -1.5, 1e300, float("inf"), float("-inf"), float("nan"), 0.25])
        if k == 6:
            return self.bytes(12).decode("latin-1")
        if k == 7:
            return self.choice(["", "r", "w", "x", "host", "cuda", "pull", "ack", "failed"])
        if k in (8, 9):
            return self.bytes(24)
        if k == 10:
            return [self.value(depth - 1) for _ in range(self.int(0, 4))]
        return {self.bytes(4).decode("latin-1"): self.value(depth - 1) for _ in range(self.int(0, 4))}

    def mutated(self, valid: dict[str, Any], extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
        """``valid`` with a few fields deleted or replaced by random values."""
        out = dict(valid)
        keys = sorted(set(out) | set(extra_keys))
        for _ in range(self.int(0, 3)):
            key = self.choice(keys)
            if self.int(0, 2) == 0:
                out.pop(key, None)
            else:
                out[key] = self.value()
        return out

    def damaged(self, data: bytes) -> bytes:
        """``data`` truncated, extended or with a few bytes overwritten."""
        b = bytearray(data)
        for _ in range(self.int(1, 3)):
            action = self.int(0, 2)
            if action == 0 and b:
                del b[self.int(0, len(b) - 1):]
            elif action == 1:
                b += self.bytes(16) or b"\xc1"
            elif b:
                b[self.int(0, len(b) - 1)] = self.byte()
        return bytes(b)

    def cuts(self, raw: bytes) -> list[bytes]:
        """``raw`` split into chunks at random points."""
        cuts = sorted(self.int(0, len(raw)) for _ in range(self.int(0, 5)))
        return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]


def _layout(num_blocks: int = 8, layers: int = 2) -> KVLayout:
    ts = [np.zeros((2, num_blocks, 4, 8), dtype=np.float16) for _ in range(layers)]
    return KVLayout.from_tensors(ts, block_dim=1)


LAYOUT = _layout()
META = PeerMetadata(name="peer", session="s-1", boot_id="boot", pid=123, geometry=LAYOUT.geometry, device=-1,
                    backends={"tcp": {"host": "127.0.0.1", "port": 1, "streams": 1}})
META_WIRE = msgpack.unpackb(META.to_bytes(), raw=False)
GEOM_WIRE = LAYOUT.geometry.to_wire()


# --------------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------------
def _prefix(src: Src) -> bytes:
    if src.bool():
        return src.bytes(2 * FRAME_PREFIX_SIZE)
    return struct.pack(
        "!4sBBHIQ",
        src.choice([MAGIC, MAGIC, b"KVXG", b"\0\0\0\0"]),
        src.choice([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, 255]),
        src.choice([src.int(0, 255), int(src.choice(list(FrameType)))]),
        src.int(0, 0xFFFF),
        src.choice([src.int(0, 2**32 - 1), 0, 1 << 20, (1 << 20) + 1]),
        src.choice([src.int(0, 2**64 - 1), 0, 1 << 30, (1 << 30) + 1]),
    )


@FUZZ
@given(seeds)
def test_parse_prefix(data: bytes) -> None:
    src = Src(data)
    raw, max_payload = _prefix(src), src.choice([0, 1 << 20, 1 << 30])
    try:
        p = parse_prefix(raw, max_payload)
    except RemoteProtocolError:
        return
    assert len(raw) == FRAME_PREFIX_SIZE and raw[:4] == MAGIC
    assert p.payload_len <= max_payload and isinstance(p.type, FrameType)


@FUZZ
@given(seeds)
def test_decode_header(data: bytes) -> None:
    src = Src(data)
    kind = src.int(0, 2)
    if kind == 0:
        raw = src.bytes(64)
    else:
        raw = msgpack.packb(src.value(), use_bin_type=True)
        raw = raw if kind == 1 else src.damaged(raw)
    for decode in (decode_header, regmsg.decode_header):
        try:
            h = decode(raw)
        except RemoteProtocolError:
            continue
        assert isinstance(h, dict) and all(isinstance(k, str) for k in h)


def _same_value(a: Any, b: Any) -> bool:
    # msgpack turns tuples into lists and NaN != NaN: compare encodings
    return msgpack.packb(a, use_bin_type=True) == msgpack.packb(b, use_bin_type=True)


@FUZZ
@given(seeds)
def test_frame_reader(data: bytes) -> None:
    src = Src(data)
    frames, raw = [], b""
    for _ in range(src.int(0, 4)):
        ftype = src.choice(list(FrameType))
        header = {src.bytes(4).decode("latin-1"): src.value(1) for _ in range(src.int(0, 3))}
        payload = src.bytes(48)
        raw += encode_frame(ftype, header, len(payload)) + payload
        frames.append(Frame(ftype, header, payload))
    intact = src.bool()
    if not intact:
        raw = src.damaged(raw) if raw else src.bytes(64)
    reader = FrameReader(max_payload=1 << 16)
    got: list[Frame] = []
    try:
        for chunk in src.cuts(raw):
            reader.feed(chunk)
            for _ in range(len(frames) + 64):  # bounded: at most one frame per call
                f = reader.next_frame()
                if f is None:
                    break
                got.append(f)
    except RemoteProtocolError:
        assert not intact, "an intact stream of valid frames was refused"
        return
    if intact:
        assert len(got) == len(frames)
        for g, f in zip(got, frames):
            assert g.type is f.type and g.payload == f.payload and _same_value(g.header, f.header)


# --------------------------------------------------------------------------------------------
# TCP data path: transfer requests and control messages
# --------------------------------------------------------------------------------------------
def _ids(src: Src, n: int) -> np.ndarray:
    return np.asarray([src.choice([src.int(-2, 10), src.int(0, 7), 2**62, -(2**63), 2**63 - 1]) for _ in range(n)],
                      dtype=np.int64)


def _valid_request(src: Src) -> dict[str, Any]:
    n = src.int(0, 6)
    req = TransferRequest(
        xfer_id=src.int(0, 2**40),
        op=src.choice([Op.READ, Op.WRITE]),
        src_blocks=_ids(src, n),
        dst_blocks=_ids(src, n),
        layers=None if src.bool() else np.asarray([src.int(-1, 2) for _ in range(src.int(0, 3))], dtype=np.int64),
        notify=None if src.bool() else src.bytes(8),
    )
    return encode(Request(req))


def _request_header(src: Src) -> dict[str, Any]:
    valid = _valid_request(src)
    return valid if src.bool() else src.mutated(valid)


@FUZZ
@given(seeds)
def test_tcp_request_and_responder_plan(data: bytes) -> None:
    """What the TCP responder does with an XFER_REQUEST: parse, then plan against our layout."""
    src = Src(data)
    h = _request_header(src)
    if src.int(0, 3) == 0:  # through the bytes as well
        try:
            h = decode_header(src.damaged(msgpack.packb(h, use_bin_type=True)))
        except RemoteProtocolError:
            return
    try:
        req = decode(Request, h).transfer
    except RemoteProtocolError:
        return
    try:
        plan = plan_for_responder(LAYOUT, META, req)
    except (BlockIdError, LayoutError):
        return
    mine = req.dst_blocks if req.op is Op.WRITE else req.src_blocks
    assert mine.size == 0 or (mine.min() >= 0 and mine.max() < LAYOUT.num_blocks)
    assert plan.nbytes <= mine.size * LAYOUT.block_nbytes
    if req.op is Op.WRITE:  # our blocks are written: each once (the peer's own ids are its business)
        assert np.unique(req.dst_blocks).size == req.dst_blocks.size


def _stub_tcp_link() -> Any:
    return SimpleNamespace(_session=TransferSession("peer"))


@FUZZ
@given(seeds)
def test_tcp_control_messages(data: bytes) -> None:
    """XFER_DONE / XFER_ERROR headers on a link with nothing in flight."""
    src = Src(data)
    h = src.mutated({"x": 1, "m": True, "k": "BlockIdError"})
    fn = src.choice([TcpLink._on_done, TcpLink._on_error])
    try:
        fn(_stub_tcp_link(), h)
    except RemoteProtocolError:
        pass


# --------------------------------------------------------------------------------------------
# connector metadata and layout geometry
# --------------------------------------------------------------------------------------------
def _geometry_wire(src: Src) -> Any:
    g = {**GEOM_WIRE, "t": [list(t) for t in GEOM_WIRE["t"]]}
    choice = src.int(0, 3)
    if choice == 0:
        return src.mutated(g)
    if choice == 1:  # damage one tensor entry
        i = src.int(0, len(g["t"]) - 1)
        entry = list(g["t"][i])
        j = src.int(0, 5)
        if src.bool():
            entry[j] = src.value()
        else:
            entry[j] = [[src.choice([src.int(-1, 64), 2**62, 2**63 - 1]) for _ in range(src.int(0, 5))]
                        for _ in range(src.int(0, 3))]
        if src.int(0, 3) == 0:
            entry = entry[:src.int(0, 6)]
        g["t"][i] = entry
        return g
    if choice == 2:
        return src.value()
    return g


@FUZZ
@given(seeds)
def test_layout_geometry_from_wire(data: bytes) -> None:
    obj = _geometry_wire(Src(data))
    try:
        geom = LayoutGeometry.from_wire(obj)
    except LayoutError:
        return
    # what a peer's geometry is used for afterwards must not blow up either
    assert isinstance(geom.fingerprint, str)
    assert geom.block_nbytes >= 0 and all(t.span >= 0 for t in geom.tensors)
    try:
        LAYOUT.geometry.check_compatible(geom)
    except LayoutError:
        pass


def _metadata_blob(src: Src) -> bytes:
    choice = src.int(0, 3)
    if choice == 0:
        return src.bytes(128)
    if choice == 1:
        return src.damaged(META.to_bytes())
    obj = src.mutated(META_WIRE)
    if choice == 3:
        obj["geom"] = _geometry_wire(src)
        if src.bool():  # a matching fingerprint gets past the cheap checks
            try:
                obj["fp"] = LayoutGeometry.from_wire(obj["geom"]).fingerprint
            except LayoutError:
                pass
    return msgpack.packb(obj, use_bin_type=True)


@FUZZ
@given(seeds)
def test_peer_metadata_from_bytes(data: bytes) -> None:
    blob = _metadata_blob(Src(data))
    try:
        meta = PeerMetadata.from_bytes(blob)
    except RemoteProtocolError:
        return
    assert PeerMetadata.from_bytes(meta.to_bytes()) == meta


def test_peer_metadata_round_trip() -> None:
    assert PeerMetadata.from_bytes(META.to_bytes()) == META


# --------------------------------------------------------------------------------------------
# registry messages
# --------------------------------------------------------------------------------------------
_REQUESTS = [
    regmsg.Hello("tok", "c"), regmsg.Register("a", "i", b"m", 1.0), regmsg.Heartbeat("a", "i"),
    regmsg.Unregister("a", "i"), regmsg.Lookup("a"), regmsg.Publish("r", "a", (1, 2), 5.0),
    regmsg.Pull("r", "b", 1.0), regmsg.Expect("r", "b", (3,), 2.0), regmsg.AwaitExpect("r", "a", 1.0),
    regmsg.Complete("r", "a", True, ""), regmsg.Cancel("r", "a", "why"), regmsg.Query("r"),
]
_RESULTS = [
    regmsg.Ack(), regmsg.Lease(1.0), regmsg.ConnectorInfo("a", b"m"), regmsg.Claim("r", "a", (1,), b"m"),
    regmsg.Expectation("r", "b", (2, 3), b"m"),
    regmsg.RequestInfo("r", regmsg.Mode.PULL, regmsg.RequestState.CLAIMED, "a", None),
    regmsg.Failure(ErrorCode.TIMEOUT, "late"),
]
_EVENT = regmsg.RequestEvent("r", regmsg.EventKind.FAILED, regmsg.Role.CONSUMER, "lost")


def _header_of(frame_bytes: bytes) -> dict[str, Any]:
    return decode_header(frame_bytes[FRAME_PREFIX_SIZE:])


_HEADERS = {
    FrameType.REG_REQUEST: [_header_of(regmsg.encode_request(7, m)) for m in _REQUESTS],
    FrameType.REG_REPLY: [_header_of(regmsg.encode_reply(7, r)) for r in _RESULTS],
    FrameType.REG_EVENT: [_header_of(regmsg.encode_event(_EVENT))],
}


@FUZZ
@given(seeds)
def test_registry_message_decoders(data: bytes) -> None:
    src = Src(data)
    ftype = src.choice(list(_HEADERS))
    h = src.choice(_HEADERS[ftype])
    h = src.mutated(h) if src.int(0, 4) else h
    if src.int(0, 9) == 0:
        ftype = src.choice(list(FrameType))
    frame = Frame(ftype, h, b"" if src.int(0, 9) else src.bytes(8))
    for decode in (regmsg.decode_request, regmsg.decode_reply, regmsg.decode_event):
        try:
            out = decode(frame)
        except RemoteProtocolError:
            continue
        msg = out[1] if isinstance(out, tuple) else out
        assert regmsg.from_wire(type(msg), regmsg.to_wire(msg)) == msg  # decodes back to itself


def test_registry_messages_round_trip() -> None:
    for m in _REQUESTS:
        assert regmsg.decode_request(Frame(FrameType.REG_REQUEST, _header_of(regmsg.encode_request(3, m)))) == (3, m)
    for r in _RESULTS:
        assert regmsg.decode_reply(Frame(FrameType.REG_REPLY, _header_of(regmsg.encode_reply(3, r)))) == (3, r)
    assert regmsg.decode_event(Frame(FrameType.REG_EVENT, _HEADERS[FrameType.REG_EVENT][0])) == _EVENT


@FUZZ
@given(seeds)
def test_registry_frame_decoder(data: bytes) -> None:
    """The server's byte path: FrameDecoder, then decode_request on every frame."""
    src = Src(data)
    count = src.int(0, 4)
    raw = b"".join(regmsg.encode_request(i, src.choice(_REQUESTS)) for i in range(count))
    intact = src.bool()
    if not intact:
        raw = src.damaged(raw) if raw else src.bytes(64)
    max_header = src.choice([16, 1 << 20])
    dec = regmsg.FrameDecoder(max_header)
    got = 0
    try:
        for chunk in src.cuts(raw):
            dec.feed(chunk)
            for frame in dec.frames():
                regmsg.decode_request(frame)
                got += 1
    except RemoteProtocolError:
        assert not intact or max_header == 16
        return
    if intact:
        assert got == count


# --------------------------------------------------------------------------------------------
# UCX control messages (skipped without ucxx)
# --------------------------------------------------------------------------------------------
def _ucx() -> Any:
    try:
        from kvxfer.backends.ucx import backend as ucx
    except ImportError as exc:
        pytest.skip(f"ucxx not importable: {exc}")
    return ucx


class _ReachedStaging(Exception):
    """The REQ passed every check and the responder went on to stage it (the decoder is done)."""


def _refuse_staging() -> Any:
    raise _ReachedStaging()


def _stub_ucx_link(peer: PeerMetadata = META) -> Any:
    ctx = SimpleNamespace(
        memory=SimpleNamespace(layout=LAYOUT, staging=_refuse_staging),
        local=SimpleNamespace(deliver_notification=lambda *a: None),
        worker=SimpleNamespace(ucp=SimpleNamespace(rkey_unpack=lambda ep, packed: 1)),
    )
    link = SimpleNamespace(
        ctx=ctx, peer=peer, ep_handle=0, _session=TransferSession("peer"), _rkeys=None,
        ready=threading.Event(), refusal=None,
        send=lambda kind, body: None, close=lambda exc=None: None,
        _on_done=lambda xid: None, _on_err=lambda xid, k, m: None, _on_landed=lambda xid, upto: None,
        _on_ready=lambda xid, upto: None,
    )
    link.on_request = lambda h, arrived=0.0: _ucx().UcxLink.on_request(link, h, arrived)
    link.on_cancel = lambda h: _ucx().UcxLink.on_cancel(link, h)
    return link


@FUZZ
@given(seeds)
def test_ucx_control_messages(data: bytes) -> None:
    ucx = _ucx()
    src = Src(data)
    valid = {**_valid_request(src), "a": 4096, "k": b"rkey", "b": 0, "ok": True, "m": "msg"}
    kind = ucx.Msg(src.int(1, len(ucx.Msg)))
    h = src.mutated(valid) if src.int(0, 3) else valid
    try:
        ucx.UcxLink.on_message(_stub_ucx_link(), kind, h)
    except (RemoteProtocolError, _ReachedStaging):
        pass


@FUZZ
@given(seeds)
def test_ucx_active_message_envelope(data: bytes) -> None:
    """The progress-thread entry point must swallow anything malformed (and log it)."""
    ucx = _ucx()
    src = Src(data)
    if src.bool():
        raw = src.bytes(64)
    else:
        raw = msgpack.packb(src.mutated({"v": 2, "t": 3, "s": "sess", "m": {"x": 1}}), use_bin_type=True)
        raw = raw if src.bool() else src.damaged(raw)
    backend = SimpleNamespace(_lock=threading.Lock(), _links={}, worker=SimpleNamespace(defer=lambda fn, *a: None),
                              _on_hello=None)
    ucx.UcxBackend._on_am(backend, raw, 0)


@FUZZ
@given(seeds)
def test_ucx_peer_regions(data: bytes) -> None:
    """The regions a peer advertises in its metadata, read when a direct RMA starts."""
    ucx = _ucx()
    src = Src(data)
    span = LAYOUT.geometry.tensors[0].span
    regions: Any = [[4096 * (i + 1), span, b"rk"] for i in range(len(LAYOUT.geometry.tensors))]
    choice = src.int(0, 3)
    if choice == 1:
        regions = src.value()
    elif choice >= 2:
        regions[src.int(0, len(regions) - 1)] = src.value() if choice == 2 else [src.value(0) for _ in range(3)]
    peer = PeerMetadata(name="peer", session="s", boot_id="b", pid=1, geometry=LAYOUT.geometry, device=-1,
                        backends={"ucx": {"addr": b"a", "session": "s", "regions": regions}})
    try:
        keys = ucx.UcxLink.remote_keys(_stub_ucx_link(peer))
    except RemoteProtocolError:
        return
    assert len(keys) == len(LAYOUT.geometry.tensors)
