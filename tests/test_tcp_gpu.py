"""GPU memory over the TCP backend: packed on the GPU, staged through pinned host chunks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)"),
]
cupy = pytest.importorskip("cupy", reason="GPU staging needs cupy")

from kvpeers import caller_stream_ordering_checks, torch_cache, torch_peer  # noqa: E402


@pytest.mark.parametrize("peer_device", ["cuda:0", "cuda:1", "host"])
def test_gpu_cache_over_tcp_every_byte(peer_device):
    import kvxfer

    if peer_device == "cuda:1" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    nb, layers = 256, 4
    # a host-memory peer ("cpu") and a GPU-memory local side: the layouts are still compatible
    with torch_peer("tcp", nb, layers, "cpu" if peer_device == "host" else peer_device) as (parent, meta):
        kv = torch_cache(nb, layers, 2, "cuda:0")
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


def test_gpu_transfers_over_tcp_wait_for_the_callers_stream():
    import kvxfer

    nb, layers = 256, 4
    peer_device = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    with torch_peer("tcp", nb, layers, peer_device) as (parent, meta):
        kv = torch_cache(nb, layers, 2, "cuda:0")
        with kvxfer.Connector("local", backend="tcp") as c:
            c.register(kv, block_dim=1)
            caller_stream_ordering_checks(c, c.connect(meta), kv, parent, nb)
