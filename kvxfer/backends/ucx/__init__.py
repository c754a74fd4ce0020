"""UCX backend: one-sided RMA on registered KV memory, through ucxx and a small libucp binding.

Layer: backends. ucxx gives the UCX context, the worker, its progress thread and endpoints;
:mod:`~kvxfer.backends.ucx.ucp` adds what ucxx's Python API lacks: ``ucp_mem_map``/rkeys,
``ucp_get_nbx``/``ucp_put_nbx``, ``ucp_ep_flush_nbx`` and active messages (AM). Importing this
package imports no ucxx: :class:`UcxBackend` (from :mod:`~kvxfer.backends.ucx.backend`) is
imported at first access, and raises ImportError there when ucxx is missing.

Modules, each calling only those above it in this list:

- :mod:`~kvxfer.backends.ucx.config`: kvxfer's own settings (``KVXFER_UCX_*``), piece sizes;
- :mod:`~kvxfer.backends.ucx.messages`: the envelope of control messages (their bodies are
  the shared :mod:`kvxfer.protocol.messages`), checked without I/O;
- :mod:`~kvxfer.backends.ucx.ucp`: the ctypes binding to libucp;
- :mod:`~kvxfer.backends.ucx.packed`: staging buffers registered for RMA (pools and packing
  are the shared :mod:`kvxfer.backends.staging`);
- :mod:`~kvxfer.backends.ucx.memory`: the KV tensors registered with UCX, the staging pool;
- :mod:`~kvxfer.backends.ucx.worker`: ucxx's context and worker, the progress and work
  threads, endpoints (and the import of ucxx);
- :mod:`~kvxfer.backends.ucx.transfers`: records of the transfers in flight on a link;
- :mod:`~kvxfer.backends.ucx.context`: what a link is given of its backend;
- :mod:`~kvxfer.backends.ucx.responder`: a link's serving of the peer's packed transfers;
- :mod:`~kvxfer.backends.ucx.link`: one peer's link: the DIRECT and PACKED transfers it
  starts, the dispatch of the peer's messages, closing;
- :mod:`~kvxfer.backends.ucx.backend`: the backend: connect and the answer to a peer's HELLO,
  the choice between DIRECT and PACKED, the pid watch, shutdown.

AUTO picks PACKED when a plan has at least ``pack_min_ranges`` ranges averaging under
``pack_below`` bytes (see ``bench/bench_ucx.py`` for the crossover), else DIRECT.

Control messages arrive on the progress thread (``UcxBackend._on_am``) and are handed to
the work thread; malformed ones are dropped with a logged reason. A lost peer (UCX endpoint
error, or for error-handling-free same-host links a vanished pid) fails every pending handle
with PeerLostError.

How a transfer moves
--------------------
``connect`` creates ONE endpoint to the peer's worker address (reused for every transfer),
sends HELLO (our metadata) and waits for HELLO_ACK; the peer opens its own endpoint back to us
(with error handling, so it learns when we die). The initiator unpacks the peer's rkeys once
per link.

- DIRECT (few, large ranges): the initiator posts one put (write) or get (read) per coalesced
  range straight between KV tensors, then one ``ucp_ep_flush_nbx``; when the flush completes
  every byte is in place remotely. The responder's Python is not in the data path; a NOTE
  message carrying the notification follows the flush.
- PACKED (many small ranges): the initiator sends REQ naming the blocks, its registered
  staging buffer (address, rkey; see :mod:`~kvxfer.backends.ucx.packed`) and the byte count,
  straight from the caller's thread (the peer starts while our side is prepared);
  the responder validates every one of its own ids against its own layout. A read's REQ leaves
  before the caller has even planned it (``UcxLink.start_packed_early``): its plan follows with
  ``UcxLink.attach``, and if the plan fails the transfer is abandoned (nothing of ours is
  touched; the staging buffer is kept until the responder has put its last byte or refused).
  The responder moves the bytes with RMA between the two staging buffers, in about four
  pieces (``piece_bytes``; runs of whole (tensor, segment) pairs,
  :meth:`~kvxfer.plan.TransferPlan.chunk_bounds`), so that packing, the wire and unpacking
  overlap:

  * read: the responder queues the gather of every piece, puts each piece into the initiator's
    buffer as soon as it is staged, flushes, and sends LANDED (bytes in place so far); the
    initiator scatters each piece as it lands and is done at the last one.
  * write: the initiator queues its gathers and sends READY as each piece is staged; the
    responder gets each new piece, scatters it once the get is complete, and answers DONE
    after the last one (and after delivering the notification).

  A refusal is ERR.

A lost peer fails every pending handle with PeerLostError; a handle that times out closes its
link, since RMA may still land.

UCX configuration (docs)
------------------------
UCX reads its own ``UCX_*`` variables when the backend starts (one UCX context per connector):

- ``UCX_TLS``: transports. ``tcp`` (anywhere), ``sm`` or ``posix,cma``/``sysv`` (same host,
  shared memory), ``cuda_copy,cuda_ipc`` (GPU memory; cuda_ipc between GPUs of one host),
  ``rc,ud`` or ``ib`` (InfiniBand/RoCE verbs). Typical: ``UCX_TLS=tcp,sm,cuda_copy,cuda_ipc``
  on one host, ``UCX_TLS=rc,sm,cuda_copy,cuda_ipc`` across an IB fabric.
- ``UCX_NET_DEVICES``: which NICs, e.g. ``mlx5_0:1`` or ``eth0``; default: all.
- ``UCX_TCP_CM_REUSEADDR``, ``UCX_KEEPALIVE_INTERVAL`` (peer-failure detection period),
  ``UCX_RNDV_THRESH``, ``UCX_LOG_LEVEL=info`` (print the transports each endpoint uses).
- PyPI's ``libucx`` has tcp, shared memory, cuda_copy and cuda_ipc but NO verbs. For
  InfiniBand/RoCE install a system UCX (>= 1.15, built with verbs and CUDA) and set
  ``RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true`` so that ``libucx`` loads it.
- Shared-memory transports have no UCX peer-failure handler. With error handling on (the
  default), UCX 1.21 therefore moves even same-host traffic over tcp when tcp is allowed.
  With ``UCX_TLS=sm`` alone, endpoints are created WITHOUT error handling
  (``KVXFER_UCX_ERROR_HANDLING=auto``) and a same-host peer is watched by pid: a peer that
  dies while idle fails the link cleanly, but a peer that dies while an RMA is in flight makes
  UCX abort this process (UCX treats transport errors as fatal without error handling). Use
  sm-only only where both processes live and die together.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UcxBackend"]


def __getattr__(name: str) -> Any:  # UcxBackend imports ucxx: only when asked for
    if name == "UcxBackend":
        from .backend import UcxBackend

        return UcxBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
