"""``kvxfer-registry``: run the embedded registry server (console script).

Layer: registry, command line. ``--redis URL`` runs no server: it checks the Redis registry is
reachable and keeps sweeping its leases and TTLs so that expiry events flow even while no
client is active (clients sweep on every operation too).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ..errors import KvxferError
from .base import DEFAULT_PORT
from .server import AsyncRegistryServer, ServerConfig

__all__ = ["main"]

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvxfer-registry", description="kvxfer request registry")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--token", default=None, help="shared token every client must present")
    p.add_argument("--redis", default=None, metavar="URL",
                   help="redis://host:port/db: sweep a Redis registry instead of serving one")
    p.add_argument("--sweep-interval", type=float, default=0.25, help="seconds between Redis sweeps")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


async def _serve(args: argparse.Namespace) -> None:
    server = AsyncRegistryServer(ServerConfig(host=args.host, port=args.port, token=args.token))
    await server.start()
    print(f"kvxfer-registry serving {server.url}", flush=True)  # tests and scripts read the port here
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


async def _sweep(args: argparse.Namespace) -> None:
    from .base import parse_registry_url
    from .redis_store import AsyncRedisRegistry

    store = await AsyncRedisRegistry.connect(parse_registry_url(args.redis), name="kvxfer-registry-sweeper",
                                             token=args.token)
    print(f"kvxfer-registry sweeping {args.redis}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        try:
            await store.sweep()
        except KvxferError as exc:
            log.warning("sweep failed: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), timeout=args.sweep_interval)
        except TimeoutError:
            pass
    await store.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kvxfer-registry``; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_sweep(args) if args.redis else _serve(args))
    except OSError as exc:
        print(f"kvxfer-registry: cannot bind {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except KvxferError as exc:
        print(f"kvxfer-registry: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
