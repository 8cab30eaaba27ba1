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


@pytest.mark.parametrize("dtype, stored_as", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2"),
                                              (torch.uint16, "U16")])
def test_a_dtype_not_read_here_is_refused_naming_the_tensor_and_what_is_read(tmp_path, dtype, stored_as):
    """A bare KeyError ('F8_E4M3') came out of ``read`` for a dtype safetensors writes but DTYPES lacks
    (and out of a checkpoint's block reader, ``sharded_checkpoint.weight_blocks``; its header check,
    ``checkpoint_files``, said only "KeyError: 'F8_E4M3'"): now the module's ValueError naming the tensor,
    the dtype and the dtypes it reads, and the checkpoint's readers refuse it naming the file too. The
    file's other tensors (int8 beside it) still read as safetensors reads them."""
    from safetensors.torch import save

    from sae_platform import catalog, checkpoint_files
    from sae_platform import sharded_checkpoint as sc
    from sae_platform.errors import StorageError
    from sae_platform.storage import ArtifactStore

    tensors = {"odd": torch.zeros(4, 3).to(dtype), "i8": torch.arange(-6, 6, dtype=torch.int8).reshape(4, 3)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    named = f"tensor 'odd' is stored as '{stored_as}'"
    with open(path, "rb") as handle, safe_open(str(path), "pt") as reference:
        rows = RowFile(handle, path.stat().st_size)
        assert torch.equal(rows.read("i8", 1, 3), reference.get_slice("i8")[1:3])
        assert rows.shape("odd") == [4, 3]
        for read in (lambda: rows.read("odd"), lambda: rows.read("odd", 0, 2)):
            with pytest.raises(ValueError) as error:
                read()
            assert named in str(error.value) and "F32, F16, BF16" in str(error.value) and "I8" in str(error.value)

    store = ArtifactStore(str(tmp_path / "artifacts"))  # a committed checkpoint holding it
    with store.writing(catalog.checkpoint_name("odd")) as version:
        store.fs.pipe_file(f"{version}/{sc.UNSHARDED_WEIGHTS}", save(tensors))
    checkpoint = sc.unsharded_checkpoint(store, "odd", catalog.checkpoint_version(store, "odd"))
    for read in (lambda: list(sc.weight_blocks(store, "odd")),
                 lambda: checkpoint_files.read_tensors(checkpoint, sc.UNSHARDED_WEIGHTS)):
        with pytest.raises(StorageError) as error:
            read()
        assert f"{store.url(checkpoint.path)}/{sc.UNSHARDED_WEIGHTS}" in error.value.problem
        assert named in error.value.problem
