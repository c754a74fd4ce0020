"""UCX backend settings: a frozen config read from ``KVXFER_UCX_*`` variables.

Layer: backends/ucx (configuration; imports no ucxx). Precedence as everywhere in kvxfer: an explicit
argument, then the ``KVXFER_UCX_<FIELD>`` variable (read by :func:`kvxfer.config.from_env`),
then the default. UCX's own ``UCX_*`` variables (transports, devices) are read by UCX itself;
see ``docs/ucx.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ...config import from_env
from ...errors import ConfigError
from ...plan import RAMP

__all__ = ["ErrorHandling", "Progress", "TransferMode", "UcxConfig", "piece_bytes", "piece_edge", "piece_first",
           "ucx_config"]


class ErrorHandling(Enum):
    """How a lost peer is detected.

    PEER: UCX peer error handling on every endpoint (needs a transport with a peer-failure
    handler for active messages: tcp, verbs; shared memory alone has none). NONE: UCX error
    handling off; a peer on the same host is watched by its pid. AUTO: PEER, and NONE (with the
    pid watch) for a same-host peer that UCX cannot reach with error handling on.
    """

    AUTO = "auto"
    PEER = "peer"
    NONE = "none"


class Progress(Enum):
    """How the progress thread waits for UCX events.

    WAIT: sleeps in epoll until an event or ``wakeup_ms``. POLL: busy-polls one core; the lowest
    latency between pipelined pieces (one llama8b GPU read on 2x H200: 240 GB/s polling vs
    188 GB/s waiting; 4 reads in flight 327 vs 267 GB/s). AUTO (default): POLL once a KV layout
    in GPU memory is registered (a core is worth it on a GPU host), WAIT for host memory.
    """

    AUTO = "auto"
    POLL = "poll"
    WAIT = "wait"


class TransferMode(Enum):
    """How a plan's ranges move: one RMA per coalesced range, or packed into one buffer."""

    AUTO = "auto"
    DIRECT = "direct"
    PACKED = "packed"


@dataclass(frozen=True, slots=True)
class UcxConfig:
    """UCX backend settings (``KVXFER_UCX_<FIELD>`` variables)."""

    error_handling: ErrorHandling = ErrorHandling.AUTO
    mode: TransferMode = TransferMode.AUTO
    pack_below: int = 32 << 10  # AUTO packs when the mean range is smaller than this (bytes) ...
    pack_min_ranges: int = 256  # ... and there are at least this many ranges
    staging_max: int = 1 << 30  # AUTO never packs more than this many bytes per transfer
    staging_cache: int = 4  # registered staging buffers kept for reuse
    chunk_bytes: int = 256 << 20  # packed transfers move in up to ~4 pipelined pieces of at most this size
    wakeup_ms: int = 50  # progress thread's epoll timeout: a safety net, not a poll
    progress: Progress = Progress.AUTO  # progress thread: sleep in epoll or busy-poll (see Progress)
    liveness_interval: float = 0.5  # seconds between the watch thread's checks: pids of same-host
    # peers without error handling (NONE), deadlines of abandoned early reads
    close_timeout: float = 2.0  # seconds an endpoint close may take

    def __post_init__(self) -> None:
        if (not isinstance(self.error_handling, ErrorHandling) or not isinstance(self.mode, TransferMode)
                or not isinstance(self.progress, Progress)):
            raise ConfigError(
                f"ucx error_handling must be one of {[e.value for e in ErrorHandling]}, mode one of "
                f"{[m.value for m in TransferMode]} and progress one of {[p.value for p in Progress]}"
            )
        if (self.pack_below < 0 or self.pack_min_ranges < 1 or self.staging_max < 4096 or self.staging_cache < 0
                or self.chunk_bytes < 4096):
            raise ConfigError("ucx pack_below >= 0, pack_min_ranges >= 1, staging_max >= 4096, staging_cache >= 0, "
                              "chunk_bytes >= 4096")
        if not 1 <= self.wakeup_ms <= 10_000:
            raise ConfigError(f"ucx wakeup_ms={self.wakeup_ms}; expected 1..10000")
        if not self.liveness_interval > 0 or not self.close_timeout > 0:
            raise ConfigError("ucx liveness_interval and close_timeout must be positive seconds")


MIN_PIECE = 16 << 20  # the smallest ramp piece: the last one, whose scatter ends the transfer
FIRST_PIECE = 64 << 20  # the first piece: its RMA (0.17 ms at 390 GB/s) must outlast the host's
# work for the next piece, 0.15-0.25 ms in place on 2x H200 (wait, put, flush, next gather);
# a 16 MiB first piece left the wire idle for ~0.1 ms (bench/results/ucx_gpu_h200_2026-11-27_*)


def piece_edge(config: UcxConfig, nbytes: int) -> int:
    """The first and last piece's size for a packed transfer of ``nbytes`` (0: no ramp; see
    :meth:`~kvxfer.plan.TransferPlan.chunk_bounds`): :data:`MIN_PIECE`, so that the wire starts
    after a short gather and the last scatter is short, once a transfer spans several pieces."""
    return MIN_PIECE if nbytes >= 4 * piece_bytes(config, nbytes) > MIN_PIECE else 0


def piece_first(config: UcxConfig, nbytes: int) -> int:
    """The first piece's size when the transfer ramps (:func:`piece_edge` > 0): :data:`FIRST_PIECE`,
    or the edge itself when that is already as large."""
    edge = piece_edge(config, nbytes)
    return max(edge, min(FIRST_PIECE, piece_bytes(config, nbytes) // RAMP)) if edge else 0


def piece_bytes(config: UcxConfig, nbytes: int) -> int:
    """The piece size a packed transfer of ``nbytes`` is cut at: about four pieces, each at least
    :data:`MIN_PIECE` and at most ``chunk_bytes`` (256 MiB pieces measured best on 2x H200 for
    1 GiB; bench/bench_ucx.py --chunks)."""
    return min(config.chunk_bytes, max(min(MIN_PIECE, config.chunk_bytes), -(-nbytes // 4)))


def ucx_config(**overrides: object) -> UcxConfig:
    """Defaults, then ``KVXFER_UCX_*`` variables, then ``overrides``.

    Raises:
        ConfigError: a bad value (names the variable and what is valid).
    """
    try:
        return from_env(UcxConfig, "KVXFER_UCX_", **overrides)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad KVXFER_UCX_* setting: {exc}") from None
