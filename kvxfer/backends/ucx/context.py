"""What a UCX link is given by the backend that made it.

Layer: backends/ucx (between the worker and memory modules and the link). A link uses its
backend only through this context, so the link never imports the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..base import BackendLink, LocalSide
from .config import UcxConfig
from .memory import LocalMemory
from .worker import Worker

__all__ = ["LinkContext"]


@dataclass(frozen=True, slots=True)
class LinkContext:
    """What a link uses of the backend that made it (one per backend, shared by its links): a
    :class:`~kvxfer.backends.base.LinkOwner` (``local``, ``forget``) with UCX's parts."""

    worker: Worker  # the ucp binding, the work thread (defer), wake-ups, endpoint closing
    memory: LocalMemory  # our layout and registrations, the staging pool, the packer
    config: UcxConfig
    local: LocalSide  # the connector: notifications, link loss
    session: str  # our session, named in every control message we send
    forget: Callable[[BackendLink], None]  # the backend stops routing messages to a closed link
