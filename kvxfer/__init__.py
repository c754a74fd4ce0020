"""kvxfer: move paged KV-cache blocks between LLM inference engines.

Import cost is small on purpose: no torch, cupy or ucxx import, no CUDA context, no threads.
"""

from ._tensors import MemoryKind
from .config import ConnectorConfig, TcpConfig
from .connector import Connector, Notification, Peer
from .errors import (
    BackendUnavailableError,
    BlockIdError,
    ConfigError,
    KernelCompileError,
    KvxferError,
    LayoutError,
    LayoutMismatchError,
    LocalProtocolError,
    PeerLostError,
    ProtocolError,
    RegistryError,
    RemoteProtocolError,
    RemoteTransferError,
    TransferCancelledError,
    TransferTimeoutError,
    TransportError,
)
from .handle import Op, TransferHandle, TransferStats, TransferStatus
from .layout import KVLayout, LayoutGeometry, Segment, TensorGeometry
from .metrics import DURATION_BUCKETS, MetricsSnapshot, SeriesMetrics, register_prometheus
from .plan import TransferPlan, plan_transfer
from .reshard import BlockFormat, HeadOrder, HeadReshard, HeadSource, tp_consumers, tp_head_range, tp_kv_heads, tp_sources

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BlockFormat",
    "BlockIdError",
    "ConfigError",
    "Connector",
    "ConnectorConfig",
    "DURATION_BUCKETS",
    "HeadOrder",
    "HeadReshard",
    "HeadSource",
    "KVLayout",
    "KernelCompileError",
    "KvxferError",
    "LayoutError",
    "LayoutGeometry",
    "LayoutMismatchError",
    "LocalProtocolError",
    "MemoryKind",
    "MetricsSnapshot",
    "Notification",
    "Op",
    "Peer",
    "PeerLostError",
    "ProtocolError",
    "RegistryError",
    "RemoteProtocolError",
    "RemoteTransferError",
    "Segment",
    "SeriesMetrics",
    "TcpConfig",
    "TensorGeometry",
    "TransferCancelledError",
    "TransferHandle",
    "TransferPlan",
    "TransferStats",
    "TransferStatus",
    "TransferTimeoutError",
    "TransportError",
    "plan_transfer",
    "register_prometheus",
    "tp_consumers",
    "tp_head_range",
    "tp_kv_heads",
    "tp_sources",
]
