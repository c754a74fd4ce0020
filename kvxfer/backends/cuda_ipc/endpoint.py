"""What a cuda_ipc peer tells us about its memory, validated; the bounds every copy must keep.

Layer: backends, cuda_ipc package (no CUDA call). A peer's endpoint lists the IPC handles of
the allocations holding its tensors and where each tensor lies in them; every job or block pair
of a transfer is checked against the registered tensor spans before its kernel is launched, so a
peer can never name an address.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..._memo import IdentityMemo
from ...errors import BackendUnavailableError, BlockIdError, TransportError
from ...metadata import PeerMetadata
from ...plan import BlockPairs, block_id_range
from .handles import IPC_HANDLE_BYTES

__all__ = ["ENDPOINT_VERSION", "PeerEndpoint", "check_jobs_within", "check_pairs_within", "parse_endpoint"]

ENDPOINT_VERSION = 1
_MAX_ALLOCATIONS = 1 << 16


@dataclass(frozen=True, slots=True)
class PeerEndpoint:
    """A peer's cuda_ipc endpoint, validated."""

    bus: str
    device: int
    handles: tuple[bytes, ...]
    sizes: tuple[int, ...]
    tensors: tuple[tuple[int, int], ...]


def parse_endpoint(peer: PeerMetadata) -> PeerEndpoint:
    """Validate ``peer``'s cuda_ipc endpoint against its geometry.

    Raises:
        BackendUnavailableError: no endpoint, or the peer could not export its memory.
        TransportError: the endpoint is malformed.
    """
    ep = peer.backends.get("cuda_ipc")
    if not isinstance(ep, dict):
        raise BackendUnavailableError(f"peer {peer.name!r} does not run the cuda_ipc backend")
    if ep.get("v") != ENDPOINT_VERSION:
        raise TransportError(f"peer {peer.name!r} speaks cuda_ipc endpoint version {ep.get('v')!r}; expected {ENDPOINT_VERSION}")
    err = ep.get("err")
    if err is not None:
        raise BackendUnavailableError(f"peer {peer.name!r} cannot share its KV memory through CUDA IPC: {err}")
    bus, dev, handles, sizes, tensors = ep.get("bus"), ep.get("dev"), ep.get("h"), ep.get("z"), ep.get("t")
    ntensors = 0 if peer.geometry is None else len(peer.geometry.tensors)
    ok = (
        isinstance(bus, str) and len(bus) < 64 and type(dev) is int
        and isinstance(handles, list) and isinstance(sizes, list) and isinstance(tensors, list)
        and 0 < len(handles) == len(sizes) <= _MAX_ALLOCATIONS and len(tensors) == ntensors
        and all(isinstance(h, bytes) and len(h) == IPC_HANDLE_BYTES for h in handles)
        and all(type(z) is int and 0 < z < 1 << 62 for z in sizes)
        and all(isinstance(t, list) and len(t) == 2 and all(type(v) is int for v in t) for t in tensors)
    )
    if not ok:
        raise TransportError(f"peer {peer.name!r} advertises a malformed cuda_ipc endpoint")
    assert peer.geometry is not None
    for i, ((ai, off), geom) in enumerate(zip(tensors, peer.geometry.tensors)):
        if not 0 <= ai < len(handles) or off < 0 or off + geom.span > sizes[ai]:
            raise TransportError(
                f"peer {peer.name!r} places tensor {i} ({geom.span} B) at offset {off} of allocation {ai}, "
                "outside that allocation"
            )
    return PeerEndpoint(bus, dev, tuple(handles), tuple(sizes), tuple((int(a), int(o)) for a, o in tensors))


def check_jobs_within(jobs: np.ndarray, side: str, spans: np.ndarray, whose: str) -> None:
    """Every byte that ``jobs`` touch on ``side`` must lie inside the registered tensor spans.

    Raises:
        BlockIdError: a job names an unknown tensor or bytes outside its span.
    """
    if jobs.size == 0:
        return
    t = jobs[f"{side}_t"]
    if int(t.min()) < 0 or int(t.max()) >= spans.size:
        raise BlockIdError(f"the transfer names {whose} tensor {int(t.max())}; {whose} side has {spans.size}")
    off = jobs[f"{side}_off"]
    end = off + (jobs[f"{side}_count"] - 1) * jobs[f"{side}_stride"] + jobs[f"{side}_run"]
    bad = (off < 0) | (end > spans[t]) | (jobs[f"{side}_run"] < 1) | (jobs[f"{side}_count"] < 1)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise BlockIdError(
            f"the transfer would touch bytes [{int(off[j])}, {int(end[j])}) of {whose} tensor {int(t[j])}, "
            f"outside its registered {int(spans[t[j]])} B"
        )


_LIMITS: IdentityMemo[int] = IdentityMemo(1024)  # (pairs, side, spans) -> largest safe block id


def _largest_safe_block(pairs: np.ndarray, side: str, spans: np.ndarray) -> int:
    """The largest block id whose every (tensor, segment) pair stays inside the registered spans
    on ``side`` (-1 if none does, or a pair names an unknown tensor). Cached per pairs array
    (the planner caches those per layout pair), so a transfer pays one comparison. Read-only
    span arrays (a link's, the backend's) are keyed by identity, others by value."""
    if spans.flags.writeable:
        return _LIMITS.get((pairs,), (side, spans.tobytes()), lambda: _safe_block_limit(pairs, side, spans))
    return _LIMITS.get((pairs, spans), side, lambda: _safe_block_limit(pairs, side, spans))


def _safe_block_limit(pairs: np.ndarray, side: str, spans: np.ndarray) -> int:
    t = pairs["t"]
    if pairs.size == 0:
        return int(np.iinfo(np.int64).max)
    if int(t.min()) < 0 or int(t.max()) >= spans.size:
        return -1
    room = spans[t] - pairs[f"{side}_off"] - (pairs[f"{side}_count"] - 1) * pairs[f"{side}_stride"] - pairs[f"{side}_run"]
    bstride = pairs[f"{side}_bstride"]
    per = np.where(room < 0, -1, np.where(bstride > 0, room // np.maximum(bstride, 1), np.iinfo(np.int64).max))
    return int(per.min())


def check_pairs_within(bp: BlockPairs, side: str, spans: np.ndarray, whose: str) -> None:
    """The compact form of :func:`check_jobs_within`: the furthest byte any block of ``bp`` reaches
    on ``side``, per (tensor, segment) pair, must lie inside that tensor's registered span.

    Raises:
        BlockIdError: a pair names an unknown tensor or reaches outside its span.
    """
    ids = bp.src_blocks if side == "src" else bp.dst_blocks
    if ids.size == 0 or bp.pairs.size == 0:
        return
    lo, hi = block_id_range(ids)
    if lo >= 0 and hi <= _largest_safe_block(bp.pairs, side, spans):
        return
    p = bp.pairs
    t = p["t"]
    if int(t.min()) < 0 or int(t.max()) >= spans.size:
        raise BlockIdError(f"the transfer names {whose} tensor {int(t.max())}; {whose} side has {spans.size}")
    if int(ids.min()) < 0:
        raise BlockIdError(f"the transfer names {whose} block {int(ids.min())}")
    end = p[f"{side}_off"] + int(ids.max()) * p[f"{side}_bstride"] + (p[f"{side}_count"] - 1) * p[f"{side}_stride"] + p[f"{side}_run"]
    j = int(np.flatnonzero(end > spans[t])[0])
    raise BlockIdError(
        f"the transfer would reach byte {int(end[j])} of {whose} tensor {int(t[j])}, outside its registered {int(spans[t[j]])} B"
    )
