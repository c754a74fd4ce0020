"""GPU memory over the TCP backend: packed on the GPU, staged through pinned host chunks."""

import multiprocessing as mp

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)"),
]
cupy = pytest.importorskip("cupy", reason="GPU staging needs cupy")

from kvpeers import caller_stream_ordering_checks  # noqa: E402


def _cache(nb, layers, seed, device):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2**15, (2, nb, 16, 8, 128), generator=g, dtype=torch.int16).to(device) for _ in range(layers)]


def _peer(conn, nb, layers, device):
    import kvxfer

    kv = _cache(nb, layers, 1, device)
    with kvxfer.Connector("gpu-peer", backend="tcp") as c:
        c.register(kv, block_dim=1)
        conn.send(c.metadata())
        while True:
            cmd = conn.recv()
            if cmd[0] == "exit":
                return
            ids = torch.as_tensor(cmd[1], device=device)
            conn.send([t.index_select(1, ids).cpu().numpy() for t in kv])


@pytest.mark.parametrize("peer_device", ["cuda:0", "cuda:1", "host"])
def test_gpu_cache_over_tcp_every_byte(peer_device):
    import kvxfer

    if peer_device == "cuda:1" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    nb, layers = 256, 4
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    if peer_device == "host":
        # a host-memory peer and a GPU-memory local side: the layouts are still compatible
        p = ctx.Process(target=_host_peer, args=(child, nb, layers), daemon=True)
    else:
        p = ctx.Process(target=_peer, args=(child, nb, layers, peer_device), daemon=True)
    p.start()
    meta = parent.recv()
    kv = _cache(nb, layers, 2, "cuda:0")
    rng = np.random.default_rng(0)
    with kvxfer.Connector("local", backend="tcp") as c:
        c.register(kv, block_dim=1)
        peer = c.connect(meta)
        src, dst = rng.choice(nb, 100, replace=False), rng.choice(nb, 100, replace=False)
        for t in kv:  # poison the destination
            t[:, torch.as_tensor(dst, device="cuda:0")] = -1
        c.read(peer, src, dst, layers=[0, 2, 3]).wait(60)
        parent.send(("blocks", src))
        remote = parent.recv()
        for i, t in enumerate(kv):
            got = t.index_select(1, torch.as_tensor(dst, device="cuda:0")).cpu().numpy()
            if i == 1:
                assert (got == -1).all()
            else:
                assert np.array_equal(got, remote[i])
        # write our blocks into the peer
        src2, dst2 = rng.choice(nb, 64, replace=False), rng.choice(nb, 64, replace=False)
        c.write(peer, src2, dst2).wait(60)
        parent.send(("blocks", dst2))
        remote = parent.recv()
        for i, t in enumerate(kv):
            assert np.array_equal(t.index_select(1, torch.as_tensor(src2, device="cuda:0")).cpu().numpy(), remote[i])
    parent.send(("exit",))
    p.join(30)


def _host_peer(conn, nb, layers):
    import kvxfer

    kv = [t.cpu() for t in _cache(nb, layers, 1, "cpu")]
    with kvxfer.Connector("host-peer", backend="tcp") as c:
        c.register(kv, block_dim=1)
        conn.send(c.metadata())
        while True:
            cmd = conn.recv()
            if cmd[0] == "exit":
                return
            ids = torch.as_tensor(cmd[1])
            conn.send([t.index_select(1, ids).numpy() for t in kv])


def test_gpu_transfers_over_tcp_wait_for_the_callers_stream():
    import kvxfer

    nb, layers = 256, 4
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    peer_device = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    p = ctx.Process(target=_peer, args=(child, nb, layers, peer_device), daemon=True)
    p.start()
    try:
        meta = parent.recv()
        kv = _cache(nb, layers, 2, "cuda:0")
        with kvxfer.Connector("local", backend="tcp") as c:
            c.register(kv, block_dim=1)
            caller_stream_ordering_checks(c, c.connect(meta), kv, parent, nb)
    finally:
        parent.send(("exit",))
        p.join(30)
        if p.is_alive():
            p.kill()
