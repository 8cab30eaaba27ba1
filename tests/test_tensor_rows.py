"""tensor_rows: a safetensors file's tensors read with plain reads, row ranges included, as safetensors reads them."""

import pytest
import torch
from safetensors.torch import safe_open, save_file

from sae_platform.tensor_rows import RowFile


@pytest.fixture
def stored(tmp_path):
    tensors = {"f32": torch.randn(7, 3), "bf16": torch.randn(5, 4).bfloat16(), "f16": torch.randn(3, 2, 2).half(),
               "bool": torch.rand(6) > 0.5, "i64": torch.arange(10).reshape(5, 2), "scalar": torch.tensor(3.5),
               "empty": torch.empty(0, 4), "narrow": torch.empty(4, 0)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"written_by": "test"})
    return path, tensors


def test_every_tensor_and_every_row_range_reads_as_safetensors_reads_it(stored):
    path, tensors = stored
    with open(path, "rb") as handle, safe_open(str(path), "pt") as reference:
        rows = RowFile(handle, path.stat().st_size)
        assert sorted(rows.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            whole = rows.read(name)
            assert whole.dtype == tensor.dtype and torch.equal(whole, tensor), name
            if not rows.shape(name):  # a scalar has no rows
                continue
            n = rows.shape(name)[0]
            for lo in range(n + 1):
                for hi in range(lo, n + 1):
                    assert torch.equal(rows.read(name, lo, hi), reference.get_slice(name)[lo:hi]), (name, lo, hi)


@pytest.mark.parametrize("name, lo, hi", [("f32", 5, 9), ("f32", -1, 2), ("f32", 3, 1), ("scalar", 0, 1)])
def test_rows_outside_the_tensor_are_refused_not_read_from_its_neighbour(stored, name, lo, hi):
    path, _ = stored
    with open(path, "rb") as handle:
        with pytest.raises(ValueError, match=rf"rows \[{lo}, {hi}\) are not rows of {name}"):
            RowFile(handle, path.stat().st_size).read(name, lo, hi)
