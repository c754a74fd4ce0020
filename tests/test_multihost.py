"""Across hosts: registry, prefill and decode each in their own network namespace.

Over TCP and over UCX (tcp transport): pull and push through the registry, a cable pulled in
the middle of a transfer, a host's processes killed, the registry host killed and restarted.
Every byte the decode side receives is compared with what the prefill side holds, and the
blocks it did not ask for must stay zero. Skips with the reason where namespaces are not
permitted (needs root and iproute2) or, for the UCX cases, where ucxx is not importable.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from netns import Party, PartyError, RegistryProc, Topology, expected_blocks, netns_unavailable

_WHY_NOT = netns_unavailable()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"multi-host tests skipped: {_WHY_NOT}")

NUM_BLOCKS, BLOCK_KIB, LAYERS = 64, 16, 2
LEASE_S = 1.5
TIMEOUT_S = 4.0  # each party's transfer deadline
FAILURES = {"PeerLostError", "TransferTimeoutError", "RequestFailedError", "RemoteTransferError", "TransportError",
            "RegistryUnavailableError", "RegistryTimeoutError"}


def _ucxx_missing() -> str | None:
    try:
        import ucxx  # noqa: F401
    except Exception as exc:
        return f"ucxx is not importable here ({exc!r})"
    return None


@pytest.fixture(params=["tcp", "ucx"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "ucx" and (why := _ucxx_missing()):
        pytest.skip(why)
    return request.param


class Hosts:
    """The registry, a prefill party and a decode party, each on its own host."""

    def __init__(self, topo: Topology, backend: str):
        self.topo, self.backend = topo, backend
        self.registry = RegistryProc(topo)
        self.parties: list[Party] = []
        self.prefill = self.party("prefill", "prefill-0", seed=1)
        self.decode = self.party("decode", "decode-0", seed=None)

    def party(self, role: str, name: str, seed: int | None) -> Party:
        p = Party(self.topo, role, name, self.registry.url, backend=self.backend, seed=seed, lease_s=LEASE_S,
                  timeout=TIMEOUT_S, num_blocks=NUM_BLOCKS, block_kib=BLOCK_KIB, layers=LAYERS)
        self.parties.append(p)
        return p

    def close(self) -> None:
        for p in self.parties:
            p.close()


@pytest.fixture
def hosts(backend: str) -> Iterator[Hosts]:
    with Topology(["registry", "prefill", "decode"]) as topo:  # torn down even when the test fails
        h = None
        try:
            h = Hosts(topo, backend)
            yield h
        finally:
            if h is not None:
                h.close()


def _check_bytes(decode: Party, src: list[int], dst: list[int], seed: int = 1) -> None:
    got = decode.blocks(list(range(NUM_BLOCKS)))
    want = expected_blocks(seed, src, NUM_BLOCKS, BLOCK_KIB, LAYERS)
    per_block = BLOCK_KIB * 1024
    for layer in range(LAYERS):
        for i, d in enumerate(dst):
            assert got[layer][d * per_block:(d + 1) * per_block] == want[layer][i * per_block:(i + 1) * per_block], \
                f"layer {layer}: block {d} differs from producer block {src[i]}"
        untouched = set(range(NUM_BLOCKS)) - set(dst)
        assert all(not any(got[layer][b * per_block:(b + 1) * per_block]) for b in untouched), "stray bytes written"


def _pull(h: Hosts, rid: str, src: list[int], dst: list[int], timeout: float = 30) -> None:
    h.prefill.call("publish", rid=rid, blocks=src, ttl=60)
    handle = h.decode.call("pull", rid=rid, dst=dst, timeout=timeout)
    h.decode.call("wait", h=handle, timeout=timeout + 10, reply_timeout=timeout + 20)


def _wait_until(what: str, fn, limit: float) -> float:
    """Call ``fn`` until it returns True (bounded by ``limit`` seconds); the time it took."""
    t0 = time.monotonic()
    for _ in range(int(limit / 0.1) + 1):
        if fn():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {limit} s")


def _knows(asker: Party, name: str) -> bool:
    try:
        asker.call("lookup", name=name, reply_timeout=15)
        return True
    except PartyError as exc:
        assert exc.kind in ("UnknownConnectorError", "RegistryUnavailableError", "RegistryTimeoutError"), exc
        return False


def _blocks(seed: int, n: int) -> tuple[list[int], list[int]]:
    import random

    rng = random.Random(seed)
    return rng.sample(range(NUM_BLOCKS), n), rng.sample(range(NUM_BLOCKS), n)


def test_pull_and_push_through_the_registry(hosts: Hosts) -> None:
    src, dst = _blocks(1, 20)
    _pull(hosts, "req-pull", src, dst)
    _check_bytes(hosts.decode, src, dst)
    rid, kind, _ = hosts.prefill.call("finished", timeout=10)
    assert (rid, kind) == ("req-pull", "consumed")

    # push: the decode side expects, the prefill side writes one layer at a time
    src2, dst2 = _blocks(2, 12)
    dst2 = [d for d in range(NUM_BLOCKS) if d not in dst][:12]
    exp = hosts.decode.call("expect", rid="req-push", dst=dst2, timeout=30)
    pushes = [hosts.prefill.call("push", rid="req-push", src=src2, layers=[i], last=i == LAYERS - 1, timeout=30)
              for i in range(LAYERS)]
    for p in pushes:
        hosts.prefill.call("wait", h=p, timeout=30, reply_timeout=40)
    hosts.decode.call("wait", h=exp, timeout=30, reply_timeout=40)
    _check_bytes(hosts.decode, src + src2, dst + dst2)
    assert hosts.prefill.call("finished", timeout=10)[:2] == ["req-push", "consumed"]


def test_link_down_mid_transfer_then_back(hosts: Hosts) -> None:
    topo = hosts.topo
    # slow the decode host's link so that a 2 MiB pull takes a few seconds
    topo.rate_limit("decode", 4)
    src = list(range(NUM_BLOCKS))
    hosts.prefill.call("publish", rid="cut", blocks=src, ttl=60)
    handle = hosts.decode.call("pull", rid="cut", dst=src, timeout=20)
    time.sleep(0.6)
    topo.link("decode", up=False)
    t0 = time.monotonic()
    try:
        with pytest.raises(PartyError) as err:
            hosts.decode.call("wait", h=handle, timeout=TIMEOUT_S + 15, reply_timeout=TIMEOUT_S + 25)
        assert err.value.kind in FAILURES, err.value
        assert time.monotonic() - t0 < TIMEOUT_S + 5, "the pending transfer did not fail within its timeout"
        # the registry drops the unreachable decode party once its lease runs out
        _wait_until("registry dropping the cut-off party", lambda: not _knows(hosts.prefill, "decode-0"), LEASE_S + 10)
        rid, kind, reason = hosts.prefill.call("finished", timeout=10)
        assert rid == "cut" and kind in ("failed", "expired", "cancelled"), (kind, reason)
    finally:
        topo.link("decode", up=True)
        topo.rate_limit("decode", None)
    # nothing restarted: the decode party registers again and new transfers succeed
    _wait_until("decode party back in the registry", lambda: _knows(hosts.prefill, "decode-0"), 40)
    src2, dst2 = _blocks(3, 16)
    _pull(hosts, "after-cut", src2, dst2)
    got = hosts.decode.blocks(dst2)
    assert got == expected_blocks(1, src2, NUM_BLOCKS, BLOCK_KIB, LAYERS)


def test_prefill_host_killed(hosts: Hosts) -> None:
    topo = hosts.topo
    topo.rate_limit("decode", 4)
    src = list(range(NUM_BLOCKS))
    hosts.prefill.call("publish", rid="doomed", blocks=src, ttl=60)
    handle = hosts.decode.call("pull", rid="doomed", dst=src, timeout=20)
    time.sleep(0.6)
    assert topo.kill_host("prefill"), "no process ran on the prefill host"
    t0 = time.monotonic()
    with pytest.raises(PartyError) as err:
        hosts.decode.call("wait", h=handle, timeout=TIMEOUT_S + 15, reply_timeout=TIMEOUT_S + 25)
    assert err.value.kind in FAILURES, err.value
    assert time.monotonic() - t0 < TIMEOUT_S + 5
    topo.rate_limit("decode", None)
    _wait_until("registry dropping the dead party", lambda: not _knows(hosts.decode, "prefill-0"), LEASE_S + 10)
    # a new prefill process on that host: the decode side serves it without a restart
    hosts.prefill = hosts.party("prefill", "prefill-0", seed=7)
    src2, dst2 = _blocks(4, 16)
    _pull(hosts, "reborn", src2, dst2)
    assert hosts.decode.blocks(dst2) == expected_blocks(7, src2, NUM_BLOCKS, BLOCK_KIB, LAYERS)


def test_registry_host_killed_and_restarted(hosts: Hosts) -> None:
    topo = hosts.topo
    src, dst = _blocks(5, 10)
    hosts.prefill.call("publish", rid="survivor", blocks=src, ttl=60)
    assert topo.kill_host("registry"), "no process ran on the registry host"
    time.sleep(0.5)
    hosts.registry.start()
    # both parties reconnect and register again by themselves; the producer publishes again
    _wait_until("parties back in the restarted registry",
                lambda: _knows(hosts.decode, "prefill-0") and _knows(hosts.prefill, "decode-0"), 40)
    handle = None
    for _ in range(50):  # the republish follows the reconnect by a moment
        try:
            handle = hosts.decode.call("pull", rid="survivor", dst=dst, timeout=5)
            hosts.decode.call("wait", h=handle, timeout=20, reply_timeout=30)
            break
        except PartyError as exc:
            assert exc.kind in FAILURES | {"UnknownRequestError", "RegistryTimeoutError"}, exc
            time.sleep(0.2)
    else:
        pytest.fail("the request published before the registry restart was never served")
    _check_bytes(hosts.decode, src, dst)
    src2, _ = _blocks(6, 8)
    dst2 = [d for d in range(NUM_BLOCKS) if d not in dst][:8]
    _pull(hosts, "after-restart", src2, dst2)
    _check_bytes(hosts.decode, src + src2, dst + dst2)
