"""Decode-graph input layout (rdnac.runtime.graphs): the per-step inputs of a bucket are views of one
byte buffer, copied in one transfer. Kernels assume 16-byte aligned pointers, so every view must be
aligned, and no two views may overlap. (Replay itself needs a GPU: tests/test_gpu_models.py.)"""

import pytest
import torch

from rdnac.runtime.graphs import DecodeGraphs


@pytest.mark.parametrize("bucket", [1, 3, 8, 64])
@pytest.mark.parametrize("max_blocks", [1, 7, 256])
def test_views_are_aligned_disjoint_and_typed(bucket, max_blocks):
    graphs = DecodeGraphs.__new__(DecodeGraphs)  # layout only: no capture
    graphs.max_blocks = max_blocks
    sections = graphs._sections(bucket)
    name, dtype, shape, offset = sections[-1]
    raw = torch.zeros(offset + bucket * max_blocks * 4, dtype=torch.uint8)
    views = graphs._layout(raw, bucket)
    expected = {"token_ids": (torch.int64, (bucket,)), "positions": (torch.int64, (bucket,)),
                "slot_mapping": (torch.int64, (bucket,)), "seq_lens": (torch.int32, (bucket,)),
                "block_tables": (torch.int32, (bucket, max_blocks))}
    assert {k: (v.dtype, tuple(v.shape)) for k, v in views.items()} == expected
    assert all(v.data_ptr() % 16 == 0 and v.is_contiguous() for v in views.values())
    for i, (name, value) in enumerate(views.items()):  # distinct values per view: any overlap overwrites one
        value.fill_(i + 1)
    for i, (name, value) in enumerate(views.items()):
        assert (value == i + 1).all(), f"{name} overlaps another input"
