"""The UCX backend's engine room: ucxx's context and worker, the progress thread, the work thread.

Layer: backends/ucx, above :mod:`~kvxfer.backends.ucx.ucp` and below the links and the backend.
ucxx owns the UCX context, the worker and the progress thread (which runs every UCX callback);
kvxfer adds one work thread, where everything that may block or take locks runs (a callback
hands work over with :meth:`Worker.defer`), and the creation and closing of endpoints.

ucxx is imported here, at first use (:func:`import_ucxx`), never when kvxfer is imported.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ...errors import BackendUnavailableError, KvxferError, PeerLostError, RemoteProtocolError
from ..base import BackendLink
from . import ucp as _ucp
from .messages import AM_ID

__all__ = ["UCXX_CONTEXT_VARIABLES", "Worker", "import_ucxx"]

log = logging.getLogger(__name__)

# The variables ucxx's import sets for UCX's context configuration when the user has not
# (ucxx/__init__.py). A transport's setting that ucxx may also set (UCX_CUDA_COPY_MAX_REG_RATIO)
# is not read by the context configuration and is left alone.
UCXX_CONTEXT_VARIABLES = ("UCX_MEMTYPE_CACHE", "UCX_RNDV_THRESH", "UCX_RNDV_FRAG_MEM_TYPE", "UCX_MAX_RNDV_RAILS",
                          "UCX_PROTO_ENABLE")

_import_lock = threading.Lock()


def import_ucxx() -> Any:
    """ucxx's binding module (``ucxx._lib.libucxx``), imported at the first call.

    Importing ucxx sets UCX variables in the environment when the user has not, among them
    ``UCX_MEMTYPE_CACHE=n``, which UCX 1.19 and later no longer read and report, in every
    process, as an unused variable. Of the context variables that this import added
    (:data:`UCXX_CONTEXT_VARIABLES`), the ones the installed UCX does not read are taken out
    again, before any UCX context reads the environment. A variable the user set is never
    touched, and neither is the environment when ucxx was imported before kvxfer imported it.

    Raises:
        ImportError: ucxx is not importable.
    """
    with _import_lock:
        fresh = "ucxx" not in sys.modules
        before = {k for k in os.environ if k.startswith("UCX_")}
        import ucxx._lib.libucxx as libucxx

        added = [k for k in UCXX_CONTEXT_VARIABLES if fresh and k in os.environ and k not in before]
        if added:
            try:
                known = _ucp.load().context_variables()
            except KvxferError as exc:
                log.debug("cannot ask UCX which variables it reads (%s); leaving %s as ucxx set them", exc, added)
                return libucxx
            for k in added:
                if k not in known:
                    log.debug("unsetting %s (set by ucxx's import): this UCX does not read it", k)
                    del os.environ[k]
        return libucxx


class Worker:
    """One UCX context and worker (ucxx's), its progress thread and kvxfer's work thread.

    ``on_message(data, reply_ep)`` receives every control message (active message
    :data:`~kvxfer.backends.ucx.messages.AM_ID`) on the progress thread.

    Raises (constructor):
        BackendUnavailableError: UCX cannot start here (no usable transport, libucp missing).
        ImportError: ucxx is not importable.
    """

    def __init__(self, on_message: Callable[[bytes, int], None], *, polling: bool, wakeup_ms: int):
        self._ucxx = import_ucxx()
        self.ucp = _ucp.load()
        try:
            feats = (self._ucxx.Feature.AM, self._ucxx.Feature.RMA, self._ucxx.Feature.WAKEUP)
            self._ctx = self._ucxx.UCXContext({}, feature_flags=feats)
            self._worker = self._ucxx.UCXWorker(self._ctx)
        except Exception as exc:
            raise BackendUnavailableError(f"UCX could not start: {exc!r}") from None
        self.context = int(self._ctx.handle)  # ucp_context_h
        self.handle = int(self._worker.handle)  # ucp_worker_h
        self.address = self._worker.address.tobytes()
        self._wakeup_ms = wakeup_ms
        self._old_eps: list[Any] = []
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._am_cb = self.ucp.set_am_handler(self.handle, AM_ID, on_message)
        self.polling = polling
        self._worker.start_progress_thread(polling_mode=polling, epoll_timeout=wakeup_ms)
        self.stopping = threading.Event()  # set when the worker shuts down
        self._thread = threading.Thread(target=self._work_loop, name="kvxfer-ucx-work", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, Worker._shutdown, self._worker, self.stopping, self._work)

    # -- threads ----------------------------------------------------------------------------
    def wake(self) -> None:
        """Wake the progress thread after posting from another thread (a busy-polling one never
        sleeps: no signal, one system call less on every post)."""
        if not self.polling:
            self.ucp.signal(self.handle)

    def defer(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the work thread (never on the progress thread)."""
        self._work.put((fn, args))

    def on_work_thread(self) -> bool:
        """Whether the caller runs on the work thread (or the work thread has ended)."""
        return threading.current_thread() is self._thread or not self._thread.is_alive()

    def poll(self) -> None:
        """Restart the progress thread busy-polling (before any endpoint exists)."""
        if not self.polling:
            self._worker.stop_progress_thread()
            self._worker.start_progress_thread(polling_mode=True, epoll_timeout=self._wakeup_ms)
            self.polling = True

    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except RemoteProtocolError as exc:
                # the link is an argument, or the object whose bound method this is (link.on_message)
                link = next((a for a in (*args, getattr(fn, "__self__", None)) if isinstance(a, BackendLink)), None)
                log.warning("dropping link to %r: %s", getattr(getattr(link, "peer", None), "name", "?"), exc)
                if link is not None:
                    link.close(PeerLostError(f"link to {link.peer.name!r} dropped: {exc}"))
            except KvxferError as exc:
                log.warning("UCX work item failed: %s", exc)
            except Exception:
                log.exception("unexpected error in the UCX work thread")

    # -- endpoints --------------------------------------------------------------------------
    def endpoint(self, address: bytes, error_handling: bool) -> Any:
        """A ucxx endpoint to the worker at ``address``. Raises whatever ucxx raises."""
        ua = self._ucxx.UCXAddress.create_from_buffer(address)
        return self._ucxx.UCXEndpoint.create_from_worker_address(self._worker, ua, error_handling)

    def close_endpoint(self, ep: Any, failed: bool) -> None:
        """Close a link's endpoint (work thread). A failed endpoint is being torn down by
        ucxx's own error path on the progress thread: closing it again races that (and
        crashed in testing), so it is only kept referenced until the worker stops."""
        self._old_eps.append(ep)
        try:
            if failed or not ep.alive:
                return
            ep.remove_close_callback()
            ep.close()
        except Exception as exc:
            log.debug("closing a UCX endpoint: %r", exc)

    # -- closing ----------------------------------------------------------------------------
    @staticmethod
    def _shutdown(worker: Any, stop: threading.Event, work: queue.SimpleQueue) -> None:
        stop.set()
        work.put(None)
        try:
            worker.stop_progress_thread()
        except Exception:
            log.debug("stopping the UCX progress thread", exc_info=True)

    def shutdown(self, timeout: float) -> None:
        """Stop the progress thread and the work thread (after the work queued so far, waiting
        up to ``timeout`` seconds). Idempotent."""
        self._finalizer()
        self._thread.join(timeout)

    def release_endpoints(self) -> None:
        """Drop the closed endpoints kept since :meth:`close_endpoint` (after :meth:`shutdown`)."""
        self._old_eps.clear()
