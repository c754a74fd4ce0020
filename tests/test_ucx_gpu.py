"""GPU memory over the UCX backend (device machine): packed (one-launch gather, RMA between
registered GPU staging buffers, one-launch scatter, pipelined in pieces) and direct RMA, read
and write, layer subsets and notifications, every byte compared."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)"),
]
pytest.importorskip("cupy", reason="GPU packing needs cupy")
pytest.importorskip("ucxx", reason="the UCX backend needs ucxx (the ucx extra)")

from kvpeers import caller_stream_ordering_checks, torch_cache, torch_peer  # noqa: E402

NB, LAYERS = 256, 4
ENV = {"UCX_TLS": "tcp,sm,cuda_copy,cuda_ipc", "UCX_WARN_UNUSED_ENV_VARS": "n"}
PEER_DEVICE = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"


def _ucx_env(monkeypatch, **extra) -> dict:
    env = dict(ENV, **extra)
    for k, v in env.items():  # ours now, and the peer's (spawned with it)
        monkeypatch.setenv(k, v)
    return env


@pytest.mark.parametrize("mode,chunk", [("packed", 1 << 20), ("packed", 64 << 20), ("direct", 0)],
                         ids=["packed-pieces", "packed-one-piece", "direct"])
def test_gpu_cache_over_ucx_every_byte(mode, chunk, monkeypatch):
    env = _ucx_env(monkeypatch, KVXFER_UCX_MODE=mode, **({"KVXFER_UCX_CHUNK_BYTES": str(chunk)} if chunk else {}))
    import kvxfer

    with torch_peer("ucx", NB, LAYERS, PEER_DEVICE, env) as (parent, meta):
        kv = torch_cache(NB, LAYERS, 2, "cuda:0")
        rng = np.random.default_rng(0)
        with kvxfer.Connector("local", backend="ucx") as c:
            c.register(kv, block_dim=1)
            peer = c.connect(meta)
            src, dst = rng.choice(NB, 200, replace=False), rng.choice(NB, 200, replace=False)
            for t in kv:  # poison the destination
                t[:, torch.as_tensor(dst, device="cuda:0")] = -1
            st = c.read(peer, src, dst, layers=[0, 2, 3], notify=b"pulled").wait(60)
            assert st.backend == "ucx"
            parent.send(("note",))
            assert parent.recv() == ("local", b"pulled")
            parent.send(("blocks", src))
            remote = parent.recv()
            for i, t in enumerate(kv):
                got = t.index_select(1, torch.as_tensor(dst, device="cuda:0")).cpu().numpy()
                assert (got == -1).all() if i == 1 else np.array_equal(got, remote[i]), f"layer {i}"
            src2, dst2 = rng.choice(NB, 150, replace=False), rng.choice(NB, 150, replace=False)
            c.write(peer, src2, dst2, notify=b"pushed").wait(60)
            parent.send(("note",))
            assert parent.recv() == ("local", b"pushed")
            parent.send(("blocks", dst2))
            remote = parent.recv()
            for i, t in enumerate(kv):
                want = t.index_select(1, torch.as_tensor(src2, device="cuda:0")).cpu().numpy()
                assert np.array_equal(want, remote[i]), f"layer {i}"


@pytest.mark.parametrize("mode", ["packed", "direct"])
def test_transfers_wait_for_the_work_queued_on_the_callers_stream(mode, monkeypatch):
    # the caller queues a long sleep and then writes to the blocks on its own stream; a read
    # into those blocks must land after the writes, a write out of them must send the new bytes
    env = _ucx_env(monkeypatch, KVXFER_UCX_MODE=mode, KVXFER_UCX_CHUNK_BYTES=str(1 << 20))
    import kvxfer

    with torch_peer("ucx", NB, LAYERS, PEER_DEVICE, env) as (parent, meta):
        kv = torch_cache(NB, LAYERS, 2, "cuda:0")
        with kvxfer.Connector("local", backend="ucx") as c:
            c.register(kv, block_dim=1)
            caller_stream_ordering_checks(c, c.connect(meta), kv, parent, NB)
