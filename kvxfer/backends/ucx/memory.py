"""The UCX backend's local memory: the KV tensors registered with UCX, and the packed path's pool.

Layer: backends/ucx, above :mod:`~kvxfer.backends.ucx.ucp`, :mod:`~kvxfer.backends.ucx.packed`
and the shared :mod:`kvxfer.backends.staging`. Each registered tensor is mapped once with ``ucp_mem_map``;
its packed rkey goes into this connector's endpoint description, and the request parameters
naming its memory handle are kept for RMA posts. The staging pool and the packer of packed
transfers are made at first use, once a layout is registered.
"""

from __future__ import annotations

import threading
from typing import Any

from ..._tensors import MemoryKind
from ...layout import KVLayout
from ..staging import Packer
from .packed import StagingPool, staging_pool
from .ucp import MemoryType, MemRegion, Ucp

__all__ = ["LocalMemory"]


class LocalMemory:
    """This connector's KV tensors as UCX regions, and the packed path's staging pool and packer.

    ``layout`` is None until :meth:`register`; ``tensor_params[i]`` is the RMA request parameter
    block naming tensor ``i``'s memory handle.
    """

    def __init__(self, ucp: Ucp, context: int, staging_cache: int):
        self._ucp, self._ctx, self._staging_cache = ucp, context, staging_cache
        self.layout: KVLayout | None = None
        self.regions: list[MemRegion] = []
        self.tensor_params: list[Any] = []
        self._pool: StagingPool | None = None
        self._packer: Packer | None = None
        self._lock = threading.Lock()

    def register(self, layout: KVLayout) -> None:
        """Map every tensor of ``layout`` with UCX.

        Raises:
            UcxCallError: UCX refused a registration.
        """
        mt = MemoryType.HOST if layout.memory is MemoryKind.HOST else MemoryType.CUDA
        for addr, t in zip(layout.addrs.tolist(), layout.geometry.tensors):
            memh = self._ucp.mem_map(self._ctx, int(addr), t.span, mt)
            self.regions.append(MemRegion(int(addr), t.span, memh, self._ucp.rkey_pack(self._ctx, memh)))
            self.tensor_params.append(self._ucp.request_param(memh))
        self.layout = layout

    def described(self) -> list[list[Any]]:
        """[address, length, packed rkey] of each region, as the endpoint description carries them."""
        return [[r.address, r.length, r.rkey] for r in self.regions]

    def staging(self) -> StagingPool:
        """The registered staging buffers (made at first use, from any thread)."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    assert self.layout is not None
                    self._pool = staging_pool(self._ucp, self._ctx, self.layout.memory, self.layout.device,
                                              self._staging_cache)
        return self._pool

    def packer(self) -> Packer:
        """The gather/scatter between this layout and staging buffers (made at first use)."""
        if self._packer is None:
            assert self.layout is not None
            self._packer = Packer(self.layout)
        return self._packer

    def close(self) -> None:
        """Free the staging buffers and unmap every region (after the worker has stopped)."""
        if self._pool is not None:
            self._pool.close()
        for r in self.regions:
            self._ucp.mem_unmap(self._ctx, r.memh)
        self.regions = []
