"""The embedded server's socket shell: bad bytes drop one connection, the server keeps serving."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from kvxfer.protocol.frames import FrameType, encode_frame
from kvxfer.registry.client import connect_registry
from kvxfer.registry.messages import (Ack, FrameDecoder, Hello, Query, decode_reply, encode_request)
from kvxfer.registry.server import RegistryServer, ServerConfig


def _raw(srv: RegistryServer) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    return s


def _closed_by_server(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _still_serves(srv: RegistryServer) -> None:
    with connect_registry(srv.url, name=f"probe-{time.monotonic_ns()}") as c:
        c.register(b"m", 1.0)
        assert c.lookup(c.name) == b"m"


HELLO = encode_request(1, Hello(None, "raw"))


@pytest.mark.parametrize("payload, reason", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "magic"),
    (struct.pack("!4sBBHIQ", b"KVXF", 7, 32, 0, 0, 0), "version"),
    (struct.pack("!4sBBHIQ", b"KVXF", 1, 32, 0, 1 << 30, 0), "exceeds"),          # oversized header
    (struct.pack("!4sBBHIQ", b"KVXF", 1, 32, 0, 4, 1 << 40), "exceeds"),          # oversized payload
    (struct.pack("!4sBBHIQ", b"KVXF", 1, 32, 0, 3, 0) + b"\xc1\xc1\xc1", "msgpack"),
    (encode_request(1, Query("x")), "hello"),                                    # no hello first
    (HELLO + encode_frame(FrameType.REG_REQUEST, {"id": 2, "op": "publish", "request_id": 1}), "request_id"),
    (HELLO + encode_frame(FrameType.REG_REPLY, {"id": 2, "r": "ack"}), "REG_REQUEST"),
    (HELLO + HELLO, "hello sent twice"),
])
def test_bad_frames_drop_only_that_connection(payload, reason, caplog):
    with RegistryServer() as srv:
        bystander = connect_registry(srv.url, name="bystander")
        bystander.register(b"b", 1.0)
        with caplog.at_level(logging.WARNING, logger="kvxfer.registry.server"), _raw(srv) as s:
            s.sendall(payload)
            assert _closed_by_server(s)
        assert any(reason in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
        assert bystander.lookup("bystander") == b"b"   # an established client is unaffected
        _still_serves(srv)
        bystander.close()


def test_custom_header_limit_and_truncated_frame():
    with RegistryServer(config=ServerConfig(max_header_bytes=1024)) as srv:
        with _raw(srv) as s:
            s.sendall(HELLO + encode_request(2, Query("x" * 500)) + encode_frame(FrameType.REG_REQUEST, {"id": 3, "op": "query", "request_id": "y" * 2000}))
            assert _closed_by_server(s)
        with _raw(srv) as s:  # truncated: half a frame, then the client goes away
            s.sendall(HELLO[:10])
        _still_serves(srv)


def test_silent_client_is_dropped_after_hello_timeout():
    with RegistryServer(config=ServerConfig(hello_timeout_s=0.3)) as srv:
        with _raw(srv) as s:
            t0 = time.monotonic()
            assert _closed_by_server(s)
            assert time.monotonic() - t0 < 3
        _still_serves(srv)


def test_pipelined_requests_after_hello():
    with RegistryServer() as srv, _raw(srv) as s:
        s.sendall(HELLO + encode_request(2, Query("nope")))
        dec = FrameDecoder()
        replies = []
        while len(replies) < 2:
            dec.feed(s.recv(65536))
            replies.extend(decode_reply(f) for f in dec.frames())
        assert replies[0] == (1, Ack())
        assert replies[1][0] == 2 and replies[1][1].code.value == "unknown_request"


def test_binds_loopback_by_default():
    with RegistryServer() as srv:
        assert srv.url.startswith("kvxfer://127.0.0.1:")


def test_cli_serves_and_stops(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "kvxfer.registry.cli", "--port", "0", "--token", "t"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        line = proc.stdout.readline()
        assert line.startswith("kvxfer-registry serving kvxfer://127.0.0.1:"), line
        url = line.split()[-1]
        with connect_registry(url, name="cli-user", token="t") as c:
            c.register(b"m", 1.0)
            assert c.lookup("cli-user") == b"m"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_cli_refuses_busy_port():
    with RegistryServer() as srv:
        out = subprocess.run([sys.executable, "-m", "kvxfer.registry.cli", "--port", str(srv.port)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "cannot bind" in out.stderr
