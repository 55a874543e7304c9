"""Plan the GPU memory of a run before loading anything: pick the precision and the block swap.

    files = inspect_model_folder("models/nextstep/NextStep-1.1")
    plan = choose_plan(files, free_bytes=24 << 30, request=Request(width=512, height=512))
    print(plan.describe())

Estimates, in bytes, all on the compute device, from the checkpoint's tensor shapes (headers
only), the image tokenizer's config and the request:
- weights: the transformer's tensors resident on the device at the chosen precision (fp8:
  the decoder matrices 1 byte + 4 bytes of scale per row; the rest in bf16); swapped layers
  are not resident, but two of them are in flight (the running one and the prefetched one).
  `lm_head` is not counted: generation never loads it (model.load_model).
- kv_cache: keys and values of every layer for every guidance row, prompt plus image tokens;
  growing the cache concatenates, so one layer's keys and values exist twice for a moment.
- activations: the largest transient of a forward, the prefill's MLP (gate, up and their
  product for every prompt position) or, on a CPU, the attention scores of the prefill.
- head: the flow head's working set for one token (tiny).
- upcast: with fp8 storage, the largest decoder matrix upcast to bf16 for its matmul.
- vae: the image tokenizer's weights and its decoder's largest feature maps at full size.
The peak is weights + vae weights + the largest of the phases (prefill, token loop, decode),
the KV cache being alive in all of them.

`choose_plan` takes the first candidate that fits under `free_bytes` less a reserve: bf16,
then fp8 storage, then fp8 with as few layers swapped as needed. bf16 with swapping is never
preferred to fp8 without: moving 0.6 GB per layer per token costs far more time than fp8 costs
quality.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.checkpoint import ModelFiles
from ..engine.precision import FP8_LINEARS, Precision, parse_precision
from ..errors import NextStepError

GIB = 1 << 30
RESERVE_FRACTION = 0.08  # of the free memory, for the allocator's fragmentation and library workspaces
RESERVE_BYTES = 256 << 20  # CUDA context-side workspaces (cuBLAS, SDPA) beyond the tensors


@dataclass
class Request:
    """What a run needs: image size, images, guidance branches, prompt length, editing."""

    width: int = 1024
    height: int = 1024
    images: int = 1
    branches: int = 2  # 2 for text-to-image with cfg > 1, 3 when editing with cfg and cfg_img > 1, 1 without guidance
    prompt_tokens: int = 96  # caption tokens, padding included (the image area string adds a few more)
    edit: bool = False  # the reference image's tokens join the prompt
    on_cpu: bool = False  # the CPU's scaled-dot-product attention materialises the score matrix

    @property
    def image_tokens(self) -> int:
        return (self.width // 16) * (self.height // 16)

    @property
    def rows(self) -> int:
        return self.images * self.branches

    @property
    def prompt_length(self) -> int:
        return self.prompt_tokens + 8 + (self.image_tokens + 2 if self.edit else 0)


@dataclass
class MemoryPlan:
    """One candidate's estimate. Sizes in bytes; `free` is what the device had (None when not given)."""

    precision: str
    compute_dtype: str
    block_swap: int
    layers: int
    weights: int
    swap_buffers: int
    kv_cache: int
    activations: int
    head: int
    vae_weights: int
    vae_decode: int
    prefill: int
    upcast: int = 0
    free: int | None = None

    @property
    def phase_peak(self) -> int:
        """The largest phase (prefill, token loop, decode), the KV cache alive in each."""
        loop = self.kv_cache + self.head + self.upcast
        decode = self.kv_cache + self.vae_decode
        return max(self.prefill + self.upcast, loop, decode)

    @property
    def working(self) -> int:
        """What a run needs on the device beside the resident weights of both networks: the swap
        buffers and the largest phase (ComfyUI's `memory_required`)."""
        return self.swap_buffers + self.phase_peak

    @property
    def total(self) -> int:
        """The estimated peak: resident weights + the largest phase."""
        return self.weights + self.vae_weights + self.working

    def fits(self, free: int) -> bool:
        return self.total <= free * (1 - RESERVE_FRACTION) - RESERVE_BYTES

    def describe(self) -> str:
        """A printable table of the plan."""
        swap = f", {self.block_swap} of {self.layers} decoder layers swapped to the CPU" if self.block_swap else ""
        lines = [f"NextStep memory plan: {self.precision} computing in {self.compute_dtype}{swap}"]
        rows = [("weights (resident)", self.weights), ("swap buffers (2 layers)", self.swap_buffers),
                ("KV cache", self.kv_cache), ("activations (prefill)", self.activations),
                ("flow head working set", self.head), ("fp8 upcast (1 matrix)", self.upcast),
                ("VAE weights", self.vae_weights), ("VAE decode", self.vae_decode), ("estimated peak", self.total)]
        lines += [f"  {name:<26}{size_text(size)}" for name, size in rows]
        if self.free is not None:
            verdict = "fits" if self.fits(self.free) else "does NOT fit"
            lines.append(f"  {'free on the device':<26}{size_text(self.free)} -> {verdict} "
                         f"(keeping {RESERVE_FRACTION:.0%} + {RESERVE_BYTES >> 20} MiB in reserve)")
        return "\n".join(lines)


def size_text(size: int) -> str:
    return f"{size / GIB:9.2f} GiB" if size >= GIB else f"{size / (1 << 20):9.1f} MiB"


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def is_fp8_matrix(name: str) -> bool:
    return name.startswith("layers.") and name.endswith(".weight") and any(f".{m}." in name for m in FP8_LINEARS)


def layer_of(name: str) -> int | None:
    """The decoder layer index of a checkpoint tensor name, or None."""
    name = name.removeprefix("model.")
    return int(name.split(".")[1]) if name.startswith("layers.") else None


def tensor_bytes(name: str, shape, precision: Precision) -> int:
    """Bytes of one checkpoint tensor once loaded at `precision` (fp8 matrices carry a float32 scale per row)."""
    if precision.fp8 and is_fp8_matrix(name.removeprefix("model.")):
        return numel(shape) + 4 * shape[0]
    return numel(shape) * dtype_bytes(precision.dtype)


def weight_bytes(files: ModelFiles, precision: Precision, lm_head: bool = False) -> tuple[int, dict[int, int]]:
    """(bytes outside the decoder layers, {layer index: bytes}) at `precision`; lm_head only if asked."""
    outside, per_layer = 0, {}
    for name, shape in files.tensor_shapes.items():
        if name.removeprefix("model.") == "lm_head.weight" and not lm_head:
            continue
        size = tensor_bytes(name, shape, precision)
        layer = layer_of(name)
        if layer is None:
            outside += size
        else:
            per_layer[layer] = per_layer.get(layer, 0) + size
    return outside, per_layer


def vae_weight_bytes(files: ModelFiles, dtype: torch.dtype) -> int:
    """Parameters of the image tokenizer, counted on a meta-device build from its config."""
    if files.vae_folder is None:
        return 0
    return vae_parameters(str(files.vae_folder), files.version.name == "1.1") * dtype_bytes(dtype)


@functools.lru_cache(maxsize=16)
def vae_parameters(vae_folder: str, nextstep_1_1: bool) -> int:
    """Parameters of the image tokenizer in `vae_folder` (a planner tries many candidates: built once)."""
    from ..engine.vae import build_autoencoder
    from ..engine.vae_files import read_config

    config = read_config(Path(vae_folder), nextstep_1_1)
    with torch.device("meta"):
        autoencoder = build_autoencoder(config)
    return sum(p.numel() for p in autoencoder.parameters())


def vae_decode_bytes(files: ModelFiles, request: Request, dtype: torch.dtype) -> int:
    """The decoder's largest moment: a full-size resnet block (input, normalised, conv output, residual)
    plus the upsampling's input at the top level, for every image."""
    if files.vae_folder is None:
        return 0
    from ..engine.vae_files import read_config

    config = read_config(files.vae_folder, files.version.name == "1.1")
    pixels = request.width * request.height
    top_channels = config.ch * config.ch_mult[0]
    feature_maps = 4 * top_channels * pixels + config.ch * config.ch_mult[1] * pixels // 4
    return request.images * feature_maps * dtype_bytes(dtype)


def kv_cache_bytes(files: ModelFiles, request: Request, dtype: torch.dtype) -> int:
    """Keys + values of every layer at the final length, plus one layer's copy while the cache grows."""
    c = files.config
    head_dim = c.hidden_size // c.num_attention_heads
    length = request.prompt_length + request.image_tokens
    per_layer = 2 * request.rows * c.num_key_value_heads * head_dim * length * dtype_bytes(dtype)
    return per_layer * (c.num_hidden_layers + 1)


def prefill_activation_bytes(files: ModelFiles, request: Request, dtype: torch.dtype) -> int:
    """The largest transient of the prefill: a layer's MLP (gate, up, activated gate, product) next to the
    residual stream, and on a CPU the attention scores (rows, heads, L, L) in float32."""
    c = files.config
    tokens = request.rows * request.prompt_length
    mlp = tokens * (4 * c.intermediate_size + 3 * c.hidden_size) * dtype_bytes(dtype)
    scores = request.rows * c.num_attention_heads * request.prompt_length ** 2 * 4 if request.on_cpu else 0
    return max(mlp, scores + tokens * 4 * c.hidden_size * dtype_bytes(dtype))


def head_bytes(files: ModelFiles, request: Request, dtype: torch.dtype) -> int:
    """One token's flow-head evaluation: a few (rows, head dim) tensors, and the token's hidden states."""
    dim = files.tensor_shapes.get("image_head.net.input_proj.weight", (1536,))[0]
    return request.rows * (12 * dim + 6 * files.config.hidden_size) * dtype_bytes(dtype)


def estimate(files: ModelFiles, precision: str | Precision, block_swap: int = 0, request: Request | None = None,
             free: int | None = None, *, lm_head: bool = False) -> MemoryPlan:
    """The memory plan of one (precision, block swap) choice for `request` (lm_head: counted too, as a
    load for training has it)."""
    request = request or Request()
    precision = parse_precision(precision)
    dtype = precision.dtype
    outside, per_layer = weight_bytes(files, precision, lm_head)
    layers = sorted(per_layer)
    swapped = layers[len(layers) - block_swap:] if block_swap else []
    resident = outside + sum(per_layer[i] for i in layers if i not in swapped)
    swap_buffers = sum(sorted((per_layer[i] for i in swapped), reverse=True)[:2])
    kv = kv_cache_bytes(files, request, dtype)
    activations = prefill_activation_bytes(files, request, dtype)
    prompt_kv = kv * request.prompt_length // (request.prompt_length + request.image_tokens)
    return MemoryPlan(
        precision=precision.name, compute_dtype=dtype_name(dtype), block_swap=block_swap, layers=len(layers),
        weights=resident,
        swap_buffers=swap_buffers, kv_cache=kv, activations=activations, head=head_bytes(files, request, dtype),
        vae_weights=vae_weight_bytes(files, dtype), vae_decode=vae_decode_bytes(files, request, dtype),
        prefill=prompt_kv + activations, upcast=fp8_upcast_bytes(files, precision), free=free,
    )


def fp8_upcast_bytes(files: ModelFiles, precision: Precision) -> int:
    """fp8 storage upcasts one matrix at a time to the compute dtype: the largest one's bytes."""
    if not precision.fp8:
        return 0
    sizes = [numel(shape) for name, shape in files.tensor_shapes.items() if is_fp8_matrix(name.removeprefix("model."))]
    return max(sizes, default=0) * dtype_bytes(precision.dtype)


def candidates(num_layers: int, precision: str, block_swap: int | None):
    """(precision, swap) pairs in order of preference; a fixed precision or swap narrows them."""
    precisions = ["bf16", "fp8_e4m3fn"] if precision == "auto" else [precision]
    for p in precisions:
        swaps = range(num_layers + 1) if block_swap is None else [block_swap]
        if precision == "auto" and p == "bf16" and block_swap is None:
            swaps = [0]  # bf16 + swapping is slower than fp8 without
        for s in swaps:
            yield p, s


def choose_plan(files: ModelFiles, free_bytes: int, request: Request | None = None, *, precision: str = "auto",
                block_swap: int | None = None, fits: Callable[[MemoryPlan], bool] | None = None) -> MemoryPlan:
    """The first plan that fits `free_bytes` (see the module doc); precision/block_swap fix one of the two.
    fits: another test of a plan than MemoryPlan.fits(free_bytes) (ComfyUI's own accounting, say).

    Raises NextStepError naming the need and the free memory when nothing fits.
    """
    request = request or Request()
    num_layers = files.config.num_hidden_layers
    fits = fits or (lambda candidate: candidate.fits(free_bytes))
    plan = None
    for p, s in candidates(num_layers, precision, block_swap):
        plan = estimate(files, p, s, request, free=free_bytes)
        if fits(plan):
            return plan
    raise NextStepError(
        f"{files.folder.name} at {request.width}x{request.height} needs about {plan.total / GIB:.1f} GiB even as "
        f"{plan.precision} with {plan.block_swap} of {num_layers} layers swapped, and the device has "
        f"{free_bytes / GIB:.1f} GiB free: use a smaller image or batch, or free memory\n{plan.describe()}"
    )
