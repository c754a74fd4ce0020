"""The registry client interface, shared by the embedded-server client and the Redis store.

Layer: registry. One :class:`AsyncRegistry` speaks for one connector ``name``: it holds that
name's directory entry (renewed by heartbeats in the background), publishes, pulls, expects,
completes and cancels requests as that party, and delivers the :class:`RequestEvent` s
addressed to it. Both implementations keep the same rules (see :mod:`kvxfer.registry.core`).
"""

from __future__ import annotations

import abc
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from ..errors import ConfigError
from .messages import Claim, Expectation, RequestEvent, RequestInfo

__all__ = ["AsyncRegistry", "RegistryURL", "Scheme", "parse_registry_url", "DEFAULT_LEASE_S", "DEFAULT_PORT",
           "LinkState"]

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 5.0
DEFAULT_PORT = 7300
DEFAULT_REDIS_PORT = 6379


class Scheme(Enum):
    """Registry backends, chosen by the URL scheme."""

    KVXFER = "kvxfer"
    REDIS = "redis"


class LinkState(Enum):
    """What a client's link to the registry just did (passed to link listeners)."""

    LOST = "lost"
    RECONNECTED = "reconnected"


@dataclass(frozen=True, slots=True)
class RegistryURL:
    scheme: Scheme
    host: str
    port: int
    db: int = 0
    password: str | None = None

    def __str__(self) -> str:
        tail = f"/{self.db}" if self.scheme is Scheme.REDIS else ""
        return f"{self.scheme.value}://{self.host}:{self.port}{tail}"


def parse_registry_url(url: str) -> RegistryURL:
    """Parse ``kvxfer://host:port`` or ``redis://[:password@]host:port/db``.

    Raises:
        ConfigError: unknown scheme, missing host, bad port or database number.
    """
    try:
        parts = urlsplit(url)
        scheme = Scheme(parts.scheme)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"registry URL {url!r}: {exc}; expected kvxfer://host:port or redis://host:port/db") from None
    if not parts.hostname:
        raise ConfigError(f"registry URL {url!r} has no host")
    db = 0
    if scheme is Scheme.REDIS and parts.path.strip("/"):
        try:
            db = int(parts.path.strip("/"))
        except ValueError:
            raise ConfigError(f"registry URL {url!r}: database {parts.path!r} is not a number") from None
    default = DEFAULT_PORT if scheme is Scheme.KVXFER else DEFAULT_REDIS_PORT
    return RegistryURL(scheme, parts.hostname, port if port is not None else default, db, parts.password)


def new_instance_id() -> str:
    """A random id telling this client's lease apart from another process with the same name."""
    return uuid.uuid4().hex


class AsyncRegistry(abc.ABC):
    """One connector's view of the registry (asyncio). Every method may raise
    :class:`~kvxfer.errors.RegistryError` subclasses; each says which."""

    name: str

    def __init__(self, name: str):
        self.name = name
        self._event_listeners: list[Callable[[RequestEvent], None]] = []
        self._link_listeners: list[Callable[[LinkState], None]] = []

    # -- listeners ----------------------------------------------------------------------
    def add_event_listener(self, fn: Callable[[RequestEvent], None]) -> None:
        """Call ``fn(event)`` (on the client's event loop) for each event addressed to ``name``."""
        self._event_listeners.append(fn)

    def add_link_listener(self, fn: Callable[[LinkState], None]) -> None:
        """Call ``fn(state)`` when the link to the registry is lost or re-established."""
        self._link_listeners.append(fn)

    def _emit_event(self, event: RequestEvent) -> None:
        for fn in list(self._event_listeners):
            try:
                fn(event)
            except Exception:  # a listener's bug must not stop event delivery
                log.exception("kvxfer registry event listener failed on %s", event)

    def _emit_link(self, state: LinkState) -> None:
        for fn in list(self._link_listeners):
            try:
                fn(state)
            except Exception:
                log.exception("kvxfer registry link listener failed on %s", state)

    # -- operations ---------------------------------------------------------------------
    @abc.abstractmethod
    async def register(self, metadata: bytes, lease_s: float = DEFAULT_LEASE_S) -> float:
        """Hold ``name -> metadata`` under a lease renewed in the background; the granted lease.

        Raises: NameTakenError (another live instance has the name), RegistryUnavailableError."""

    @abc.abstractmethod
    async def unregister(self) -> None:
        """Drop the directory entry; requests this connector is a party of fail.
        Raises: RegistryUnavailableError."""

    @abc.abstractmethod
    async def lookup(self, name: str) -> bytes:
        """Metadata of connector ``name``. Raises: UnknownConnectorError, RegistryUnavailableError."""

    @abc.abstractmethod
    async def publish(self, request_id: str, blocks: Sequence[int], ttl_s: float, consumers: int = 1) -> None:
        """Pull mode, producer: ``blocks`` for ``consumers`` distinct consumers, each claiming
        once; CONSUMED (to the producer) once all have confirmed. Raises:
        DuplicateRequestError, UnknownConnectorError (not registered), InvalidRequestError
        (ttl, or ``consumers`` outside 1..MAX_CONSUMERS), RegistryUnavailableError."""

    @abc.abstractmethod
    async def pull(self, request_id: str, timeout_s: float) -> Claim:
        """Pull mode, consumer: wait for the publication and claim it (once per consumer, for as
        many consumers as it was published for).

        Raises: AlreadyClaimedError (claimed by this connector already, or by as many consumers
        as it was published for), RegistryTimeoutError, UnknownRequestError (timeout 0 and
        not published), NotAPartyError (push mode), RegistryUnavailableError."""

    @abc.abstractmethod
    async def expect(self, request_id: str, dst_blocks: Sequence[int], ttl_s: float) -> None:
        """Push mode, consumer. Raises: DuplicateRequestError, UnknownConnectorError,
        InvalidRequestError, RegistryUnavailableError."""

    @abc.abstractmethod
    async def await_expect(self, request_id: str, timeout_s: float) -> Expectation:
        """Push mode, producer: wait for the consumer's expectation and take it.

        Raises: AlreadyClaimedError, RegistryTimeoutError, NotAPartyError (pull mode),
        RegistryUnavailableError."""

    @abc.abstractmethod
    async def complete(self, request_id: str, ok: bool = True, reason: str = "") -> None:
        """Report this party's side done or failed. Raises: UnknownRequestError,
        NotAPartyError, RegistryUnavailableError."""

    @abc.abstractmethod
    async def cancel(self, request_id: str, reason: str = "") -> None:
        """Cancel a request this connector is a party of. Raises: UnknownRequestError,
        NotAPartyError, RegistryUnavailableError."""

    @abc.abstractmethod
    async def query(self, request_id: str) -> RequestInfo:
        """State of a live request. Raises: UnknownRequestError, RegistryUnavailableError."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Unregister (best effort) and close the link (idempotent)."""
