"""A small prefill/decode proxy for two vLLM instances joined by kvxfer (see README.md).

For each OpenAI completion or chat request it picks a transfer id, sends the prefill instance
a copy with ``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode": true, "kvxfer_id":
ID}``, then sends the decode instance the original request with the ``kv_transfer_params`` the
prefill instance returned, and streams the decode instance's answer back. In push mode both go
out at once: the prefill instance writes each layer into the decode instance's blocks as it
computes it.

Needs aiohttp (vLLM installs it). Run: ``python proxy.py --prefill http://127.0.0.1:8100
--decode http://127.0.0.1:8200 --port 8000 [--mode push]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

log = logging.getLogger("kvxfer-proxy")


def _prefill_body(body: dict[str, Any], xid: str) -> dict[str, Any]:
    pre = dict(body)
    pre.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True, "kvxfer_id": xid})
    if "max_completion_tokens" in pre:
        pre["max_completion_tokens"] = 1
    pre.pop("stream_options", None)
    return pre


class Proxy:
    def __init__(self, prefill: str, decode: str, mode: str, timeout_s: float):
        self.prefill = prefill.rstrip("/")
        self.decode = decode.rstrip("/")
        self.mode = mode
        self.session: ClientSession | None = None
        self.timeout = ClientTimeout(total=timeout_s)

    async def start(self, app: web.Application) -> None:
        self.session = ClientSession(timeout=self.timeout)

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def _prefill(self, path: str, body: dict[str, Any], xid: str) -> dict[str, Any]:
        assert self.session is not None
        async with self.session.post(self.prefill + path, json=_prefill_body(body, xid)) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise web.HTTPBadGateway(text=f"prefill instance answered {resp.status}: {data}")
        params = data.get("kv_transfer_params")
        if not params:
            raise web.HTTPBadGateway(text="prefill instance returned no kv_transfer_params; is kvxfer configured there?")
        return params

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body = await request.json()
        xid = uuid.uuid4().hex
        if self.mode == "push":
            # the decode side expects the transfer while the prefill side computes and writes it
            prefill = asyncio.ensure_future(self._prefill(request.path, body, xid))
            params: dict[str, Any] = {"do_remote_prefill": True, "kvxfer_id": xid}
        else:
            prefill = None
            params = await self._prefill(request.path, body, xid)
        dec = dict(body, kv_transfer_params=params)
        async with self.session.post(self.decode + request.path, json=dec) as resp:
            out = web.StreamResponse(status=resp.status, headers={"Content-Type": resp.headers.get("Content-Type", "application/json")})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
        if prefill is not None:
            try:
                await prefill
            except web.HTTPException as exc:
                log.warning("request %s: prefill side failed: %s", xid, exc.text)
        return out

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"prefill": self.prefill, "decode": self.decode, "mode": self.mode})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefill", required=True, help="base URL of the prefill vLLM instance (kv_producer)")
    p.add_argument("--decode", required=True, help="base URL of the decode vLLM instance (kv_consumer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mode", choices=["pull", "push"], default="pull", help="must match kv_connector_extra_config.mode")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per upstream request")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    proxy = Proxy(args.prefill, args.decode, args.mode, args.timeout)
    app = web.Application()
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_post("/v1/completions", proxy.handle)
    app.router.add_post("/v1/chat/completions", proxy.handle)
    app.router.add_get("/healthz", proxy.health)
    web.run_app(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
