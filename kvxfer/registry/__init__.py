"""The registry: matches each request's producer and consumer across processes and hosts.

Layer: registry (above the Connector's transfers). ``kvxfer://host:port`` is the embedded
asyncio server (:class:`RegistryServer`, ``kvxfer-registry``); ``redis://host:port/db`` is the
same semantics on Redis. :func:`connect_registry` picks by URL; :class:`RequestAgent` is what a
Connector uses for publish/pull/expect/push. Importing this package starts nothing.
"""

from .agent import FinishedRequest, RequestAgent, RequestHandle, ReshardSpec
from .base import AsyncRegistry, LinkState, parse_registry_url
from .client import AsyncServerClient, RegistryClient, connect_registry, connect_registry_async
from .core import CoreConfig, RegistryCore
from .keys import publication_key
from .errors import (AlreadyClaimedError, DuplicateRequestError, InvalidRequestError, NameTakenError, NotAPartyError,
                     RegistryAuthError, RegistryTimeoutError, RegistryUnavailableError, RequestFailedError,
                     UnknownConnectorError, UnknownRequestError)
from .messages import Claim, EventKind, Expectation, Mode, RequestEvent, RequestInfo, RequestState, Role
from .server import AsyncRegistryServer, RegistryServer, ServerConfig

__all__ = [
    "AlreadyClaimedError", "AsyncRegistry", "AsyncRegistryServer", "AsyncServerClient", "Claim", "CoreConfig",
    "DuplicateRequestError", "EventKind", "Expectation", "FinishedRequest", "InvalidRequestError", "LinkState",
    "Mode", "NameTakenError", "NotAPartyError", "RegistryAuthError", "RegistryClient", "RegistryCore",
    "RegistryServer", "RegistryTimeoutError", "RegistryUnavailableError", "RequestAgent", "RequestEvent",
    "RequestFailedError", "RequestHandle", "ReshardSpec", "RequestInfo", "RequestState", "Role", "ServerConfig",
    "UnknownConnectorError", "UnknownRequestError", "connect_registry", "connect_registry_async", "parse_registry_url",
    "publication_key",
]
