"""The standard benchmark workloads of BENCHMARKS.md and custom geometries, as frozen dataclasses.

Layer: tools. A :class:`Workload` says what one side's paged KV cache looks like (layers, pool
of blocks, the shape of one K or V piece) and how many blocks one transfer moves. It is pure
data: allocation lives in :mod:`kvxfer.tools.arrays`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["Workload", "STANDARD_WORKLOADS", "get_workload", "parse_size", "format_size", "UnknownWorkloadError"]

_ITEMSIZE = 2  # bf16: every standard workload stores 2-byte elements


class UnknownWorkloadError(ConfigError):
    """A workload name that is not one of the standard ones."""


@dataclass(frozen=True, slots=True)
class Workload:
    """One benchmark geometry: what a layer tensor holds and how many blocks a transfer moves.

    With ``kv_split`` a layer tensor is ``[2, num_blocks, *piece_shape]`` (K and V first, two
    pieces per block and layer, like vLLM's flash-attention layout); without it
    ``[num_blocks, *piece_shape]`` (one piece, like MLA).
    """

    name: str
    layers: int
    num_blocks: int  # blocks in each side's pool
    blocks: int  # blocks moved by one transfer
    piece_shape: tuple[int, ...]  # elements of one K or V piece of one block in one layer
    kv_split: bool = True
    seed: int = 0  # picks the random block ids
    scale: float = 1.0  # informational: the --scale that produced this workload

    def __post_init__(self) -> None:
        if self.layers < 1 or self.blocks < 1 or self.num_blocks < 2:
            raise ConfigError(f"workload {self.name!r}: need layers >= 1, blocks >= 1 and num_blocks >= 2")
        if self.blocks > self.num_blocks:
            raise ConfigError(
                f"workload {self.name!r}: {self.blocks} blocks per transfer exceed the pool of {self.num_blocks}"
            )
        if not self.piece_shape or any(d < 1 for d in self.piece_shape):
            raise ConfigError(f"workload {self.name!r}: piece shape {self.piece_shape} must be positive")

    # -- derived sizes -----------------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return _ITEMSIZE

    @property
    def piece_bytes(self) -> int:
        """Bytes of one contiguous piece (one K or V slice of one block in one layer)."""
        return math.prod(self.piece_shape) * _ITEMSIZE

    @property
    def pieces_per_block(self) -> int:
        """Pieces of one block over all layers."""
        return self.layers * (2 if self.kv_split else 1)

    @property
    def block_nbytes(self) -> int:
        return self.pieces_per_block * self.piece_bytes

    @property
    def pieces(self) -> int:
        """Pieces moved by one transfer."""
        return self.blocks * self.pieces_per_block

    @property
    def total_bytes(self) -> int:
        """Payload bytes of one transfer."""
        return self.blocks * self.block_nbytes

    @property
    def pool_bytes(self) -> int:
        """Bytes of one side's whole KV pool."""
        return self.num_blocks * self.block_nbytes

    @property
    def layer_shape(self) -> tuple[int, ...]:
        head = (2, self.num_blocks) if self.kv_split else (self.num_blocks,)
        return head + self.piece_shape

    @property
    def block_dim(self) -> int:
        return 1 if self.kv_split else 0

    @property
    def label(self) -> str:
        """Short name for tables: the base name, and what a sweep or scale changed."""
        return self.name

    # -- derived workloads -------------------------------------------------------------------
    def scaled(self, factor: float) -> Workload:
        """Shrink the bytes of a transfer by ``factor`` (0 < factor <= 1), keeping the piece size.

        Blocks moved and pool size shrink first; when fewer than one block would remain, the
        number of layers shrinks too. Raises ConfigError for a factor outside (0, 1].
        """
        if not 0 < factor <= 1:
            raise ConfigError(f"--scale {factor}: expected a number in (0, 1], e.g. 0.01 or 1/64")
        if factor == 1:
            return self
        want = self.blocks * factor
        blocks = max(1, round(want))
        layers = self.layers
        if want < 1:
            layers = max(1, round(self.layers * want))
        pool = max(2, blocks, round(self.num_blocks * factor))
        return replace(self, blocks=blocks, layers=layers, num_blocks=pool, scale=self.scale * factor)

    def with_piece_bytes(self, piece_bytes: int) -> Workload:
        """The same workload with pieces of ``piece_bytes`` (a multiple of 2) bytes."""
        if piece_bytes < _ITEMSIZE or piece_bytes % _ITEMSIZE:
            raise ConfigError(f"piece size {piece_bytes} B: expected a positive multiple of {_ITEMSIZE} bytes")
        return replace(self, piece_shape=(piece_bytes // _ITEMSIZE,))

    def with_blocks(self, blocks: int) -> Workload:
        """The same workload moving ``blocks`` blocks (the pool grows if it must)."""
        if blocks < 1:
            raise ConfigError(f"blocks per transfer {blocks}: expected at least 1")
        return replace(self, blocks=blocks, num_blocks=max(self.num_blocks, blocks, 2))

    def block_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids on the peer's side, ids on the local side): fixed seed, distinct, different per side."""
        rng = np.random.default_rng(self.seed)
        a = rng.permutation(self.num_blocks)[: self.blocks].astype(np.int64)
        b = rng.permutation(self.num_blocks)[: self.blocks].astype(np.int64)
        if np.array_equal(a, b):
            b = (b + 1) % self.num_blocks  # keep the two sides different (tiny pools only)
        return a, b

    def describe(self) -> str:
        kind = "[2, nb, ...]" if self.kv_split else "[nb, ...]"
        return (
            f"{self.name}: {self.layers} layers {kind} x {self.num_blocks} blocks, {self.blocks} moved, "
            f"{format_size(self.piece_bytes)} pieces, {format_size(self.total_bytes)} per transfer"
        )

    # -- wire form (bootstrap messages) ------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": self.layers,
            "num_blocks": self.num_blocks,
            "blocks": self.blocks,
            "piece_shape": list(self.piece_shape),
            "kv_split": self.kv_split,
            "seed": self.seed,
            "scale": self.scale,
        }

    @classmethod
    def from_wire(cls, obj: Any) -> Workload:
        """Rebuild a workload sent by the other side; ConfigError when malformed."""
        try:
            return cls(
                name=str(obj["name"]),
                layers=int(obj["layers"]),
                num_blocks=int(obj["num_blocks"]),
                blocks=int(obj["blocks"]),
                piece_shape=tuple(int(d) for d in obj["piece_shape"]),
                kv_split=bool(obj["kv_split"]),
                seed=int(obj["seed"]),
                scale=float(obj["scale"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed workload from the peer: {exc}") from None


STANDARD_WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("llama8b", layers=32, num_blocks=2048, blocks=512, piece_shape=(16, 8, 128)),
        Workload("llama8b-tp8", layers=32, num_blocks=8192, blocks=4096, piece_shape=(16, 1, 128)),
        Workload("llama70b-tp8", layers=80, num_blocks=4096, blocks=512, piece_shape=(16, 1, 128)),
        Workload("mla", layers=61, num_blocks=4096, blocks=512, piece_shape=(16, 576), kv_split=False),
        Workload("small", layers=32, num_blocks=2048, blocks=1, piece_shape=(16, 8, 128)),
    )
}


def get_workload(name: str) -> Workload:
    """The standard workload called ``name``.

    Raises:
        UnknownWorkloadError: no such workload (the message lists the known names).
    """
    try:
        return STANDARD_WORKLOADS[name]
    except KeyError:
        raise UnknownWorkloadError(
            f"unknown workload {name!r}; standard workloads are: {', '.join(STANDARD_WORKLOADS)}"
        ) from None


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'4K', '32KiB', '1M', '4096' -> bytes (binary units). Raises ConfigError on junk."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"size {text!r}: expected a number with an optional K/M/G suffix, e.g. 4K or 32KiB")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != int(value) or value < 1:
        raise ConfigError(f"size {text!r} is not a positive whole number of bytes")
    return int(value)


def format_size(n: float) -> str:
    """Bytes as a short binary-unit string: 32768 -> '32K', 1073741824 -> '1G'."""
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult:
            v = n / mult
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.3g}{unit}"
    return f"{int(n)}B"
