"""Packing: a plan's blocks to and from one contiguous buffer, on the GPU or on the host.

Layer: backends, shared staging (over :mod:`kvxfer.ops`). A :class:`Packer` belongs to one
layout: :meth:`Packer.gather` copies a plan's source blocks into a buffer in stream order,
:meth:`Packer.scatter` copies a buffer into a plan's destination blocks. GPU memory uses the
one-launch kernels of :mod:`kvxfer.ops.cuda` on the packer's own stream (in order, so waiting
for the last token covers the earlier ones); host memory uses the vectorized numpy copies of
:mod:`kvxfer.ops.host`, done when the call returns. :class:`Pieces` runs one gather or scatter
piece by piece (:meth:`~kvxfer.plan.TransferPlan.chunk_bounds`), so that packing, the wire
and unpacking overlap. Importing this module imports neither CuPy nor torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..._memory import host_bytes
from ..._tensors import MemoryKind
from ...layout import KVLayout
from ...plan import TransferPlan

__all__ = ["Buffer", "ContiguousBuffer", "Packer", "Pieces"]


class ContiguousBuffer(Protocol):
    """What a packer copies to and from: contiguous bytes at ``address`` (``array``: the host
    numpy or GPU CuPy array that owns them)."""

    array: Any
    address: int
    nbytes: int


@dataclass(eq=False, slots=True)
class Buffer:
    """A plain :class:`ContiguousBuffer`."""

    array: Any
    address: int
    nbytes: int


class Packer:
    """Gather/scatter between a plan's side of ``layout`` and a contiguous buffer.

    ``gather``/``scatter`` move one plan (often one piece of a transfer) at ``offset`` in the
    buffer and return a token for :meth:`wait`. GPU copies go to ``stream`` (a CuPy stream),
    else to a non-blocking stream of the packer's own, made on first use.
    """

    def __init__(self, layout: KVLayout, stream: Any = None):
        self.layout = layout
        self.host = layout.memory is MemoryKind.HOST
        self._views = None if not self.host else [host_bytes(int(a), t.span) for a, t in zip(layout.addrs, layout.geometry.tensors)]
        self._stream: Any = stream

    @property
    def stream(self) -> Any:
        """The CuPy stream the GPU copies go to (GPU layouts only)."""
        if self._stream is None:
            import cupy

            with cupy.cuda.Device(self.layout.device):
                self._stream = cupy.cuda.Stream(non_blocking=True)
        return self._stream

    def wait_for(self, event: Any) -> None:
        """Queue a wait for ``event`` (GPU; None: nothing) before our next gather or scatter."""
        if event is not None and not self.host:
            self.stream.wait_event(event)

    def record(self) -> Any:
        """A token (GPU: an event on our stream) for the copies queued so far."""
        if self.host:
            return None
        import cupy

        with cupy.cuda.Device(self.layout.device):
            ev = cupy.cuda.Event(disable_timing=True)
            ev.record(self.stream)
        return ev

    def gather(self, plan: TransferPlan, buf: ContiguousBuffer, offset: int = 0) -> Any:
        """Copy ``plan``'s source blocks into ``buf`` from byte ``offset``; returns a token.

        Raises:
            LayoutError: ``buf`` is too small. TransportError, KernelCompileError: the launch failed.
        """
        if self.host:
            from ...ops.host import gather

            gather(plan, self._views, buf.array[offset : offset + plan.nbytes])
            return None
        from ...ops import cuda as ops_cuda

        ops_cuda.gather(plan, self.layout, buf.address + offset, stream=self.stream, device=self.layout.device)
        return self.record()

    def scatter(self, plan: TransferPlan, buf: ContiguousBuffer, offset: int = 0) -> Any:
        """Copy ``buf`` from byte ``offset`` into ``plan``'s destination blocks; returns a token.

        Raises:
            LayoutError: ``buf`` is too small. TransportError, KernelCompileError: the launch failed.
        """
        if self.host:
            from ...ops.host import scatter

            scatter(plan, buf.array[offset : offset + plan.nbytes], self._views)
            return None
        from ...ops import cuda as ops_cuda

        ops_cuda.scatter(plan, buf.address + offset, self.layout, stream=self.stream, device=self.layout.device)
        return self.record()

    def pieces(self, plan: TransferPlan, buf: ContiguousBuffer, bounds: list[tuple[int, int, int, int]],
               gather: bool) -> Pieces:
        """The pieces ``bounds`` (:meth:`~kvxfer.plan.TransferPlan.chunk_bounds`) of a gather into
        (or scatter from) ``buf``, prepared once; ``launch(i)`` queues piece ``i``, returns a token."""
        return Pieces(self, plan, buf, bounds, gather)

    @staticmethod
    def wait(token: Any) -> None:
        """Block until the copy behind ``token`` (and every earlier one) is done."""
        if token is not None:
            token.synchronize()


class Pieces:
    """A gather or scatter prepared once and run piece by piece (see :meth:`Packer.pieces`)."""

    def __init__(self, packer: Packer, plan: TransferPlan, buf: ContiguousBuffer,
                 bounds: list[tuple[int, int, int, int]], gather: bool):
        self._packer, self._plan, self._buf, self._bounds, self._gather = packer, plan, buf, bounds, gather
        self._gpu: Any = None
        if not packer.host and plan.block_pairs is not None:
            from ...ops.pairs import BUF_DST, BUF_SRC, PairPieces

            lay = packer.layout
            src, dst = (lay, buf.address) if gather else (buf.address, lay)
            self._gpu = PairPieces(plan.block_pairs, src, dst, buffer_side=BUF_DST if gather else BUF_SRC,
                                   bounds=[b[:2] for b in bounds], stream=packer.stream, device=lay.device)

    def gather_staged(self) -> Iterator[tuple[int, int]]:
        """Yield each piece's stream bytes (lo, hi) as soon as that piece is in the buffer.

        GPU: two gathers are queued ahead, the next one launched while the GPU runs the
        current one, so when piece i is yielded (and put on the wire) piece i + 1 is already
        gathering and its launch (~20 us of host time) is off the wire's path; the first
        piece still moves after one gather. Host memory: a gather is the copy itself, so
        piece i + 1 is gathered only after piece i has been yielded."""
        n = len(self._bounds)
        ahead = 2 if self._gpu is not None else 1
        tokens = [self.launch(i) for i in range(min(ahead, n))]
        for i, (_, _, lo, hi) in enumerate(self._bounds):
            self._packer.wait(tokens[i])
            yield lo, hi
            if i + ahead < n:
                tokens.append(self.launch(i + ahead))

    def launch(self, i: int) -> Any:
        """Queue piece ``i``; returns its token."""
        p0, p1, lo, _ = self._bounds[i]
        if self._gpu is not None:
            self._gpu.launch(i)
            return self._packer.record()
        sub = self._plan.piece(p0, p1)
        return self._packer.gather(sub, self._buf, lo) if self._gather else self._packer.scatter(sub, self._buf, lo)
