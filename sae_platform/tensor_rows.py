"""Tensors of a local safetensors file read with plain reads, never memory-mapped: its header
(:func:`parse_header`), and rows [lo, hi) of one tensor (:class:`RowFile`), costing their own bytes.

Why plain reads: ``safetensors.safe_open`` maps the file, and every page a reader touches stays in
the process's resident set while the file is open. A reader that walks a whole checkpoint block by
block through it (``sharded_checkpoint.weight_blocks``: the whole SAE's fingerprint) therefore
held the whole file by its last block, however small its blocks: measured, 706 MiB resident of a
604 MB checkpoint (2^17 latents x d_model 576) read in 64 MiB blocks. Read here, the resident bytes
are one block's; the kernel's page cache is not the process's memory.
"""

import json
import math
import struct

import torch

HEADER_LIMIT_BYTES = 100_000_000  # safetensors' own limit on a header
HEADER_ERRORS = (struct.error, ValueError, KeyError, TypeError, AttributeError)  # what parse_header raises
# safetensors' dtype names (a file's header), as torch's
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def dtype_of(name: str, meta: dict) -> torch.dtype:
    """The torch dtype of tensor ``name`` by its header entry ``meta`` (``{"dtype": "F32", ...}``).
    ValueError naming the tensor, its dtype and the dtypes read here (``DTYPES``) for any other (e.g. a
    float8 ``F8_E4M3`` or ``U16``: a file this reader was not written for, refused, never misread)."""
    dtype = meta["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"tensor {name!r} is stored as {dtype!r}, a dtype not read here (it reads "
                         f"{', '.join(DTYPES)}): write it as one of those")
    return DTYPES[dtype]


def parse_header(handle, size: int) -> tuple[dict, int]:
    """(the JSON header {name: {"dtype", "shape", "data_offsets"}}, ``__metadata__`` left out; the
    byte its tensors' data starts at) of the open safetensors file ``handle`` of ``size`` bytes: 8
    bytes of length, then the JSON. Reads the header only. One of ``HEADER_ERRORS`` when it does not
    parse; the file's size against the tensors' end is the caller's check."""
    handle.seek(0)
    (length,) = struct.unpack("<Q", handle.read(8))
    if not 2 <= length <= min(HEADER_LIMIT_BYTES, size - 8):
        raise ValueError(f"a header of {length:,} bytes in a file of {size:,}")
    header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def read_into(handle, offset: int, target: torch.Tensor) -> None:
    """Bytes [offset, offset + len(target)) of the open file ``handle`` into ``target`` (a uint8
    tensor on the CPU). EOFError naming how many bytes were missing when the file ends first."""
    if not target.numel():
        return
    view, filled = memoryview(target.numpy()), 0
    handle.seek(offset)
    while filled < len(view):
        got = handle.readinto(view[filled:])
        if not got:
            raise EOFError(f"it ended {len(view) - filled:,} bytes early")
        filled += got


class RowFile:
    """An open safetensors file (``handle``, ``size`` bytes) read with plain reads: ``shape`` and
    ``read`` of its tensors by name. One of ``HEADER_ERRORS`` when its header does not parse; a
    tensor whose bytes are not its shape's or of a dtype not read here, or a file that ends first,
    raises ValueError / EOFError on ``read``."""

    def __init__(self, handle, size: int):
        self.handle = handle
        self.header, self.start = parse_header(handle, size)

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> list[int]:
        return [int(n) for n in self.header[name]["shape"]]

    def read(self, name: str, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        """Rows [lo, hi) of tensor ``name`` along its first axis (lo, hi None: the whole tensor, a
        scalar included), as a new CPU tensor of the stored dtype holding only those bytes. ValueError
        for rows outside the tensor (0 <= lo <= hi <= its rows): they would be another tensor's bytes;
        for a dtype not in ``DTYPES`` (``dtype_of``)."""
        meta, shape = self.header[name], self.shape(name)
        dtype = dtype_of(name, meta)
        begin, end = (int(offset) for offset in meta["data_offsets"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{name} is {meta['dtype']} {shape} in bytes [{begin}, {end})")
        if lo is not None and not (shape and 0 <= lo <= hi <= shape[0]):
            raise ValueError(f"rows [{lo}, {hi}) are not rows of {name}, {meta['dtype']} {shape}")
        if lo is not None:
            shape = [hi - lo, *shape[1:]]
            begin += lo * math.prod(shape[1:]) * dtype.itemsize
        out = torch.empty(shape, dtype=dtype)
        read_into(self.handle, self.start + begin, out.reshape(-1).view(torch.uint8))
        return out
