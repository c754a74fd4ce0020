"""Prefill worker: runs prompts, hands each request's KV blocks to decode through kvxfer.

Layer: example (an engine's prefill instance). One process, one device, its own paged cache and
block allocator. Per request (in arrival order, one at a time, as a single GPU would):

* pull mode: prefill the prompt into freshly allocated (scattered) blocks, then ``publish`` them;
  the decode worker reads them whenever it is ready.
* push mode: prefill layer by layer and ``push`` each layer to the decode worker's blocks as
  soon as it is computed, so the transfer overlaps the rest of the prefill.

The blocks are freed only when the registry reports the request finished (``finished()``:
consumed, failed or expired), never earlier; ``report`` says whether the free list is whole.

Fault hook (for the tests): ``--die-during RID`` makes the process exit abruptly in the middle
of request RID: in pull mode right after publishing it (before decode could read it), in push
mode once half of its layers were written to decode. Before starting RID it waits until every
earlier request was handed off, so exactly one request is in flight when it dies.

Commands (stdin): prefill {id, tokens}, report, shutdown. Events (stdout): ready, started,
prefilled {id, first_token, prefill_s, kv_ready_at, kv_bytes, blocks}, prefill_failed, released,
report {free, total, whole, outstanding}.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time

from .channel import Message, emit, read_commands
from .common import Mode, Worker, build_worker, sync, worker_parser
from .model import blocks_for

__all__ = ["PrefillServer", "main"]


class PrefillServer:
    """Serves prefill commands for one worker; frees blocks as the registry reports them done."""

    def __init__(self, worker: Worker, die_during: str | None = None):
        self.w = worker
        self.die_during = die_during
        self._owned: dict[str, list[int]] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="reaper", daemon=True)
        self._reaper.start()

    # -- block ownership ----------------------------------------------------------------
    def _reap(self) -> None:
        from kvxfer import TransferTimeoutError

        agent = self.w.connector.requests
        while not self._stop.is_set():
            try:
                fin = agent.wait_finished(timeout=0.5)
            except TransferTimeoutError:
                continue
            self._release(fin.request_id, fin.kind.value, fin.reason)

    def _release(self, rid: str, how: str, reason: str = "") -> None:
        with self._cond:
            blocks = self._owned.pop(rid, None)
            if blocks is None:
                return  # already released (a failed push and the registry's event both report it)
            self.w.alloc.free(blocks)
            self._cond.notify_all()
        emit("released", id=rid, how=how, reason=reason)

    def _wait_owned_empty(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._owned, timeout)

    # -- requests -----------------------------------------------------------------------
    def prefill(self, rid: str, tokens: list[int]) -> None:
        """Prefill one request and hand its KV over (publish, or push layer by layer)."""
        from kvxfer import KvxferError

        w = self.w
        emit("started", id=rid)
        dying = rid == self.die_during
        if dying and not self._wait_owned_empty(timeout=30):
            print(f"prefill: earlier requests still held before {rid!r}", file=sys.stderr)
        blocks = w.alloc.allocate(blocks_for(len(tokens), w.cfg.block_size))
        with self._cond:
            self._owned[rid] = blocks
        table = w.model.table(blocks)
        t0 = time.perf_counter()
        try:
            if w.mode is Mode.PULL:
                first = w.model.prefill(w.cache, table, tokens)
                sync(w.device)
                prefill_s = time.perf_counter() - t0
                kv_ready_at = time.time()
                w.connector.publish(rid, blocks, ttl=w.timeout)
                if dying:
                    self._die(rid, "after publishing it")
            else:
                pushes = []
                ready_at: list[float] = []

                def on_layer(i: int) -> None:
                    sync(w.device)
                    last = i == w.cfg.n_layers - 1
                    h = w.connector.push(rid, blocks, layers=[i], last=last, timeout=w.timeout)
                    h.add_done_callback(lambda h: self._push_done(rid, h))
                    pushes.append(h)
                    if last:
                        ready_at.append(time.time())  # all KV computed; its last layer is on its way
                    if dying and len(pushes) == max(1, w.cfg.n_layers // 2):
                        for p in pushes:  # let half the layers land on the decode side first
                            p.wait(timeout=w.timeout)
                        self._die(rid, f"after pushing {len(pushes)} of {w.cfg.n_layers} layers")

                first = w.model.prefill(w.cache, table, tokens, on_layer_done=on_layer)
                prefill_s = time.perf_counter() - t0
                kv_ready_at = ready_at[0]
        except KvxferError as exc:
            self._release(rid, "prefill failed", f"{type(exc).__name__}: {exc}")
            emit("prefill_failed", id=rid, error=f"{type(exc).__name__}: {exc}")
            return
        emit("prefilled", id=rid, first_token=first, prefill_s=prefill_s, kv_ready_at=kv_ready_at,
             blocks=len(blocks), kv_bytes=len(blocks) * w.block_nbytes)

    def _push_done(self, rid: str, handle: object) -> None:
        exc = handle.exception()  # type: ignore[attr-defined]
        if exc is not None:
            self._release(rid, "push failed", f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _die(rid: str, when: str) -> None:
        print(f"prefill: dying in the middle of {rid!r} ({when}), as asked", file=sys.stderr, flush=True)
        os._exit(17)

    def report(self, timeout: float) -> None:
        """Wait (bounded) for the registry to release every request, then report the free list."""
        self._wait_owned_empty(timeout)
        with self._cond:
            outstanding = sorted(self._owned)
        emit("report", free=self.w.alloc.num_free, total=self.w.alloc.num_blocks,
             whole=self.w.alloc.is_whole(), outstanding=outstanding,
             backends=sorted({p.backend for p in self.w.connector.peers}))

    def close(self) -> None:
        self._stop.set()
        self._reaper.join(2)
        self.w.connector.close()

    def serve(self, inbox: queue.Queue[Message]) -> None:
        """Handle commands until ``shutdown``."""
        while True:
            msg = inbox.get()
            op = msg.get("op")
            if op == "prefill":
                self.prefill(str(msg["id"]), [int(t) for t in msg["tokens"]])
            elif op == "report":
                self.report(float(msg.get("timeout", 15.0)))
            elif op == "shutdown":
                return
            else:
                print(f"prefill: unknown command {msg!r}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m examples.disagg.prefill_worker --name ... --registry ...``."""
    p = worker_parser(__doc__.splitlines()[0])
    p.add_argument("--die-during", default=None, metavar="RID",
                   help="exit abruptly in the middle of request RID (fault-injection hook)")
    args = p.parse_args(argv)
    inbox: queue.Queue[Message] = queue.Queue()
    read_commands(inbox)
    w = build_worker(args, allocator_seed=1)
    server = PrefillServer(w, die_during=args.die_during)
    emit("ready", name=args.name, backends=w.connector.backends, num_blocks=w.alloc.num_blocks,
         block_nbytes=w.block_nbytes, device=str(w.device))
    try:
        server.serve(inbox)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
