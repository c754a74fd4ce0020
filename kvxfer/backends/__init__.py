"""Backends move bytes: tcp, cuda_ipc, ucx behind one interface (see base.py)."""

from .base import Backend, BackendKind, BackendLink, LocalSide, TransferRequest

__all__ = ["Backend", "BackendKind", "BackendLink", "LocalSide", "TransferRequest"]
