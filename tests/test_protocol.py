import msgpack
import numpy as np
import pytest

from kvxfer import RemoteProtocolError
from kvxfer.protocol.messages import Request, TransferRequest, decode, encode
from kvxfer.handle import Op
from kvxfer.metadata import PeerMetadata
from kvxfer.protocol import FRAME_PREFIX_SIZE, FrameReader, FrameType, encode_frame, parse_prefix


def request_to_wire(req):
    return encode(Request(req))


def request_from_wire(h):
    return decode(Request, h).transfer


def test_frames_round_trip_in_memory_in_any_split():
    stream = encode_frame(FrameType.NOTIFY, {"n": b"hello"}) + encode_frame(FrameType.DATA, {"x": 1, "o": 0}, 3) + b"abc"
    for cut in range(1, len(stream)):
        r = FrameReader()
        r.feed(stream[:cut])
        got = []
        while (f := r.next_frame()) is not None:
            got.append(f)
        r.feed(stream[cut:])
        while (f := r.next_frame()) is not None:
            got.append(f)
        assert [(f.type, f.header, f.payload) for f in got] == [
            (FrameType.NOTIFY, {"n": b"hello"}, b""),
            (FrameType.DATA, {"x": 1, "o": 0}, b"abc"),
        ]


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "version"),
    (lambda b: b[:5] + bytes([200]) + b[6:], "unknown frame type"),
    (lambda b: b[:8] + (1 << 30).to_bytes(4, "big") + b[12:], "header"),
    (lambda b: b[:12] + (1 << 40).to_bytes(8, "big") + b[20:], "payload"),
])
def test_bad_prefixes_refused(mutate, match):
    good = encode_frame(FrameType.DATA, {"x": 1}, 10)[:FRAME_PREFIX_SIZE]
    with pytest.raises(RemoteProtocolError, match=match):
        parse_prefix(mutate(good))


def test_header_must_be_a_map():
    r = FrameReader()
    body = msgpack.packb([1, 2])
    r.feed(encode_frame(FrameType.NOTIFY, {})[:8] + len(body).to_bytes(4, "big") + (0).to_bytes(8, "big") + body)
    with pytest.raises(RemoteProtocolError, match="map"):
        r.next_frame()


def test_transfer_request_round_trip_and_validation():
    req = TransferRequest(5, Op.READ, np.array([1, 2]), np.array([3, 4]), np.array([0]), b"n")
    back = request_from_wire(request_to_wire(req))
    assert back.xfer_id == 5 and back.op is Op.READ and back.src_blocks.tolist() == [1, 2]
    assert back.layers.tolist() == [0] and back.notify == b"n"
    for bad in ({}, {**request_to_wire(req), "op": "x"}, {**request_to_wire(req), "s": b"123"}):
        with pytest.raises(RemoteProtocolError):
            request_from_wire(bad)


@pytest.mark.parametrize("ids, width", [([1, 2, 65535], 2), ([0, 65536], 4), ([7, (1 << 32) - 1], 4),
                                        ([3, 1 << 32], 8), ([-1, 5], 8), ([], 2)])
def test_request_ids_travel_in_the_narrowest_width_that_holds_them(ids, width):
    from kvxfer.protocol.messages import StagingRef

    src = np.array(ids, dtype=np.int64)
    dst = src[::-1].copy()
    req = TransferRequest(9, Op.WRITE, src, dst, np.array([1, 0]), None)
    h = request_to_wire(req)
    assert h["iw"] == width and len(h["s"]) == width * src.size
    back = request_from_wire(msgpack.unpackb(msgpack.packb(h), raw=False))
    assert back.src_blocks.dtype == np.int64 and back.src_blocks.tolist() == ids
    assert back.dst_blocks.tolist() == ids[::-1] and back.layers.tolist() == [1, 0]
    body = encode(Request(req, StagingRef(4096, b"key", 64)))  # UCX's packed request
    assert body["iw"] == width
    p = decode(Request, msgpack.unpackb(msgpack.packb(body), raw=False))
    assert p.transfer.src_blocks.tolist() == ids and p.transfer.dst_blocks.tolist() == ids[::-1]
    assert p.staging == StagingRef(4096, b"key", 64)
    # an old peer's request (no width) is int64; a width we never send, or bytes that don't
    # divide into it, are refused
    legacy = {**h, "s": src.astype("<i8").tobytes(), "d": dst.astype("<i8").tobytes(),
              "l": np.array([1, 0], "<i8").tobytes()}
    del legacy["iw"]
    assert request_from_wire(legacy).src_blocks.tolist() == ids
    for bad in ({**h, "iw": 3}, {**h, "iw": "2"}, {**h, "iw": True}, {**h, "s": h["s"] + b"\0"} if width > 1 else {}):
        with pytest.raises(RemoteProtocolError):
            request_from_wire(bad)
    with pytest.raises(RemoteProtocolError, match="'iw'"):
        decode(Request, {**body, "iw": 16})


@pytest.mark.parametrize("blob", [b"", b"\xc1", msgpack.packb({"v": 1}), msgpack.packb([1]), msgpack.packb({"v": 7})])
def test_malformed_metadata(blob):
    with pytest.raises(RemoteProtocolError):
        PeerMetadata.from_bytes(blob)


def test_ucx_progress_messages_are_checked():
    from kvxfer.backends.ucx import messages as up
    from kvxfer.protocol.messages import Progress

    raw = up.encode_message(up.Msg.LANDED, "sess", encode(Progress(7, 4096)))
    kind, session, h = up.decode_envelope(raw)
    assert (kind, session, decode(Progress, h)) == (up.Msg.LANDED, "sess", Progress(7, 4096))
    for bad in ({"x": 7}, {"x": "7", "b": 1}, {"x": 7, "b": -1}, {"x": 7, "b": 1.5}):
        with pytest.raises(RemoteProtocolError, match="malformed progress"):
            decode(Progress, bad)


def test_ucx_piece_size_aims_at_four_pieces_within_bounds():
    from kvxfer.backends.ucx.config import MIN_PIECE, piece_bytes, ucx_config

    cfg = ucx_config()
    assert piece_bytes(cfg, 1 << 30) == 256 << 20  # 1 GiB: four pieces of 256 MiB
    assert piece_bytes(cfg, 4 << 30) == cfg.chunk_bytes  # capped
    assert piece_bytes(cfg, 8 << 20) == MIN_PIECE  # small transfers: one piece
    assert piece_bytes(ucx_config(chunk_bytes=4096), 1 << 30) == 4096


def test_ucx_first_piece_outlasts_the_host_work_and_the_last_stays_small():
    from kvxfer.backends.ucx.config import FIRST_PIECE, MIN_PIECE, piece_bytes, piece_edge, piece_first, ucx_config
    from kvxfer.plan import _piece_cuts

    cfg = ucx_config()
    n = 1 << 30
    cuts, _ = _piece_cuts(n, piece_bytes(cfg, n), piece_edge(cfg, n), piece_first(cfg, n))
    sizes = np.diff([0, *cuts]).tolist()
    assert sizes[0] == FIRST_PIECE and sizes[-1] == MIN_PIECE and sum(sizes) == n
    assert piece_first(cfg, 8 << 20) == 0  # one piece, no ramp
    assert piece_first(cfg, 256 << 20) == MIN_PIECE  # never above a quarter of the middle pieces


@pytest.mark.parametrize("memory", ["host", "cuda"])
def test_ucx_early_decision_from_a_prefix_of_the_ids_is_the_exact_ones(memory):
    # a read's request goes out before its plan when it will move packed; the run count behind
    # that decision is taken from the first ids where that settles it: same answer as exact
    from types import SimpleNamespace

    from kvxfer import KVLayout
    from kvxfer._tensors import MemoryKind
    from kvxfer.backends.ucx.backend import UcxBackend
    from kvxfer.backends.ucx.config import TransferMode, ucx_config
    from kvxfer.plan import transfer_shape

    rng = np.random.default_rng(3)
    g = KVLayout.from_tensors([np.zeros((2, 2048, 64), np.uint8) for _ in range(4)], block_dim=1).geometry
    kind = MemoryKind.CUDA if memory == "cuda" else MemoryKind.HOST
    configs = [ucx_config(), ucx_config(pack_min_ranges=1), ucx_config(pack_min_ranges=5000),
               ucx_config(pack_below=0), ucx_config(pack_below=1 << 20), ucx_config(staging_max=1 << 16),
               ucx_config(mode=TransferMode.PACKED), ucx_config(mode=TransferMode.DIRECT)]
    seen = set()
    for cfg in configs:
        be = UcxBackend.__new__(UcxBackend)  # the decision's methods only, no UCX context
        be.config, be.layout = cfg, SimpleNamespace(memory=kind)
        for n in (1, 70, 600, 2000):
            for trial in range(4):
                s = rng.choice(2048, n, replace=False) if trial % 2 else np.arange(n)
                d = rng.choice(2048, n, replace=False) if trial > 1 else np.arange(n) + (2048 - n)
                nbytes, nruns = transfer_shape(g, g, s, d)
                exact = UcxBackend._packs(be, nbytes, nruns)
                # the packing rules as documented (ucx/config.py / docs/ucx.md)
                if cfg.mode is not TransferMode.AUTO:
                    rule = cfg.mode is TransferMode.PACKED
                else:
                    rule = (nruns >= cfg.pack_min_ranges and nbytes <= cfg.staging_max
                            and (kind is MemoryKind.CUDA or nbytes < cfg.pack_below * nruns))
                assert exact == rule, (cfg, n, trial)
                early = transfer_shape(g, g, s, d, enough=lambda b: UcxBackend._runs_deciding(be, b))
                assert UcxBackend._packs(be, *early) == exact, (cfg, n, trial)
                seen.add(exact)
    assert seen == {True, False}
