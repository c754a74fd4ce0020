"""examples/vllm/proxy.py and check.py against fake vLLM OpenAI servers (CPU, stdlib only).

The fake upstreams are ``http.server`` servers on port 0 that record every request and answer
as vLLM 0.33's OpenAI server does: JSON bodies with ``kv_transfer_params`` from a producer,
SSE over chunked transfer encoding when streaming, OpenAI error bodies. The client side is
``http.client``: neither end shares code with the proxy. Checks: what each upstream received
(prefill copy, kv_transfer_params handed from prefill to decode, round robin), what the client
received (bodies, SSE events in order ending with ``[DONE]``, error statuses), that streaming
is relayed as it arrives, that the proxy process shuts down cleanly on SIGTERM, and that
check.py passes on agreeing answers and fails on differing ones.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
PROXY_PY = ROOT / "examples" / "vllm" / "proxy.py"
CHECK_PY = ROOT / "examples" / "vllm" / "check.py"


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


proxy_mod = _load("kvxfer_vllm_proxy", PROXY_PY)
check_mod = _load("kvxfer_vllm_check", CHECK_PY)

WAIT = 10.0  # no wait in these tests is unbounded
MODEL = "fake/model"


# -- a fake vLLM OpenAI server ----------------------------------------------------------------

class FakeVllm(ThreadingHTTPServer):
    """Records requests; answers like vLLM. ``role``: "prefill" returns kv_transfer_params when
    asked for a remote decode; "decode" streams when asked. ``fail``: (status, body) for every
    generation request. ``gate``: a streaming answer waits on it after its first event."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, name: str, role: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name, self.role = name, role
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.fail: tuple[int, dict[str, Any]] | None = None
        self.no_params = False
        self.gate: threading.Event | None = None
        self.gate_passed: bool | None = None
        self.arrived = threading.Event()
        self.hold: threading.Event | None = None  # a prefill answer waits on it
        self.hold_passed: bool | None = None
        self.endless = False  # stream until a write fails (at most 400 events, 20 s)
        self.stream_broken = threading.Event()
        self.events_sent = 0
        self.break_off = False  # close the connection after the first event
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):  # the proxy hung up on a stalled answer: expected
            super().handle_error(request, client_address)

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r["body"] for r in self.requests if r["body"] is not None]


def _completion(path: str, body: dict[str, Any], text: str) -> dict[str, Any]:
    if path == "/v1/chat/completions":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": "length", "stop_reason": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
        obj = "text_completion"
    return {"id": "cmpl-1", "object": obj, "created": 1, "model": body.get("model"), "choices": [choice],
            "usage": {"prompt_tokens": 5, "total_tokens": 5 + len(text.split()),
                      "completion_tokens": len(text.split())},
            "kv_transfer_params": None}


def _chunks(path: str, words: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, w in enumerate(words):
        if path == "/v1/chat/completions":
            delta = {"role": "assistant", "content": ""} if i == 0 else {"content": w}
            out.append({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]})
        else:
            out.append({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
                        "choices": [{"index": 0, "text": w, "logprobs": None, "finish_reason": None}]})
    return out


def words_for(server: str, prompt: Any) -> list[str]:
    """What a fake decode instance generates for ``prompt``, piece by piece when streaming."""
    return ["", f" {server}", " says", f" {str(prompt)[:20]}", " end"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeVllm

    def log_message(self, *args: Any) -> None:
        pass

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: Any) -> None:
        with self.server.lock:
            self.server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
        self.server.arrived.set()

    def do_GET(self) -> None:
        self._record(None)
        if self.path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": self.server.name}]})
        else:
            self._send_json(404, {"error": {"message": "Not Found", "type": "NotFoundError", "param": None, "code": 404}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._record(body)
        srv = self.server
        if srv.fail is not None:
            self._send_json(*srv.fail)
            return
        params = body.get("kv_transfer_params") or {}
        if srv.role == "prefill":
            if srv.hold is not None:
                srv.hold_passed = srv.hold.wait(WAIT)
            answer = _completion(self.path, body, "x")
            if params.get("do_remote_decode") and not srv.no_params:
                answer["kv_transfer_params"] = {"do_remote_prefill": True, "do_remote_decode": False,
                                                "kvxfer_id": params.get("kvxfer_id"), "producer": srv.name}
            self._send_json(200, answer)
            return
        prompt = body.get("prompt", body.get("messages"))
        words = words_for(srv.name, prompt)
        if not body.get("stream"):
            self._send_json(200, _completion(self.path, body, "".join(words)))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if srv.endless:
            try:
                for i in range(400):
                    self._chunk(f"data: {json.dumps(_chunks(self.path, [str(i)])[0])}\n\n".encode())
                    srv.events_sent = i + 1
                    time.sleep(0.05)
            except ConnectionError:
                srv.stream_broken.set()
            self.close_connection = True
            return
        for i, chunk in enumerate(_chunks(self.path, words)):
            self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
            if i == 0 and srv.break_off:
                self.close_connection = True
                return
            if i == 0 and srv.gate is not None:
                srv.gate_passed = srv.gate.wait(WAIT)
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


# -- the proxy, in a thread with its own event loop -------------------------------------------

class ProxyThread:
    def __init__(self, prefill: list[str], decode: list[str], mode: str = "pull", **kw: Any):
        cfg = proxy_mod.ProxyConfig(tuple(map(proxy_mod.Upstream.parse, prefill)),
                                    tuple(map(proxy_mod.Upstream.parse, decode)), proxy_mod.Mode(mode), **kw)
        self.proxy = proxy_mod.Proxy(cfg)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start("127.0.0.1", 0), self.loop).result(WAIT)
        self.port = self.proxy.port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.shutdown(2.0), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)


def post(px: ProxyThread, path: str, body: Any, conn: http.client.HTTPConnection | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
    c = conn or px.conn()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = c.getresponse()
    raw = resp.read()
    if conn is None:
        c.close()
    return resp.status, raw, resp


def sse_events(raw: bytes) -> list[str]:
    assert raw.endswith(b"\n\n"), raw[-40:]
    return [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]


@pytest.fixture
def upstreams():
    made: list[FakeVllm] = []

    def make(n_prefill: int, n_decode: int) -> tuple[list[FakeVllm], list[FakeVllm]]:
        pre = [FakeVllm(f"prefill{i}", "prefill") for i in range(n_prefill)]
        dec = [FakeVllm(f"decode{i}", "decode") for i in range(n_decode)]
        made.extend(pre + dec)
        return pre, dec

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def proxies():
    made: list[ProxyThread] = []

    def make(pre: list[FakeVllm], dec: list[FakeVllm], mode: str = "pull", **kw: Any) -> ProxyThread:
        px = ProxyThread([s.url for s in pre], [s.url for s in dec], mode, **kw)
        made.append(px)
        return px

    yield make
    for px in made:
        px.close()


# -- generation -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_non_streaming_hands_kv_params_from_prefill_to_decode(upstreams, proxies, path):
    (pre,), (dec,) = upstreams(1, 1)
    px = proxies([pre], [dec])
    prompt = "The capital of France is" if path == "/v1/completions" else None
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 16, "temperature": 0,
                            "stream_options": {"include_usage": True}, "min_tokens": 4}
    if prompt:
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
        body["max_completion_tokens"] = 16
    status, raw, resp = post(px, path, body, headers={"Authorization": "Bearer k"})
    assert status == 200, raw
    answer = json.loads(raw)
    expected = "".join(words_for("decode0", body.get("prompt", body.get("messages"))))
    got = answer["choices"][0]["text"] if prompt else answer["choices"][0]["message"]["content"]
    assert got == expected
    assert resp.getheader("Content-Type") == "application/json"

    (p_req,), (d_req,) = pre.requests, dec.requests
    assert p_req["path"] == d_req["path"] == path
    pb, db = p_req["body"], d_req["body"]
    xid = pb["kv_transfer_params"]["kvxfer_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", xid)
    assert pb["kv_transfer_params"] == {"do_remote_decode": True, "kvxfer_id": xid}
    assert pb["max_tokens"] == 1 and pb["stream"] is False
    assert "stream_options" not in pb and "min_tokens" not in pb
    if not prompt:
        assert pb["max_completion_tokens"] == 1
    # the decode instance gets the client's request as sent, plus the producer's params verbatim
    assert db == dict(body, kv_transfer_params={"do_remote_prefill": True, "do_remote_decode": False,
                                                "kvxfer_id": xid, "producer": "prefill0"})
    for r in (p_req, d_req):
        assert r["headers"]["authorization"] == "Bearer k"
        assert r["headers"]["x-request-id"] == xid


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_relays_sse_events_in_order_as_they_arrive(upstreams, proxies, path):
    (pre,), (dec,) = upstreams(1, 1)
    dec.gate = threading.Event()  # the decode server holds back all but its first event until we saw it
    px = proxies([pre], [dec])
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "stream": True}
    if path == "/v1/completions":
        body["prompt"] = "abc"
    else:
        body["messages"] = [{"role": "user", "content": "abc"}]
    c = px.conn()
    c.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    resp = c.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type", "").startswith("text/event-stream")
    first = b""
    while not first.endswith(b"\n\n"):
        line = resp.readline()
        assert line, "stream ended before its first event"
        first += line
    assert dec.gate_passed is None  # still held: the first event came through on its own
    dec.gate.set()
    raw = first + resp.read()
    c.close()
    assert dec.gate_passed is True
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    expected = [json.dumps(ch) for ch in _chunks(path, words_for("decode0", body.get("prompt", body.get("messages"))))]
    assert events[:-1] == expected
    assert pre.bodies()[0]["stream"] is False and dec.bodies()[0]["stream"] is True


def test_round_robin_over_two_prefill_and_two_decode(upstreams, proxies):
    pre, dec = upstreams(2, 2)
    px = proxies(pre, dec)
    ids = []
    for i in range(6):
        status, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": f"p{i}", "max_tokens": 4})
        assert status == 200, raw
        text = json.loads(raw)["choices"][0]["text"]
        assert text.split()[0] == f"decode{i % 2}"
    for side in (pre, dec):
        assert [[b.get("prompt") for b in s.bodies()] for s in side] == [["p0", "p2", "p4"], ["p1", "p3", "p5"]]
    # each decode request carries the params of the prefill instance that served the same prompt
    for s in dec:
        for b in s.bodies():
            i = int(b["prompt"][1:])
            ids.append(b["kv_transfer_params"]["kvxfer_id"])
            assert b["kv_transfer_params"]["producer"] == f"prefill{i % 2}"
            p_body = next(pb for pb in pre[i % 2].bodies() if pb["prompt"] == b["prompt"])
            assert p_body["kv_transfer_params"]["kvxfer_id"] == b["kv_transfer_params"]["kvxfer_id"]
    assert len(set(ids)) == 6


def test_concurrent_streams(upstreams, proxies):
    pre, dec = upstreams(2, 2)
    px = proxies(pre, dec)
    results: dict[int, list[str]] = {}

    def one(i: int) -> None:
        _, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": f"q{i}", "stream": True})
        results[i] = sse_events(raw)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert sorted(results) == list(range(8))
    for i, events in results.items():
        assert events[-1] == "[DONE]"
        assert [json.loads(e)["choices"][0]["text"] for e in events[1:3]] in (
            [f" decode{d}", " says"] for d in (0, 1))
        assert json.loads(events[3])["choices"][0]["text"] == f" q{i}"
    assert sum(len(s.requests) for s in dec) == 8 and all(len(s.requests) == 4 for s in pre + dec)


def test_push_mode_sends_both_halves_at_once(upstreams, proxies):
    (pre,), (dec,) = upstreams(1, 1)
    pre.hold = dec.arrived  # the prefill answer waits until the decode instance has its request
    px = proxies([pre], [dec], mode="push")
    status, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 4})
    assert status == 200, raw
    assert pre.hold_passed is True
    (pb,), (db,) = pre.bodies(), dec.bodies()
    xid = pb["kv_transfer_params"]["kvxfer_id"]
    assert pb["kv_transfer_params"] == {"do_remote_decode": True, "kvxfer_id": xid}
    assert db["kv_transfer_params"] == {"do_remote_prefill": True, "do_remote_decode": False, "kvxfer_id": xid}


def test_keep_alive_serves_several_requests_on_one_connection(upstreams, proxies):
    (pre,), (dec,) = upstreams(1, 1)
    px = proxies([pre], [dec])
    c = px.conn()
    for i, stream in enumerate([False, True, False]):
        status, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": f"k{i}", "stream": stream}, conn=c)
        assert status == 200
        if stream:
            assert sse_events(raw)[-1] == "[DONE]"
        else:
            assert json.loads(raw)["choices"][0]["text"].split()[-2] == f"k{i}"
    c.close()
    assert len(dec.requests) == 3


def test_a_client_that_leaves_mid_stream_cuts_the_decode_stream(upstreams, proxies):
    (pre,), (dec,) = upstreams(1, 1)
    dec.endless = True
    px = proxies([pre], [dec])
    c = px.conn()
    c.request("POST", "/v1/completions", body=json.dumps({"model": MODEL, "prompt": "x", "stream": True}))
    resp = c.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    c.close()  # the client goes away; vLLM aborts a request whose connection closes
    assert dec.stream_broken.wait(WAIT)
    assert dec.events_sent < 100
    status, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": "after"})  # still serving
    assert status == 200 and "after" in json.loads(raw)["choices"][0]["text"]


def test_a_decode_stream_that_breaks_off_ends_the_client_stream_early(upstreams, proxies):
    (pre,), (dec,) = upstreams(1, 1)
    dec.break_off = True
    px = proxies([pre], [dec])
    c = px.conn()
    c.request("POST", "/v1/completions", body=json.dumps({"model": MODEL, "prompt": "x", "stream": True}))
    resp = c.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead) as err:
        resp.read()
    assert err.value.partial.startswith(b"data: ") and b"[DONE]" not in err.value.partial
    c.close()


# -- errors -----------------------------------------------------------------------------------

def test_prefill_error_is_returned_with_its_status_and_decode_is_not_asked(upstreams, proxies):
    (pre,), (dec,) = upstreams(1, 1)
    err = {"error": {"message": "This model's maximum context length is 8 tokens", "type": "BadRequestError",
                     "param": None, "code": 400}}
    pre.fail = (400, err)
    px = proxies([pre], [dec])
    status, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": "long " * 20})
    assert status == 400
    assert json.loads(raw) == err
    assert dec.requests == []


@pytest.mark.parametrize("stream", [False, True])
def test_decode_error_is_returned_with_its_status(upstreams, proxies, stream):
    (pre,), (dec,) = upstreams(1, 1)
    err = {"error": {"message": "The model `nope` does not exist.", "type": "NotFoundError", "param": None, "code": 404}}
    dec.fail = (404, err)
    px = proxies([pre], [dec])
    status, raw, _ = post(px, "/v1/chat/completions", {"model": "nope", "messages": [], "stream": stream})
    assert status == 404
    assert json.loads(raw) == err


def test_prefill_without_kv_transfer_params_is_a_502_naming_the_cause(upstreams, proxies):
    (pre,), (dec,) = upstreams(1, 1)
    pre.no_params = True
    px = proxies([pre], [dec])
    status, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 502
    assert "returned no kv_transfer_params" in json.loads(raw)["error"]["message"]
    assert dec.requests == []


def test_an_upstream_that_is_down_is_skipped_and_all_down_is_a_502(upstreams, proxies):
    pre, dec = upstreams(1, 2)
    dead = dec[0].url
    dec[0].stop()
    px = proxies(pre, dec)
    for i in range(3):
        status, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": f"d{i}"})
        assert status == 200, raw
        assert json.loads(raw)["choices"][0]["text"].split()[0] == "decode1"
    dec[1].stop()
    status, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": "z"})
    assert status == 502
    msg = json.loads(raw)["error"]["message"]
    assert "no decode upstream accepted the connection" in msg and dead in msg


def test_a_silent_upstream_is_a_504(upstreams, proxies):
    (pre,), (dec,) = upstreams(1, 1)
    pre.hold = threading.Event()  # never set: the prefill answer stalls past the proxy's timeout
    px = proxies([pre], [dec], timeout=0.5)
    t0 = time.monotonic()
    status, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": "slow"})
    assert status == 504 and time.monotonic() - t0 < WAIT
    assert "did not answer within 0.5 s" in json.loads(raw)["error"]["message"]
    pre.hold.set()


def test_bad_requests(upstreams, proxies):
    (pre,), (dec,) = upstreams(1, 1)
    px = proxies([pre], [dec], max_body=1000)
    status, raw, _ = post(px, "/v1/completions", b"{not json")
    assert status == 400 and "not JSON" in json.loads(raw)["error"]["message"]
    status, raw, _ = post(px, "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in json.loads(raw)["error"]["message"]
    status, raw, _ = post(px, "/v1/embeddings", {"model": MODEL})
    assert status == 404 and "/v1/embeddings" in json.loads(raw)["error"]["message"]
    status, raw, _ = post(px, "/v1/completions", {"prompt": "x" * 2000})
    assert status == 413
    status, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]})
    assert status == 400 and "one prompt per request" in json.loads(raw)["error"]["message"]
    status, raw, _ = post(px, "/v1/chat/completions", {"model": MODEL, "messages": [], "n": 2})
    assert status == 400 and "n=2" in json.loads(raw)["error"]["message"]
    c = px.conn()
    c.request("GET", "/v1/completions")
    resp = c.getresponse()
    assert resp.status == 405 and json.loads(resp.read())["error"]["code"] == 405
    c.close()
    assert pre.requests == [] and dec.requests == []


# -- pass-through -----------------------------------------------------------------------------

def test_models_and_health(upstreams, proxies):
    pre, dec = upstreams(2, 2)
    px = proxies(pre, dec)
    c = px.conn()
    c.request("GET", "/v1/models")
    resp = c.getresponse()
    assert resp.status == 200
    assert json.loads(resp.read())["data"][0]["owned_by"] == "decode0"
    c.request("GET", "/health")
    resp = c.getresponse()
    assert resp.status == 200
    health = json.loads(resp.read())
    assert health["status"] == "ok"
    assert health["prefill"] == {s.url: 200 for s in pre} and health["decode"] == {s.url: 200 for s in dec}
    c.close()
    dec[1].stop()
    c = px.conn()
    c.request("GET", "/health")
    resp = c.getresponse()
    assert resp.status == 503
    health = json.loads(resp.read())
    assert health["status"] == "degraded" and str(health["decode"][dec[1].url]).startswith("unreachable")
    c.close()


def test_a_prompt_of_token_ids_is_one_prompt(upstreams, proxies):
    (pre,), (dec,) = upstreams(1, 1)
    px = proxies([pre], [dec])
    status, raw, _ = post(px, "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3], "n": 1})
    assert status == 200, raw
    assert pre.bodies()[0]["prompt"] == dec.bodies()[0]["prompt"] == [1, 2, 3]


def test_upstream_urls_are_checked():
    for bad in ("https://h:1", "h:1", "http://h:1/v1", "http://:1"):
        with pytest.raises(ValueError, match="expected http://host"):
            proxy_mod.Upstream.parse(bad)
    assert proxy_mod.Upstream.parse("http://localhost:8100/") == proxy_mod.Upstream("http://localhost:8100", "localhost", 8100)


# -- the command line and a clean shutdown ------------------------------------------------------

def test_cli_serves_and_drains_a_stream_in_flight_on_sigterm(upstreams):
    pre, dec = upstreams(2, 2)
    gate = threading.Event()
    for d in dec:
        d.gate = gate
    proc = subprocess.Popen(
        [sys.executable, str(PROXY_PY), "--prefill", *(s.url for s in pre), "--decode", *(s.url for s in dec),
         "--port", "0", "--grace", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(m.group(1))
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        for i in range(2):
            c.request("POST", "/v1/completions", body=json.dumps({"model": MODEL, "prompt": f"c{i}"}))
            resp = c.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["choices"][0]["text"].split()[0] == f"decode{i}"
        c.close()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        c.request("POST", "/v1/completions", body=json.dumps({"model": MODEL, "prompt": "s", "stream": True}))
        resp = c.getresponse()
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)  # a stream is in flight: it finishes, then the proxy exits
        time.sleep(0.3)
        assert proc.poll() is None
        gate.set()
        events = sse_events(first + resp.read())
        assert events[-1] == "[DONE]" and len(events) == 6
        c.close()
        assert proc.wait(WAIT) == 0
        with pytest.raises(ConnectionRefusedError):
            http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT).request("GET", "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        proc.stdout.close()
        proc.stderr.close()


def test_cli_rejects_bad_urls():
    out = subprocess.run([sys.executable, str(PROXY_PY), "--prefill", "https://a:1", "--decode", "http://b:2"],
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 2 and "expected http://host" in out.stderr


# -- examples/vllm/check.py against the same fakes --------------------------------------------

def test_check_passes_when_answers_agree_and_fails_when_they_differ(upstreams, proxies, capsys):
    pre, dec = upstreams(1, 2)
    px = proxies(pre, [dec[0]])
    url = f"http://127.0.0.1:{px.port}"
    assert check_mod.main(["--proxy", url, "--reference", dec[0].url, "--model", MODEL]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == 2 * len(check_mod.PROMPTS) and "FAIL" not in out
    # every proxied request went through prefill first; the reference was asked directly
    assert len(pre[0].requests) == 4 * len(check_mod.PROMPTS)
    assert all(b["kv_transfer_params"]["do_remote_decode"] for b in pre[0].bodies())
    direct = [b for b in dec[0].bodies() if "kv_transfer_params" not in b]
    assert len(direct) == 2 * len(check_mod.PROMPTS) and all(b["temperature"] == 0 for b in direct)

    # a reference that generates something else: every comparison fails, exit 1
    assert check_mod.main(["--proxy", url, "--reference", dec[1].url, "--model", MODEL]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == 2 * len(check_mod.PROMPTS) and "!= reference" in out
    # the first 3 characters (" de") agree: --compare-chars 3 passes
    assert check_mod.main(["--proxy", url, "--reference", dec[1].url, "--model", MODEL, "--compare-chars", "3"]) == 0
    capsys.readouterr()


def test_check_reports_an_upstream_error(upstreams, proxies, capsys):
    (pre,), (dec,) = upstreams(1, 1)
    pre.fail = (400, {"error": {"message": "too long", "type": "BadRequestError", "param": None, "code": 400}})
    px = proxies([pre], [dec])
    assert check_mod.main(["--proxy", f"http://127.0.0.1:{px.port}", "--reference", dec.url, "--model", MODEL]) == 1
    out = capsys.readouterr().out
    assert "answered 400" in out and "too long" in out


# -- the bodies the proxy builds, under vLLM 0.33's own request models (vLLM's venv only) ------

def test_bodies_are_valid_vllm_requests_carrying_kv_transfer_params():
    completion = pytest.importorskip("vllm.entrypoints.openai.completion.protocol",
                                     reason="vllm is not installed here; run this file with the python of vLLM's venv")
    chat = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
    from vllm.exceptions import VLLMValidationError

    refused = (ValueError, VLLMValidationError)

    def limit(req: Any) -> int:  # as vLLM's serving code computes it (chat: max_completion_tokens first)
        asked = getattr(req, "max_completion_tokens", None)
        return get_max_tokens(4096, asked if asked is not None else req.max_tokens, 5, {})

    cases = [
        (completion.CompletionRequest, {"model": MODEL, "prompt": "hi", "max_tokens": 16, "min_tokens": 4,
                                        "stream": True, "stream_options": {"include_usage": True}}),
        (chat.ChatCompletionRequest, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                      "max_completion_tokens": 16, "min_tokens": 4, "stream": True,
                                      "stream_options": {"include_usage": True}}),
    ]
    for model_cls, body in cases:
        pre = proxy_mod.prefill_body(body, "abc")
        req = model_cls.model_validate(pre)
        assert limit(req) == 1 and req.stream is False
        sp = req.to_sampling_params(limit(req), {})
        assert sp.extra_args["kv_transfer_params"] == {"do_remote_decode": True, "kvxfer_id": "abc"}
        # what the proxy drops, vLLM would refuse in a one-token, unstreamed request
        with pytest.raises(refused, match="stream"):
            model_cls.model_validate(dict(pre, stream_options={"include_usage": True}))
        with pytest.raises(refused, match="min_tokens"):
            model_cls.model_validate(dict(pre, min_tokens=4)).to_sampling_params(1, {})
        params = {"do_remote_prefill": True, "do_remote_decode": False, "kvxfer_id": "abc",
                  "kvxfer_spec": {"model": MODEL}}
        dec = model_cls.model_validate(dict(body, kv_transfer_params=params))
        assert dec.to_sampling_params(4096, {}).extra_args["kv_transfer_params"] == params
