"""KVLayout: which bytes make up block *i* of a paged KV cache.

Layer: data model, below planning. An engine registers its KV tensors once; block *i* of each
tensor is that tensor's slice at index *i* of ``block_dim``. The slice is decomposed into byte
*segments*, each a two-level strided description (``count`` runs of ``run`` bytes, ``stride``
apart) measured from the block's first byte. Peers exchange the :class:`LayoutGeometry` (no
addresses) and compare fingerprints before any byte moves.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from ._tensors import MemoryKind, TensorInfo, tensor_info
from .errors import LayoutError, LayoutMismatchError

__all__ = ["Segment", "TensorGeometry", "LayoutGeometry", "KVLayout"]

_GEOMETRY_VERSION = 1
_MAX_SEGMENTS = 4096
_MAX_TENSORS = 65536


@dataclass(frozen=True, slots=True)
class Segment:
    """``count`` runs of ``run`` bytes, ``stride`` bytes apart, starting ``offset`` bytes into a block."""

    offset: int
    run: int
    count: int
    stride: int

    @property
    def nbytes(self) -> int:
        return self.run * self.count

    @property
    def extent(self) -> int:
        """One past the last byte this segment touches, from the block's first byte."""
        return self.offset + (self.count - 1) * self.stride + self.run


@dataclass(frozen=True, slots=True)
class TensorGeometry:
    """Geometry of one registered tensor: block shape, block stride and segments (no address)."""

    dtype: str
    itemsize: int
    block_shape: tuple[int, ...]
    num_blocks: int
    block_stride: int
    segments: tuple[Segment, ...]

    @property
    def block_nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    @property
    def span(self) -> int:
        """Bytes from the tensor's first byte to one past its last block's last byte."""
        return (self.num_blocks - 1) * self.block_stride + max(s.extent for s in self.segments)

    def compat_key(self) -> tuple:
        """What must match on both peers for blocks to be byte-for-byte exchangeable."""
        return (self.dtype, self.block_shape, tuple((s.run, s.count) for s in self.segments))


@dataclass(frozen=True, slots=True)
class LayoutGeometry:
    """Address-free description of a KV layout; what a peer learns about ours."""

    tensors: tuple[TensorGeometry, ...]
    memory: MemoryKind
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # planning caches per pair of geometries; hashing 100s of nested tuples each call is slow
        object.__setattr__(self, "_hash", hash((self.tensors, self.memory)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def num_blocks(self) -> int:
        return self.tensors[0].num_blocks

    @property
    def block_nbytes(self) -> int:
        return sum(t.block_nbytes for t in self.tensors)

    @property
    def fingerprint(self) -> str:
        payload = msgpack.packb(
            [_GEOMETRY_VERSION, [list(map(_listify, t.compat_key())) for t in self.tensors]]
        )
        return hashlib.sha256(payload).hexdigest()[:16]

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": _GEOMETRY_VERSION,
            "mem": self.memory.value,
            "t": [
                [
                    t.dtype,
                    t.itemsize,
                    list(t.block_shape),
                    t.num_blocks,
                    t.block_stride,
                    [[s.offset, s.run, s.count, s.stride] for s in t.segments],
                ]
                for t in self.tensors
            ],
        }

    @classmethod
    def from_wire(cls, obj: Any) -> LayoutGeometry:
        """Parse and validate a peer's geometry; anything malformed raises LayoutError."""
        try:
            if not isinstance(obj, dict) or obj.get("v") != _GEOMETRY_VERSION:
                raise LayoutError(f"layout geometry version {obj.get('v') if isinstance(obj, dict) else None!r}, expected {_GEOMETRY_VERSION}")
            memory = MemoryKind(obj["mem"])
            raw = obj["t"]
            if not isinstance(raw, list) or not 0 < len(raw) <= _MAX_TENSORS:
                raise LayoutError("layout geometry must list between 1 and 65536 tensors")
            tensors = []
            for entry in raw:
                dtype, itemsize, shape, nb, bstride, segs = entry
                if not isinstance(dtype, str) or not isinstance(segs, list) or not 0 < len(segs) <= _MAX_SEGMENTS:
                    raise LayoutError("malformed tensor entry in layout geometry")
                ints = [itemsize, nb, bstride, *shape] + [v for s in segs for v in s]
                if not all(type(v) is int and 0 <= v < 1 << 62 for v in ints) or any(len(s) != 4 for s in segs):
                    raise LayoutError("layout geometry holds a non-integer or out-of-range field")
                if nb < 1 or itemsize < 1 or any(s[1] < 1 or s[2] < 1 for s in segs):
                    raise LayoutError("layout geometry has empty blocks or segments")
                tensors.append(
                    TensorGeometry(
                        dtype=dtype,
                        itemsize=itemsize,
                        block_shape=tuple(shape),
                        num_blocks=nb,
                        block_stride=bstride,
                        segments=tuple(Segment(*s) for s in segs),
                    )
                )
            nbs = {t.num_blocks for t in tensors}
            if len(nbs) != 1:
                raise LayoutError(f"layout geometry tensors disagree on num_blocks: {sorted(nbs)}")
            return cls(tensors=tuple(tensors), memory=memory)
        except LayoutError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutError(f"malformed layout geometry: {exc}") from None

    def check_compatible(self, other: LayoutGeometry, layers: np.ndarray | None = None) -> None:
        """Raise LayoutMismatchError unless blocks of ``self`` and ``other`` are interchangeable."""
        if len(self.tensors) != len(other.tensors):
            raise LayoutMismatchError(
                f"layouts have {len(self.tensors)} and {len(other.tensors)} tensors; they must match"
            )
        idx = range(len(self.tensors)) if layers is None else layers.tolist()
        for i in idx:
            a, b = self.tensors[i].compat_key(), other.tensors[i].compat_key()
            if a != b:
                raise LayoutMismatchError(
                    f"tensor {i}: local block is {_describe(a)} but the peer's is {_describe(b)}"
                )


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, tuple) else v


def _describe(key: tuple) -> str:
    dtype, shape, segs = key
    return f"{dtype}{list(shape)} in segments {[f'{c}x{r}B' for r, c in segs]}"


def _segments_of_block(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> tuple[Segment, ...]:
    """Decompose one block's slice (shape, byte strides) into two-level strided segments."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if any(s < 0 for _, s in dims):
        raise LayoutError("tensors with negative strides are not supported")
    if any(s == 0 for _, s in dims):
        raise LayoutError("tensors with zero strides (broadcast views) cannot hold distinct blocks")
    run = itemsize
    while dims and dims[-1][1] == run:
        run *= dims.pop()[0]
    # merge remaining outer dims that are contiguous with each other
    merged: list[tuple[int, int]] = []
    for n, s in dims:
        if merged and merged[-1][1] == n * s:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    if not merged:
        return (Segment(0, run, 1, 0),)
    count, stride = merged[-1]
    outer = merged[:-1]
    nseg = int(np.prod([n for n, _ in outer])) if outer else 1
    if nseg > _MAX_SEGMENTS:
        raise LayoutError(f"block slice is too fragmented ({nseg} segments, at most {_MAX_SEGMENTS})")
    segs = []
    for idx in itertools.product(*[range(n) for n, _ in outer]):
        off = sum(i * s for i, (_, s) in zip(idx, outer))
        segs.append(Segment(off, run, count, stride))
    return tuple(segs)


class KVLayout:
    """A registered paged KV cache: geometry plus the local addresses of its tensors.

    Build with :meth:`from_tensors`. ``layers`` arguments elsewhere in kvxfer index the tensors
    in the order given here (or name them, when a mapping was given).
    """

    __slots__ = ("geometry", "addrs", "names", "device", "_owners", "_index", "__weakref__")

    def __init__(self, geometry: LayoutGeometry, addrs: Sequence[int], names: Sequence[str],
                 device: int, owners: Sequence[Any], index: Mapping[Any, int]):
        self.geometry = geometry
        self.addrs = np.asarray(addrs, dtype=np.uint64)
        self.names = tuple(names)
        self.device = device
        self._owners = tuple(owners)
        self._index = dict(index)

    @classmethod
    def from_tensors(cls, tensors: Sequence[Any] | Mapping[str, Any], block_dim: int | Sequence[int] = 0) -> KVLayout:
        """Describe ``tensors`` (torch, cupy or numpy; any strides) as a paged KV layout.

        ``block_dim`` is the dimension that indexes blocks: one int for all tensors or one per
        tensor. Views that alias the same memory with the same geometry are registered once.

        Raises:
            LayoutError: no tensors, tensors on different devices or memory kinds, disagreeing
                block counts, negative/zero strides, or an unsupported array type.
        """
        if isinstance(tensors, Mapping):
            names, objs = list(map(str, tensors.keys())), list(tensors.values())
        else:
            objs = list(tensors)
            names = [str(i) for i in range(len(objs))]
        if not objs:
            raise LayoutError("no tensors given; expected at least one KV tensor")
        dims = [block_dim] * len(objs) if isinstance(block_dim, int) else list(block_dim)
        if len(dims) != len(objs):
            raise LayoutError(f"block_dim lists {len(dims)} dims for {len(objs)} tensors")
        infos: list[TensorInfo] = [tensor_info(t) for t in objs]
        kinds = {(i.kind, i.device) for i in infos}
        if len(kinds) != 1:
            raise LayoutError(f"all KV tensors must be on one device; got {sorted((k.value, d) for k, d in kinds)}")
        kind, device = kinds.pop()
        geoms: list[TensorGeometry] = []
        addrs: list[int] = []
        unique_names: list[str] = []
        owners: list[Any] = []
        index: dict[Any, int] = {}
        seen: dict[tuple, int] = {}
        for pos, (name, obj, info, bd) in enumerate(zip(names, objs, infos, dims)):
            nd = len(info.shape)
            if not -nd <= bd < nd:
                raise LayoutError(f"tensor {name!r} has {nd} dims; block_dim {bd} is out of range")
            bd %= nd
            key = (info.addr, info.shape, info.strides, info.dtype, bd)
            if key in seen:
                index[pos] = index[name] = seen[key]
                continue
            nb = info.shape[bd]
            if nb < 1:
                raise LayoutError(f"tensor {name!r} has no blocks (shape {list(info.shape)}, block_dim {bd})")
            bstride = info.strides[bd]
            if bstride <= 0 and nb > 1:
                raise LayoutError(f"tensor {name!r} has block stride {bstride}; expected a positive stride")
            shape = info.shape[:bd] + info.shape[bd + 1 :]
            strides = info.strides[:bd] + info.strides[bd + 1 :]
            segs = _segments_of_block(shape, strides, info.itemsize)
            geoms.append(TensorGeometry(info.dtype, info.itemsize, tuple(shape), nb, bstride, segs))
            seen[key] = index[pos] = index[name] = len(geoms) - 1
            addrs.append(info.addr)
            unique_names.append(name)
            owners.append(obj)
        nbs = {g.num_blocks for g in geoms}
        if len(nbs) != 1:
            raise LayoutError(f"KV tensors disagree on the number of blocks: {sorted(nbs)}; they must be equal")
        geometry = LayoutGeometry(tuple(geoms), kind)
        return cls(geometry, addrs, unique_names, device, owners, index)

    # -- properties ------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.geometry.num_blocks

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block over all registered tensors."""
        return self.geometry.block_nbytes

    @property
    def num_tensors(self) -> int:
        return len(self.geometry.tensors)

    @property
    def memory(self) -> MemoryKind:
        return self.geometry.memory

    @property
    def fingerprint(self) -> str:
        return self.geometry.fingerprint

    @property
    def owners(self) -> tuple[Any, ...]:
        """The registered tensor objects (kept alive while the layout lives)."""
        return self._owners

    def resolve_layers(self, layers: Sequence[int | str] | None) -> np.ndarray | None:
        """Map a ``layers`` argument (positions or names as registered) to unique tensor indices.

        Raises:
            LayoutError: a layer is unknown or named twice.
        """
        if layers is None:
            return None
        out = []
        for layer in layers:
            key = layer if isinstance(layer, str) else int(layer)
            if key not in self._index:
                raise LayoutError(f"unknown layer {layer!r}; registered layers are {list(self.names)} (or positions 0..{len([k for k in self._index if isinstance(k, int)]) - 1})")
            out.append(self._index[key])
        arr = np.asarray(out, dtype=np.int64)
        if len(np.unique(arr)) != len(arr):
            raise LayoutError(f"layers {list(layers)} name the same tensor twice")
        return arr

    def __repr__(self) -> str:
        t0 = self.geometry.tensors[0]
        segs = ", ".join(f"{s.count}x{s.run}B" for s in t0.segments)
        dev = "host" if self.memory is MemoryKind.HOST else f"cuda:{self.device}"
        return (
            f"KVLayout({self.num_tensors} tensors on {dev}, {self.num_blocks} blocks of "
            f"{self.block_nbytes} B, tensor 0: {t0.dtype}{list(t0.block_shape)} as [{segs}], "
            f"fingerprint {self.fingerprint})"
        )
