"""Decode worker: receives each request's KV blocks through kvxfer, then decodes N tokens.

Layer: example (an engine's decode instance). One process, one device, its own paged cache and
block allocator. When a request arrives it allocates blocks for the prompt and the tokens to
come (scattered, like any engine) and at once asks kvxfer for the prompt's KV: ``pull`` (read
the producer's published blocks) or ``expect`` (let the producer write them, layer by layer).
Transfers of several requests run while other requests decode; a request decodes once its KV
is in place and the prefill's first token has come (through the driver). Requests take turns,
one token each, and are computed one at a time, so every token is bit-identical to the
one-process reference.

A transfer that fails (producer lost, request expired, cancelled) fails only its request: it
is reported ``failed``, its blocks go back to the free list, the others go on.

Commands (stdin): request {id, prompt_len, n_new}, first_token {id, token}, cancel {id, reason},
report, shutdown. Events (stdout): ready, done {id, tokens, kv_bytes, kv_done_at, decode_s},
failed {id, error}, report {free, total, whole, outstanding, backends}.
"""

from __future__ import annotations

import queue
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .channel import Message, emit, read_commands
from .common import Mode, Worker, build_worker, worker_parser
from .model import OutOfBlocksError, blocks_for

__all__ = ["DecodeServer", "main"]


@dataclass(slots=True)
class _Request:
    rid: str
    prompt_len: int
    n_new: int
    blocks: list[int]
    table: torch.Tensor
    handle: Any = None              # kvxfer TransferHandle of the KV transfer
    kv_done_at: float | None = None  # wall clock when the transfer finished
    kv_ok: bool = False
    tokens: list[int] = field(default_factory=list)
    decode_s: float = 0.0

    @property
    def runnable(self) -> bool:
        return self.kv_ok and bool(self.tokens)


class DecodeServer:
    """Serves decode commands for one worker (single thread; transfer callbacks only enqueue)."""

    def __init__(self, worker: Worker, inbox: queue.Queue[Message]):
        self.w = worker
        self.inbox = inbox
        self.reqs: dict[str, _Request] = {}
        self._early_tokens: dict[str, int] = {}
        self._stopping = False

    # -- commands -----------------------------------------------------------------------
    def request(self, rid: str, prompt_len: int, n_new: int) -> None:
        """Allocate blocks for the request and start receiving its prompt's KV."""
        from kvxfer import KvxferError

        w = self.w
        try:
            # K/V is written for every position but the last generated token's
            blocks = w.alloc.allocate(blocks_for(prompt_len + n_new - 1, w.cfg.block_size))
        except OutOfBlocksError as exc:
            emit("failed", id=rid, error=f"no KV blocks for it: {exc}")
            return
        r = _Request(rid, prompt_len, n_new, blocks, w.model.table(blocks))
        self.reqs[rid] = r
        kv_blocks = blocks[:blocks_for(prompt_len, w.cfg.block_size)]
        start = w.connector.pull if w.mode is Mode.PULL else w.connector.expect
        try:
            r.handle = start(rid, kv_blocks, timeout=w.timeout)
        except KvxferError as exc:  # refused at once (registry down, duplicate id ...)
            self._fail(r, f"{type(exc).__name__}: {exc}")
            return
        if rid in self._early_tokens:
            r.tokens.append(self._early_tokens.pop(rid))

        def landed(h: Any) -> None:  # runs on a kvxfer thread: stamp the time, let the loop act
            r.kv_done_at = time.time()
            self.inbox.put({"op": "_transferred", "id": rid})
        r.handle.add_done_callback(landed)

    def transferred(self, rid: str) -> None:
        r = self.reqs.get(rid)
        if r is None:
            return
        exc = r.handle.exception()
        if exc is not None:
            self._fail(r, f"{type(exc).__name__}: {exc}")
        else:
            r.kv_ok = True

    def first_token(self, rid: str, token: int) -> None:
        r = self.reqs.get(rid)
        if r is None:
            self._early_tokens[rid] = token  # the request command is still on its way
        elif not r.tokens:
            r.tokens.append(token)

    def cancel(self, rid: str, reason: str) -> None:
        """Give up a request (the driver knows its KV will never come)."""
        from kvxfer import KvxferError

        r = self.reqs.get(rid)
        if r is None:
            return
        if r.handle is not None and not r.handle.done():
            try:
                self.w.connector.requests.cancel(rid, reason)
            except KvxferError:
                pass  # unknown to the registry (never published): the local handle failed anyway
            if not r.handle.done():
                return  # its transfer callback reports the failure
        self._fail(r, f"cancelled: {reason}")

    # -- decoding -----------------------------------------------------------------------
    def step(self, r: _Request) -> None:
        """Generate one token of ``r`` (or finish it)."""
        if len(r.tokens) < r.n_new:
            t0 = time.perf_counter()
            r.tokens.append(self.w.model.decode_step(self.w.cache, r.table, r.tokens[-1],
                                                     r.prompt_len + len(r.tokens) - 1))
            r.decode_s += time.perf_counter() - t0
        if len(r.tokens) >= r.n_new:
            del self.reqs[r.rid]
            self.w.alloc.free(r.blocks)
            emit("done", id=r.rid, tokens=r.tokens, kv_bytes=int(r.handle.nbytes), kv_done_at=r.kv_done_at,
                 decode_s=r.decode_s)

    def _fail(self, r: _Request, error: str) -> None:
        if self.reqs.pop(r.rid, None) is None:
            return
        self.w.alloc.free(r.blocks)
        emit("failed", id=r.rid, error=error)

    def report(self) -> None:
        a = self.w.alloc
        emit("report", free=a.num_free, total=a.num_blocks, whole=a.is_whole(), outstanding=sorted(self.reqs),
             backends=sorted({p.backend for p in self.w.connector.peers}))

    # -- loop ---------------------------------------------------------------------------
    def _handle(self, msg: Message) -> None:
        op = msg.get("op")
        if op == "request":
            self.request(str(msg["id"]), int(msg["prompt_len"]), int(msg["n_new"]))
        elif op == "_transferred":
            self.transferred(str(msg["id"]))
        elif op == "first_token":
            self.first_token(str(msg["id"]), int(msg["token"]))
        elif op == "cancel":
            self.cancel(str(msg["id"]), str(msg.get("reason", "cancelled by the driver")))
        elif op == "report":
            self.report()
        elif op == "shutdown":
            self._stopping = True
        else:
            print(f"decode: unknown command {msg!r}", file=sys.stderr)

    def serve(self) -> None:
        """Handle commands and decode, round robin, until ``shutdown``; blocks when idle."""
        while not self._stopping:
            runnable = [r for r in self.reqs.values() if r.runnable]
            try:
                msg: Message | None = self.inbox.get(block=not runnable)
            except queue.Empty:
                msg = None
            while msg is not None:
                self._handle(msg)
                try:
                    msg = self.inbox.get_nowait()
                except queue.Empty:
                    msg = None
            for r in runnable:
                if r.rid in self.reqs:
                    self.step(r)

    def close(self) -> None:
        self.w.connector.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m examples.disagg.decode_worker --name ... --registry ...``."""
    args = worker_parser(__doc__.splitlines()[0]).parse_args(argv)
    inbox: queue.Queue[Message] = queue.Queue()
    read_commands(inbox)
    w = build_worker(args, allocator_seed=2)
    server = DecodeServer(w, inbox)
    emit("ready", name=args.name, backends=w.connector.backends, num_blocks=w.alloc.num_blocks,
         block_nbytes=w.block_nbytes, device=str(w.device))
    try:
        server.serve()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
