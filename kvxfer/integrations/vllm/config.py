"""Settings of the vLLM connector, read from ``kv_connector_extra_config`` (no vLLM import).

Layer: engine integration. Precedence: a key in ``kv_connector_extra_config``, then the
``KVXFER_VLLM_<KEY>`` environment variable (read through :func:`kvxfer.config.from_env`, where
every environment read lives), then the default. Bad values raise ConfigError naming the
valid ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from ...config import from_env
from ...connector import BACKEND_NAMES
from ...errors import ConfigError

__all__ = ["TransferMode", "TransferRole", "VllmConnectorConfig"]


class TransferMode(Enum):
    """Who moves the bytes: the decode side reads (pull) or the prefill side writes (push)."""

    PULL = "pull"
    PUSH = "push"


class TransferRole(Enum):
    """vLLM's ``kv_role``: which halves of a request this instance plays."""

    PRODUCER = "kv_producer"
    CONSUMER = "kv_consumer"
    BOTH = "kv_both"

    @classmethod
    def from_kv_role(cls, kv_role: str | None) -> TransferRole:
        try:
            return cls(kv_role)
        except ValueError:
            raise ConfigError(f"kv_role {kv_role!r} is unknown; expected one of {[r.value for r in cls]}") from None

    @property
    def produces(self) -> bool:
        return self is not TransferRole.CONSUMER

    @property
    def consumes(self) -> bool:
        return self is not TransferRole.PRODUCER


@dataclass(frozen=True, slots=True)
class _EnvView:
    """The string-typed fields ``from_env`` fills from ``KVXFER_VLLM_*`` (empty: unset)."""

    registry: str = ""
    registry_token: str = ""
    mode: str = ""
    backend: str = ""
    listen: str = ""
    ttl_s: float = 0.0
    load_timeout_s: float = 0.0
    consumer_tp_size: int = 0


@dataclass(frozen=True, slots=True)
class VllmConnectorConfig:
    """What ``kv_connector_extra_config`` may hold.

    registry: ``kvxfer://host:port`` (a ``kvxfer-registry``) or ``redis://host:port/db``.
    registry_token: shared token of the registry, if it has one.
    mode: ``pull`` (decode reads after prefill) or ``push`` (prefill writes each layer).
    backend: ``auto`` (CUDA IPC on one host, else UCX/TCP), ``tcp``, ``cuda_ipc`` or ``ucx``.
    listen: ``host:port`` of this worker's TCP endpoint (port 0: any free one).
    ttl_s: how long a producer keeps a request's blocks for a consumer that never comes.
    load_timeout_s: how long a consumer waits for the producer's blocks before it gives up
        (the blocks are then reported as load errors and recomputed or failed by vLLM).
    consumer_tp_size: producer, pull mode: the tensor-parallel size of the decode instances
        that read from this one (0: the same as this instance's). Each producer rank keeps a
        request's blocks until every decode rank that reads from it confirmed, and a decode
        rank reads its KV heads from the prefill rank(s) that hold them; different TP sizes on
        the two sides need this set on the prefill side. Block sizes may differ too (16 -> 64,
        64 -> 16): full-attention and MLA groups are mapped by token ranges, sliding-window
        groups by the tokens both windows hold; a Mamba group's state block moves as it is
        between equal TP sizes (another TP is refused for it).
    """

    registry: str = "kvxfer://127.0.0.1:7300"
    registry_token: str | None = None
    mode: TransferMode = TransferMode.PULL
    backend: str = "auto"
    listen: str = "127.0.0.1:0"
    ttl_s: float = 120.0
    load_timeout_s: float = 60.0
    consumer_tp_size: int = 0

    def __post_init__(self) -> None:
        if not self.registry.startswith(("kvxfer://", "redis://")):
            raise ConfigError(f"registry={self.registry!r}; expected kvxfer://host:port or redis://host:port/db")
        if self.backend not in BACKEND_NAMES:
            raise ConfigError(f"backend={self.backend!r}; expected one of {list(BACKEND_NAMES)}")
        if not self.ttl_s > 0 or not self.load_timeout_s > 0:
            raise ConfigError("ttl_s and load_timeout_s must be positive numbers of seconds")
        if type(self.consumer_tp_size) is not int or not 0 <= self.consumer_tp_size <= 4096:
            raise ConfigError(f"consumer_tp_size={self.consumer_tp_size!r}; expected 0 (this instance's TP) or a TP size")

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> VllmConnectorConfig:
        """Build from ``kv_connector_extra_config``; environment fills what it leaves out.

        Raises:
            ConfigError: an unknown key or a bad value (the message names the valid ones).
        """
        extra = dict(extra or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(extra) - set(names))
        if unknown:
            raise ConfigError(f"unknown kvxfer kv_connector_extra_config keys {unknown}; valid: {names}")
        env = from_env(_EnvView, "KVXFER_VLLM_")
        values: dict[str, Any] = {}
        for name in names:
            if name in extra and extra[name] is not None:
                values[name] = extra[name]
            elif getattr(env, name):
                values[name] = getattr(env, name)
        if "mode" in values:
            try:
                values["mode"] = TransferMode(str(values["mode"]).lower())
            except ValueError:
                raise ConfigError(f"mode={values['mode']!r}; expected one of {[m.value for m in TransferMode]}") from None
        for key in ("ttl_s", "load_timeout_s"):
            if key in values:
                try:
                    values[key] = float(values[key])
                except (TypeError, ValueError):
                    raise ConfigError(f"{key}={values[key]!r}; expected a number of seconds") from None
        if "consumer_tp_size" in values:
            try:
                values["consumer_tp_size"] = int(values["consumer_tp_size"])
            except (TypeError, ValueError):
                raise ConfigError(f"consumer_tp_size={values['consumer_tp_size']!r}; expected an int") from None
        for key in ("registry", "backend", "listen"):
            if key in values and not isinstance(values[key], str):
                raise ConfigError(f"{key}={values[key]!r}; expected a string")
        return cls(**values)
