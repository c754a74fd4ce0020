"""Backends move bytes: tcp, cuda_ipc, ucx behind one interface (see base.py).

- :mod:`.base`: the interface (Backend, BackendLink, LocalSide, LinkOwner) and planning.
- :mod:`.staging`: stream views, buffer pools and packing, shared by the backends that stage.
- :mod:`.tcp`, :mod:`.cuda_ipc`, :mod:`.ucx`: one package per backend.

The messages a transfer's two sides exchange, and the rules of a link's transfers, are the
sans-I/O :mod:`kvxfer.protocol`.
"""

from .base import Backend, BackendKind, BackendLink, LinkOwner, LocalSide, TransferRequest

__all__ = ["Backend", "BackendKind", "BackendLink", "LinkOwner", "LocalSide", "TransferRequest"]
