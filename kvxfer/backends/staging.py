"""Stream sides for the backends that move bytes through host buffers (tcp, ucx host path).

Layer: backends. Host-memory layouts are viewed in place; GPU layouts are packed on the GPU
into pinned host chunks before sending and unpacked after receiving (see gpu_staging.py).
"""

from __future__ import annotations

from .._tensors import MemoryKind
from ..config import TcpConfig
from ..errors import LayoutError
from ..layout import KVLayout
from ..plan import TransferPlan
from .stream import HostStreamSide, StreamSide

__all__ = ["make_stream_side"]

def make_stream_side(plan: TransferPlan, side: str, layout: KVLayout | None, config: TcpConfig) -> StreamSide:
    """The stream side of ``plan`` over ``layout``'s memory (``side`` is "src" or "dst")."""
    if layout is None:
        raise LayoutError("no KV layout is registered on this connector")
    if layout.memory is MemoryKind.HOST:
        return HostStreamSide(plan, side, layout.addrs)
    from .gpu_staging import GpuStreamSide

    return GpuStreamSide(plan, side, layout, config)
