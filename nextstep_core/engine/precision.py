"""Weight precision: bf16 / fp16 / fp32, and fp8 (e4m3fn) storage with bf16 compute.

fp8 storage keeps the big matrices of the decoder - every layer's q/k/v/o and gate/up/down
projections, 97% of NextStep-1's 14.7B parameters - as float8_e4m3fn with one float32 scale
per output row. Everything else stays in the compute dtype (bfloat16): token embeddings, the
RMSNorms, lm_head, the image projectors, the flow head and the position table, because they
are small and sit where rounding hurts most (the head integrates every token's flow).

An `Fp8Linear` upcasts its weight on use: y = (x @ W8^T) * scale + bias, the matmul in the
compute dtype, so only one layer's upcast weight exists at a time. On GPUs with fp8 matmul
(compute capability 8.9+) `fp8_matmul` instead quantises the activations per row and calls
`torch._scaled_mm` on the stored weight directly.

When the model computes on a CPU without native bfloat16 (`native_bf16_cpu`: no AVX-512 BF16 or
AMX), bf16 and fp8 weights compute in float32 instead (`for_device`, given the compute device, not
the device the weights are staged on; the user is told once): fp8 matrices through Fp8Linear in
float32, bf16 matrices kept in bf16 as `UpcastLinear`s, the rest loaded in float32.

Conversion happens at load time (model.load_model streams the released bf16 tensors into
`quantize_rows_into`, a block of rows at a time); `save_converted` writes the result back as
safetensors (`<name>.weight` in F8_E4M3 plus `<name>.weight_scale`), which loads without
converting again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NextStepError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# The decoder's linear layers that fp8 storage converts (names inside a Qwen2DecoderLayer).
FP8_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PRECISION_NAMES = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn")
ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "fp8": "fp8_e4m3fn", "float8_e4m3fn": "fp8_e4m3fn"}


@dataclass(frozen=True)
class Precision:
    """How weights are stored and computed.

    name: one of bf16, fp16, fp32, fp8_e4m3fn.
    dtype: the compute dtype, and the storage dtype of everything not in fp8.
    fp8: decoder linear weights stored as float8_e4m3fn with per-row scales.
    fp8_matmul: multiply in fp8 where the GPU supports it (else upcast, silently).
    stored: the decoder linear weights' storage dtype when it is not `dtype` and not fp8: bf16
    weights computing in float32 on a CPU without native bfloat16 (`for_device`; UpcastLinear).
    """

    name: str
    dtype: torch.dtype
    fp8: bool = False
    fp8_matmul: bool = False
    stored: torch.dtype | None = None

    @property
    def weight_bytes(self) -> int:
        """Bytes per parameter of the converted decoder matrices."""
        if self.fp8:
            return 1
        return torch.tensor([], dtype=self.stored or self.dtype).element_size()


def parse_precision(name: str | torch.dtype | Precision, *, fp8_matmul: bool = False,
                    fp8_compute: torch.dtype = torch.bfloat16) -> Precision:
    """A precision name (or a torch dtype) -> Precision; `auto` is resolved by the caller (memory_plan).

    fp8_compute: the compute dtype of fp8 storage, bfloat16 unless asked otherwise (float32 suits
    CPUs, whose bfloat16 matmuls are several times slower than float32 ones).
    """
    if isinstance(name, Precision):
        return name
    if isinstance(name, torch.dtype):
        name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(name, str(name))
    key = ALIASES.get(name, name)
    if key == "fp8_e4m3fn":
        return Precision("fp8_e4m3fn", fp8_compute, fp8=True, fp8_matmul=fp8_matmul)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if key not in dtypes:
        raise NextStepError(f"precision {name!r} is not one of {', '.join(PRECISION_NAMES)}")
    return Precision(key, dtypes[key])


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX). Elsewhere torch
    emulates bfloat16 products, several times slower than float32 ones."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


TOLD = set()  # the notices already given in this process


def for_device(precision: Precision, device: torch.device) -> Precision:
    """The precision to load with on `device`: on a CPU without native bfloat16, bf16 and fp8
    weights keep their storage (the decoder's matrices in bf16 or fp8) but compute in float32,
    each matrix upcast when it is used; everything else loads in float32. Says so once."""
    if device.type != "cpu" or precision.dtype != torch.bfloat16 or native_bf16_cpu():
        return precision
    if precision.name not in TOLD:
        TOLD.add(precision.name)
        logging.getLogger("nextstep_core").warning(
            "NextStep: this CPU has no native bfloat16 arithmetic, so %s weights compute in float32 (the decoder's "
            "matrices stay %s and are upcast per layer; the rest loads in float32): faster here than bfloat16",
            precision.name, "fp8" if precision.fp8 else "bf16")
    return replace(precision, dtype=torch.float32, stored=None if precision.fp8 else torch.bfloat16)


def compute_device_of(device: str | torch.device) -> torch.device:
    """The device a model will compute on, by name only: it need not be this process's to load
    onto (ComfyUI names its GPU while the weights are staged on the CPU)."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise NextStepError(f"compute device {device!r} is not a device name (cpu, cuda, cuda:1, mps)") from exc


def default_exact(device: torch.device) -> bool:
    """generate's `exact` when left as None: on for the CPU, where it gives the reference loop's
    tokens bit for bit; off elsewhere (CUDA kernels cannot promise those bits, and exact mode cost
    about 40 % of the token rate on an H100)."""
    return torch.device(device).type == "cpu"


class UpcastLinear(nn.Module):
    """A Linear whose weight (out, in) and bias are stored in `stored` (bf16) and computed in the
    input's dtype: y = x @ W^T + b with W upcast on use, one layer at a time."""

    def __init__(self, in_features: int, out_features: int, bias: bool, stored: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=stored, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=stored, device=device),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Fp8Linear(nn.Module):
    """A Linear whose weight is stored as float8_e4m3fn (out, in) with a float32 scale per row (out,).

    forward: x (..., in) in the compute dtype -> (..., out) in the same dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 fp8_matmul: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.fp8_matmul = fp8_matmul
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul and fp8_matmul_available(x.device):
            return self.forward_scaled_mm(x)
        y = F.linear(x, upcast(self.weight, x.dtype)) * self.weight_scale.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """fp8 x fp8 matmul: activations quantised per row, weight per row (output column)."""
        rows = x.reshape(-1, x.shape[-1])
        x_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        x8 = (rows.float() / x_scale).to(FP8)
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale[None].float(),
                             bias=None, out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8_e4m3fn")


def upcast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 -> dtype. On the CPU through a 256-entry table (about 3x faster than PyTorch's scalar cast)."""
    if weight.device.type != "cpu":
        return weight.to(dtype)
    table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).to(dtype)
    return table[weight.view(torch.uint8).long()]


def fp8_matmul_available(device: torch.device) -> bool:
    """torch._scaled_mm with row-wise scales needs a CUDA GPU of compute capability 8.9 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Module names (in `model`) of the decoder linears that fp8 storage converts."""
    layers = model.backbone.layers
    return [f"backbone.layers.{i}.{name}" for i in range(len(layers)) for name in FP8_LINEARS]


def use_stored_linears(model: nn.Module, precision: Precision) -> None:
    """Swap the decoder's nn.Linear modules for Fp8Linear (fp8) or UpcastLinear (`stored`) ones,
    on the same device (meta before loading); other precisions leave them as they are."""
    for name in fp8_linear_names(model) if precision.fp8 or precision.stored else []:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        bias, device = old.bias is not None, old.weight.device
        new = (Fp8Linear(old.in_features, old.out_features, bias, precision.dtype, precision.fp8_matmul, device=device)
               if precision.fp8 else UpcastLinear(old.in_features, old.out_features, bias, precision.stored, device))
        setattr(parent, attr, new)


def quantize_rows_into(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, start: int,
                       work: torch.Tensor | None = None) -> None:
    """Quantise a block of rows (n, in) of a high-precision weight into weight[start:start+n] (fp8) and
    scale[start:start+n] (float32): scale = max |row| / 448, weight = row / scale. Temporaries: one
    float32 copy of the block, in `work` (float32, at least n*in numbers, on weight's device) when given."""
    if work is None:
        block = rows.to(device=weight.device, dtype=torch.float32, copy=True)
    else:
        block = work.view(-1)[:rows.numel()].view(rows.shape)
        block.copy_(rows)
    row_max = torch.maximum(block.amax(dim=1), -block.amin(dim=1)).clamp(min=1e-12)
    row_scale = row_max / FP8_MAX
    block.div_(row_scale[:, None])
    weight[start:start + block.shape[0]].copy_(block)
    scale[start:start + block.shape[0]].copy_(row_scale)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (fp8 weight (out, in), float32 scale (out,)); for tests and conversions in memory."""
    q = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    s = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    quantize_rows_into(weight, q, s, 0)
    return q, s


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of a model (shared tensors once); rotary tables excluded."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "rotary_emb" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
