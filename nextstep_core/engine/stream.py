"""Read safetensors tensors straight into their final place, a block of rows at a time.

Why not `safe_open(...).get_tensor`: it maps the whole file, and every page a read touches
counts in the process's resident memory until the file is closed, so a 5 GB shard costs 5 GB
of RSS on top of the weights it fills. Here each tensor is read with positioned reads
(`readinto`) into a destination allocated once in its final dtype and device:

- same dtype, on the CPU: the file's bytes land in the destination itself, no copy at all;
- another dtype or device (bf16 file -> fp16/fp32 weights, or -> a GPU): blocks of rows of
  about `BLOCK_BYTES` are read into one reused buffer and cast/copied into the destination;
- fp8 storage: blocks of rows are quantised into the fp8 weight and its per-row scales
  (precision.quantize_rows_into).

So loading needs the loaded weights plus one block (a few MB), whatever the shard sizes. The
page cache still holds the file's pages, but those belong to the kernel, not to the process.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import NextStepError
from .precision import quantize_rows_into

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
BLOCK_BYTES = 2 << 20  # the most a block of rows takes in the file's dtype


class SafetensorsFile:
    """One safetensors file opened for positioned reads. Use as a context manager (closes the file).

    entries: tensor name -> (dtype, shape, byte offset in the file, byte length).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open(self.path, "rb")
        header_len = struct.unpack("<Q", self.file.read(8))[0]
        header = json.loads(self.file.read(header_len))
        header.pop("__metadata__", None)
        start = 8 + header_len
        self.buffer: torch.Tensor | None = None
        self.work: torch.Tensor | None = None
        self.entries = {}
        for name, info in header.items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise NextStepError(f"tensor {name} in {self.path.name} has dtype {info['dtype']}, "
                                    "which the loader cannot read")
            begin, end = info["data_offsets"]
            self.entries[name] = (SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), start + begin, end - begin)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        self.buffer = self.work = None

    def names(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read_bytes_into(self, out: torch.Tensor, offset: int) -> None:
        """Fill a contiguous CPU tensor with the file's bytes from `offset`."""
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        self.file.seek(offset)
        if self.file.readinto(view) != len(view):
            raise NextStepError(f"weights file {self.path} ended early (truncated download?)")

    def row_blocks(self, name: str):
        """Yield (first row, block) over the tensor's rows (dim 0), each block (n, *rest) in the file's
        dtype on the CPU, read into one reused buffer of at most BLOCK_BYTES (one row if a row is bigger).
        A block is only valid until the next one is read."""
        dtype, shape, offset, _ = self.entries[name]
        shape = shape or (1,)
        rest = shape[1:]
        row_numel = max(1, int(torch.Size(rest).numel()))
        row_bytes = row_numel * torch.tensor([], dtype=dtype).element_size()
        rows_per_block = max(1, min(shape[0], BLOCK_BYTES // max(1, row_bytes)))
        buffer = self.block_buffer(rows_per_block * row_bytes).view(dtype).view(rows_per_block, *rest)
        for first in range(0, shape[0], rows_per_block):
            n = min(rows_per_block, shape[0] - first)
            block = buffer[:n]
            self.read_bytes_into(block, offset + first * row_bytes)
            yield first, block

    def block_buffer(self, nbytes: int) -> torch.Tensor:
        """nbytes of one buffer reused for every block of this file (fewer allocations, no fragmentation)."""
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(nbytes, BLOCK_BYTES), dtype=torch.uint8)
        return self.buffer[:nbytes]

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor in `dtype` (default: the file's) on `device`, allocated once at its final place."""
        file_dtype, shape, offset, _ = self.entries[name]
        dtype = dtype or file_dtype
        out = torch.empty(shape, dtype=dtype, device=device)
        if out.numel() == 0 or out.is_meta:  # meta: shapes and dtypes only (planning, tests)
            return out
        if dtype == file_dtype and out.device.type == "cpu":
            self.read_bytes_into(out, offset)
            return out
        flat = out.view(-1, *shape[1:]) if shape else out.view(1)
        for first, block in self.row_blocks(name):
            flat[first:first + block.shape[0]].copy_(block)
        return out

    def read_fp8(self, name: str, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """A 2-D high-precision weight (out, in) -> (fp8 weight (out, in), float32 per-row scale (out,)) on `device`."""
        _, shape, _, _ = self.entries[name]
        if len(shape) != 2:
            raise NextStepError(f"tensor {name} in {self.path.name} has shape {shape}; fp8 storage needs a matrix")
        weight = torch.empty(shape, dtype=torch.float8_e4m3fn, device=device)
        scale = torch.empty(shape[0], dtype=torch.float32, device=device)
        if weight.is_meta:
            return weight, scale
        for first, block in self.row_blocks(name):
            quantize_rows_into(block, weight, scale, first, self.work_buffer(block.numel(), weight.device))
        return weight, scale

    def work_buffer(self, numel: int, device: torch.device) -> torch.Tensor:
        """float32 scratch for quantising a block, reused across tensors (no allocation churn)."""
        if self.work is None or self.work.numel() < numel or self.work.device != device:
            self.work = torch.empty(numel, dtype=torch.float32, device=device)
        return self.work[:numel]
