import numpy as np
import pytest

from kvxfer import KVLayout, LayoutError, LayoutGeometry, LayoutMismatchError
from kvpeers import KINDS, LayoutSpec


def test_kv_first_has_two_segments_per_block():
    t = np.zeros((2, 10, 16, 8, 128), np.float16)
    lay = KVLayout.from_tensors([t, t.copy()], block_dim=1)
    g = lay.geometry.tensors[0]
    assert lay.num_blocks == 10
    assert [(s.offset, s.run, s.count, s.stride) for s in g.segments] == [(0, 32768, 2, 10 * 32768)]
    assert lay.block_nbytes == 2 * 2 * 32768
    assert "fingerprint" in repr(lay) and "2x32768B" in repr(lay)


def test_blocks_first_and_mla_are_one_run():
    b = KVLayout.from_tensors([np.zeros((7, 2, 16, 8, 128), np.float16)])
    assert [(s.run, s.count) for s in b.geometry.tensors[0].segments] == [(65536, 1)]
    m = KVLayout.from_tensors([np.zeros((7, 16, 576), np.uint16)])
    assert m.block_nbytes == 16 * 576 * 2


def test_vllm_shared_buffer_views_are_distinct_tensors_with_large_block_stride():
    tensors, bd = LayoutSpec("vllm_shared", 12, layers=3).build(0)
    lay = KVLayout.from_tensors(tensors, block_dim=bd)
    assert lay.num_tensors == 3
    g = lay.geometry.tensors[1]
    assert g.block_stride == 3 * 2 * 16 * 2 * 32 * 2
    assert lay.addrs[1] - lay.addrs[0] == 2 * 16 * 2 * 32 * 2


def test_aliases_registered_once_and_layers_resolve_by_name():
    t = np.zeros((4, 8), np.float32)
    lay = KVLayout.from_tensors({"a": t, "b": t, "c": np.zeros_like(t)})
    assert lay.num_tensors == 2
    assert lay.resolve_layers(["b", "c"]).tolist() == [0, 1]
    with pytest.raises(LayoutError, match="unknown layer"):
        lay.resolve_layers(["zz"])
    with pytest.raises(LayoutError, match="twice"):
        lay.resolve_layers(["a", "b"])


def test_strided_head_slice_makes_two_level_segments():
    t = np.zeros((5, 16, 8, 64), np.float16)[:, :, 2:4, :]  # NHD, heads 2..3
    g = KVLayout.from_tensors([t]).geometry.tensors[0]
    assert [(s.run, s.count, s.stride) for s in g.segments] == [(2 * 64 * 2, 16, 8 * 64 * 2)]


@pytest.mark.parametrize("bad,match", [
    ([], "no tensors"),
    ([np.zeros((4, 8)), np.zeros((5, 8))], "disagree on the number of blocks"),
    ([np.broadcast_to(np.zeros(8), (4, 8))], "block stride 0"),
    ([np.broadcast_to(np.zeros((4, 1)), (4, 8))], "zero strides"),
    ([np.zeros((4, 8))[:, ::-1]], "negative strides"),
    (["not a tensor"], "cannot describe"),
])
def test_bad_tensors_are_refused(bad, match):
    with pytest.raises(LayoutError, match=match):
        KVLayout.from_tensors(bad)


def test_block_dim_out_of_range():
    with pytest.raises(LayoutError, match="block_dim 3 is out of range"):
        KVLayout.from_tensors([np.zeros((4, 8))], block_dim=3)


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("torch")])
def test_geometry_round_trips_and_fingerprint_ignores_num_blocks(kind):
    a = KVLayout.from_tensors(*LayoutSpec(kind, 8).build(0)[:1], block_dim=LayoutSpec(kind, 8).build(0)[1])
    ta, bd = LayoutSpec(kind, 20).build(1)
    b = KVLayout.from_tensors(ta, block_dim=bd)
    assert a.fingerprint == b.fingerprint
    g = LayoutGeometry.from_wire(a.geometry.to_wire())
    assert g == a.geometry


def test_incompatible_geometries_are_named():
    a = KVLayout.from_tensors([np.zeros((4, 16, 8), np.float16)])
    b = KVLayout.from_tensors([np.zeros((4, 16, 8), np.float32)])
    with pytest.raises(LayoutMismatchError, match="float16"):
        a.geometry.check_compatible(b.geometry)


@pytest.mark.parametrize("wire", [
    None, {}, {"v": 2}, {"v": 1, "mem": "host", "t": []},
    {"v": 1, "mem": "host", "t": [["f", 2, [1], 4, -8, [[0, 8, 1, 0]]]]},
    {"v": 1, "mem": "host", "t": [["f", 2, [1], 4, 8, [[0, 0, 1, 0]]]]},
    {"v": 1, "mem": "nvme", "t": [["f", 2, [1], 4, 8, [[0, 8, 1, 0]]]]},
    {"v": 1, "mem": "host", "t": [["f", 2, [1], 4, 8, [[0, 8, 1]]]]},
])
def test_malformed_geometry_from_wire(wire):
    with pytest.raises(LayoutError):
        LayoutGeometry.from_wire(wire)


def test_torch_tensors_supported():
    torch = pytest.importorskip("torch")
    t = torch.zeros((2, 6, 4, 2, 8), dtype=torch.bfloat16)
    lay = KVLayout.from_tensors([t], block_dim=1)
    assert lay.geometry.tensors[0].dtype == "bfloat16"
    assert lay.addrs[0] == t.data_ptr()
