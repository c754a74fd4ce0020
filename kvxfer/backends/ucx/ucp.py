"""A small typed ctypes binding to libucp: memory registration, remote keys, RMA, flush and
active messages, on top of the context, worker and endpoint handles that ucxx owns.

Layer: backends/ucx, the bottom of the UCX backend (used by its worker, memory, packed and link
modules). ucxx's Python API has endpoints, tags, active messages and a progress thread but no
one-sided RMA; the functions below live in the same ``libucp``
that ucxx loads (through the ``libucx`` wheel, or a system UCX when
``RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true``), so we call them on ucxx's own handles.

Completion model: operations are posted without per-operation callbacks (their requests are
released at once and finish on their own); one ``ucp_ep_flush_nbx`` per batch carries a
callback that fires on ucxx's progress thread when every earlier operation on that endpoint has
completed remotely. Active messages are received by one worker-wide handler. Structure layouts
follow UCX 1.21's ``ucp.h`` (stable since 1.12 for the fields used here).

Importing this module loads nothing: :func:`load` loads libucp (through ``libucx``) when the
UCX backend starts.
"""

from __future__ import annotations

import ctypes as C
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from ...errors import BackendUnavailableError, TransportError

__all__ = ["Ucp", "MemoryType", "MemRegion", "RemoteKey", "Status", "UcxCallError", "load"]

log = logging.getLogger(__name__)


class Status(IntEnum):
    """The ``ucs_status_t`` values kvxfer reacts to (others are reported by number)."""

    OK = 0
    INPROGRESS = 1
    NO_MESSAGE = -1
    NO_RESOURCE = -2
    IO_ERROR = -3
    NO_MEMORY = -4
    INVALID_PARAM = -5
    UNREACHABLE = -6
    INVALID_ADDR = -7
    NOT_IMPLEMENTED = -8
    MESSAGE_TRUNCATED = -9
    NO_PROGRESS = -10
    BUFFER_TOO_SMALL = -11
    NO_ELEM = -12
    SOME_CONNECTS_FAILED = -13
    NO_DEVICE = -14
    BUSY = -15
    CANCELED = -16
    SHMEM_SEGMENT = -17
    ALREADY_EXISTS = -18
    OUT_OF_RANGE = -19
    TIMED_OUT = -20
    EXCEEDS_LIMIT = -21
    UNSUPPORTED = -22
    REJECTED = -23
    NOT_CONNECTED = -24
    CONNECTION_RESET = -25
    ENDPOINT_TIMEOUT = -80


def status_name(st: int) -> str:
    try:
        return Status(st).name
    except ValueError:
        return f"status {st}"


class UcxCallError(TransportError):
    """A libucp call returned an error status."""

    def __init__(self, what: str, status: int):
        super().__init__(f"{what} failed: UCS_ERR_{status_name(status)} ({status})")
        self.status = status


class MemoryType(IntEnum):
    """``ucs_memory_type_t``."""

    HOST = 0
    CUDA = 1


# -- structures (ucp.h) ------------------------------------------------------------------
class _MemMapParams(C.Structure):  # ucp_mem_map_params_t
    _fields_ = [
        ("field_mask", C.c_uint64),  # which of the fields below are set (_MM_* bits)
        ("address", C.c_void_p),
        ("length", C.c_size_t),
        ("flags", C.c_uint),
        ("prot", C.c_uint),
        ("memory_type", C.c_int),  # ucs_memory_type_t
        ("exported_memh_buffer", C.c_void_p),
    ]


_MM_ADDRESS, _MM_LENGTH, _MM_MEMORY_TYPE = 1 << 0, 1 << 1, 1 << 4

_SEND_CB = C.CFUNCTYPE(None, C.c_void_p, C.c_int, C.c_void_p)  # (request, status, user_data)


class _RequestParam(C.Structure):
    _fields_ = [
        ("op_attr_mask", C.c_uint32),
        ("flags", C.c_uint32),
        ("request", C.c_void_p),
        ("cb", C.c_void_p),  # union of callbacks; we only use the send form
        ("datatype", C.c_uint64),
        ("user_data", C.c_void_p),
        ("reply_buffer", C.c_void_p),
        ("memory_type", C.c_int),
        ("recv_info", C.c_void_p),
        ("memh", C.c_void_p),
    ]


_OP_CALLBACK, _OP_USER_DATA, _OP_FLAGS, _OP_MEMORY_TYPE, _OP_MEMH = 1 << 1, 1 << 2, 1 << 4, 1 << 6, 1 << 8

AM_SEND_FLAG_REPLY, AM_SEND_FLAG_EAGER = 1 << 0, 1 << 1


class _AmRecvParam(C.Structure):
    _fields_ = [("recv_attr", C.c_uint64), ("reply_ep", C.c_void_p)]


_AM_RECV_CB = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_void_p, C.c_size_t, C.c_void_p, C.c_size_t, C.POINTER(_AmRecvParam))
_AM_ATTR_REPLY_EP, _AM_ATTR_FLAG_RNDV = 1 << 0, 1 << 17


class _AmHandlerParam(C.Structure):
    _fields_ = [
        ("field_mask", C.c_uint64),
        ("id", C.c_uint),
        ("flags", C.c_uint32),
        ("cb", _AM_RECV_CB),
        ("arg", C.c_void_p),
    ]


_AMH_ID, _AMH_FLAGS, _AMH_CB = 1 << 0, 1 << 1, 1 << 2
_AM_FLAG_WHOLE_MSG = 1 << 0


class _WorkerAttr(C.Structure):
    _fields_ = [("field_mask", C.c_uint64), ("thread_mode", C.c_int)]  # prefix of ucp_worker_attr_t


_UCS_ERR_LAST = -100

_PRINT_CONFIG, _PRINT_HIDDEN = 1 << 0, 1 << 3  # ucs_config_print_flags_t


def _printed(write: Callable[[int], None]) -> str:
    """What ``write(FILE *)`` prints, through a libc memory stream."""
    libc = C.CDLL(None)
    libc.open_memstream.restype = C.c_void_p
    libc.open_memstream.argtypes = [C.POINTER(C.c_void_p), C.POINTER(C.c_size_t)]
    libc.fclose.argtypes = [C.c_void_p]
    libc.free.argtypes = [C.c_void_p]
    buf, size = C.c_void_p(), C.c_size_t()
    stream = libc.open_memstream(C.byref(buf), C.byref(size))
    if not stream:
        raise OSError(C.get_errno(), "open_memstream failed")
    try:
        write(stream)
    finally:
        libc.fclose(stream)  # sets buf and size
    try:
        return C.string_at(buf, size.value).decode(errors="replace") if buf.value else ""
    finally:
        libc.free(buf)


def _ptr_status(ptr: int | None) -> int | None:
    """Decode a ``ucs_status_ptr_t``: None = done, negative = error, else a request."""
    if not ptr:
        return None
    v = C.c_int64(ptr).value
    if _UCS_ERR_LAST < v < 0:
        return v
    return 0x7FFF_FFFF  # a live request


# -- the library ------------------------------------------------------------------------
class Ucp:
    """libucp functions with their prototypes; one per process (see :func:`load`)."""

    def __init__(self, lib: C.CDLL):
        self.lib = lib
        P, S = C.c_void_p, C.c_size_t
        self._proto("ucp_mem_map", C.c_int, [P, C.POINTER(_MemMapParams), C.POINTER(P)])
        self._proto("ucp_mem_unmap", C.c_int, [P, P])
        self._proto("ucp_rkey_pack", C.c_int, [P, P, C.POINTER(P), C.POINTER(S)])
        self._proto("ucp_rkey_buffer_release", None, [P])
        self._proto("ucp_ep_rkey_unpack", C.c_int, [P, P, C.POINTER(P)])
        self._proto("ucp_rkey_destroy", None, [P])
        self._proto("ucp_put_nbx", P, [P, P, S, C.c_uint64, P, C.POINTER(_RequestParam)])
        self._proto("ucp_get_nbx", P, [P, P, S, C.c_uint64, P, C.POINTER(_RequestParam)])
        self._proto("ucp_ep_flush_nbx", P, [P, C.POINTER(_RequestParam)])
        self._proto("ucp_request_free", None, [P])
        self._proto("ucp_worker_signal", C.c_int, [P])
        self._proto("ucp_worker_query", C.c_int, [P, C.POINTER(_WorkerAttr)])
        self._proto("ucp_worker_set_am_recv_handler", C.c_int, [P, C.POINTER(_AmHandlerParam)])
        self._proto("ucp_am_send_nbx", P, [P, C.c_uint, P, S, P, S, C.POINTER(_RequestParam)])
        self._proto("ucp_config_read", C.c_int, [C.c_char_p, C.c_char_p, C.POINTER(P)])
        self._proto("ucp_config_print", None, [P, P, C.c_char_p, C.c_int])
        self._proto("ucp_config_release", None, [P])
        # completions: one C callback for every flush and send; user_data keys this table
        self._pending: dict[int, Callable[[int], None]] = {}
        self._keys = itertools.count(1)
        self._lock = threading.Lock()
        self._send_cb = _SEND_CB(self._on_complete)
        self._no_cb = _RequestParam(op_attr_mask=0)

    def _proto(self, name: str, restype, argtypes) -> None:
        f = getattr(self.lib, name)
        f.restype = restype
        f.argtypes = argtypes

    # -- completions ----------------------------------------------------------------------
    def _on_complete(self, request: int | None, status: int, user_data: int | None) -> None:
        # runs on ucxx's progress thread, with the GIL (ctypes callback)
        with self._lock:
            fn = self._pending.pop(user_data or 0, None)
        if request:
            self.lib.ucp_request_free(request)
        if fn is not None:
            try:
                fn(status)
            except Exception:  # an exception must not unwind into libucp
                log.exception("UCX completion callback failed")

    def _param_with_cb(self, on_done: Callable[[int], None], flags: int = 0) -> tuple[_RequestParam, int]:
        key = next(self._keys)
        with self._lock:
            self._pending[key] = on_done
        p = _RequestParam(op_attr_mask=_OP_CALLBACK | _OP_USER_DATA | (_OP_FLAGS if flags else 0), flags=flags)
        p.cb = C.cast(self._send_cb, C.c_void_p)
        p.user_data = key
        return p, key

    def _finish_post(self, ptr: int | None, key: int, on_done: Callable[[int], None], what: str) -> None:
        st = _ptr_status(ptr)
        if st is None or st < 0:
            with self._lock:
                self._pending.pop(key, None)
            on_done(Status.OK if st is None else st)

    # -- worker ---------------------------------------------------------------------------
    def worker_thread_mode(self, worker: int) -> int:
        """``ucs_thread_mode_t`` of the worker (2 = multi-thread safe)."""
        attr = _WorkerAttr(field_mask=1)
        st = self.lib.ucp_worker_query(worker, C.byref(attr))
        if st:
            raise UcxCallError("ucp_worker_query", st)
        return int(attr.thread_mode)

    def signal(self, worker: int) -> None:
        """Wake the progress thread out of its epoll wait."""
        self.lib.ucp_worker_signal(worker)

    def set_am_handler(self, worker: int, am_id: int, fn: Callable[[bytes, int], None]) -> object:
        """Route whole active messages with ``am_id`` to ``fn(data, reply_ep)`` (progress thread).

        Returns the C callback object, which the caller keeps alive as long as the worker.

        Raises:
            UcxCallError: libucp refused the handler.
        """

        def handler(arg, header, header_len, data, length, param) -> int:
            try:
                p = param.contents
                if p.recv_attr & _AM_ATTR_FLAG_RNDV:
                    log.warning("dropping a rendezvous active message of %d B (kvxfer sends eager only)", length)
                    return Status.OK
                reply = p.reply_ep if p.recv_attr & _AM_ATTR_REPLY_EP else 0
                fn(C.string_at(data, length) if length else b"", reply or 0)
            except Exception:
                log.exception("active message handler failed")
            return Status.OK

        cb = _AM_RECV_CB(handler)
        prm = _AmHandlerParam(field_mask=_AMH_ID | _AMH_FLAGS | _AMH_CB, id=am_id, flags=_AM_FLAG_WHOLE_MSG, cb=cb)
        st = self.lib.ucp_worker_set_am_recv_handler(worker, C.byref(prm))
        if st:
            raise UcxCallError("ucp_worker_set_am_recv_handler", st)
        return cb

    # -- configuration --------------------------------------------------------------------
    def context_variables(self) -> frozenset[str]:
        """The ``UCX_*`` variables this UCX's context configuration reads (hidden ones included;
        deprecated names, which UCX reports as unused, are not listed).

        Raises:
            UcxCallError: ``ucp_config_read`` failed.
        """
        cfg = C.c_void_p()
        st = self.lib.ucp_config_read(None, None, C.byref(cfg))
        if st:
            raise UcxCallError("ucp_config_read", st)
        try:
            text = _printed(lambda stream: self.lib.ucp_config_print(cfg, stream, None, _PRINT_CONFIG | _PRINT_HIDDEN))
        finally:
            self.lib.ucp_config_release(cfg)
        return frozenset(line.split("=", 1)[0] for line in text.splitlines() if line.startswith("UCX_") and "=" in line)

    # -- memory ---------------------------------------------------------------------------
    def mem_map(self, context: int, address: int, length: int, memory_type: MemoryType) -> int:
        """Register ``length`` bytes at ``address``; returns the ``ucp_mem_h``.

        Raises:
            UcxCallError: registration failed.
        """
        prm = _MemMapParams(field_mask=_MM_ADDRESS | _MM_LENGTH | _MM_MEMORY_TYPE, address=address,
                            length=length, memory_type=int(memory_type))
        memh = C.c_void_p()
        st = self.lib.ucp_mem_map(context, C.byref(prm), C.byref(memh))
        if st:
            raise UcxCallError(f"ucp_mem_map of {length} B at {address:#x}", st)
        return int(memh.value or 0)

    def mem_unmap(self, context: int, memh: int) -> None:
        st = self.lib.ucp_mem_unmap(context, memh)
        if st:
            log.warning("ucp_mem_unmap failed: %s", status_name(st))

    def rkey_pack(self, context: int, memh: int) -> bytes:
        """The packed remote key of a registration (bytes a peer unpacks)."""
        buf, size = C.c_void_p(), C.c_size_t()
        st = self.lib.ucp_rkey_pack(context, memh, C.byref(buf), C.byref(size))
        if st:
            raise UcxCallError("ucp_rkey_pack", st)
        try:
            return C.string_at(buf, size.value)
        finally:
            self.lib.ucp_rkey_buffer_release(buf)

    def rkey_unpack(self, ep: int, packed: bytes) -> int:
        """Unpack a peer's remote key for endpoint ``ep``; returns the ``ucp_rkey_h``."""
        rk = C.c_void_p()
        st = self.lib.ucp_ep_rkey_unpack(ep, packed, C.byref(rk))
        if st:
            raise UcxCallError("ucp_ep_rkey_unpack", st)
        return int(rk.value or 0)

    def rkey_destroy(self, rkey: int) -> None:
        self.lib.ucp_rkey_destroy(rkey)

    def request_param(self, memh: int = 0) -> _RequestParam:
        """A parameter block for RMA posts without callbacks (optionally naming the local memh)."""
        if not memh:
            return self._no_cb
        return _RequestParam(op_attr_mask=_OP_MEMH, memh=memh)

    # -- RMA ------------------------------------------------------------------------------
    def post_rma(self, put: bool, ep: int, local: list[int], remote: list[int], lengths: list[int],
                 rkeys: list[int], params: list[_RequestParam]) -> None:
        """Post one put (or get) per range; completion is observed by a later flush.

        Raises:
            UcxCallError: a post failed at once (earlier posts may be in flight).
        """
        fn = self.lib.ucp_put_nbx if put else self.lib.ucp_get_nbx
        free = self.lib.ucp_request_free
        byref = C.byref
        for la, ra, ln, rk, prm in zip(local, remote, lengths, rkeys, params):
            ptr = fn(ep, la, ln, ra, rk, byref(prm))
            if ptr:
                v = C.c_int64(ptr).value
                if _UCS_ERR_LAST < v < 0:
                    raise UcxCallError("ucp_put_nbx" if put else "ucp_get_nbx", v)
                free(ptr)  # released when it completes; the flush reports completion

    def flush(self, ep: int, on_done: Callable[[int], None]) -> None:
        """Call ``on_done(status)`` once every operation posted on ``ep`` is remotely complete
        (possibly at once, on this thread; else on the progress thread)."""
        prm, key = self._param_with_cb(on_done)
        ptr = self.lib.ucp_ep_flush_nbx(ep, C.byref(prm))
        self._finish_post(ptr, key, on_done, "ucp_ep_flush_nbx")

    def am_send(self, ep: int, am_id: int, data: bytes, on_done: Callable[[int], None]) -> None:
        """Send ``data`` as an eager active message; ``on_done(status)`` when it is sent
        (``data`` must stay alive until then: the caller holds it in ``on_done``'s closure)."""
        prm, key = self._param_with_cb(on_done, AM_SEND_FLAG_REPLY | AM_SEND_FLAG_EAGER)
        # host bytes, said so: else UCX detects the buffer's memory type on every send, which
        # asks the CUDA driver when ucxx has turned UCX's memory-type cache off (its default)
        prm.op_attr_mask |= _OP_MEMORY_TYPE
        prm.memory_type = MemoryType.HOST
        ptr = self.lib.ucp_am_send_nbx(ep, am_id, None, 0, data, len(data), C.byref(prm))
        self._finish_post(ptr, key, on_done, "ucp_am_send_nbx")


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One registered local region: address, length, ``ucp_mem_h`` and its packed rkey."""

    address: int
    length: int
    memh: int
    rkey: bytes


@dataclass(frozen=True, slots=True)
class RemoteKey:
    """A peer's region as unpacked on one endpoint."""

    address: int
    length: int
    rkey: int


_ucp: Ucp | None = None
_load_lock = threading.Lock()


def load() -> Ucp:
    """The process's libucp binding (loaded through ``libucx``, as ucxx does).

    Raises:
        BackendUnavailableError: libucx is missing or lacks a symbol kvxfer needs.
    """
    global _ucp
    with _load_lock:
        if _ucp is None:
            try:
                import libucx

                libs = libucx.load_library()
                lib = next(lb for lb in libs if "libucp" in str(getattr(lb, "_name", "")))
                _ucp = Ucp(lib)
            except (ImportError, OSError, AttributeError, StopIteration) as exc:
                raise BackendUnavailableError(f"libucp could not be loaded through libucx: {exc!r}") from None
        return _ucp
