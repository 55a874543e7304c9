"""NextStepModel: a transformers Qwen2 decoder plus the image projectors and the flow head.

Released tensor names carry no `model.` prefix: the decoder's are `embed_tokens.*`,
`layers.*`, `norm.*` (they live under `backbone.` here), the rest are `lm_head.weight`,
`image_in_projector.*`, `image_out_projector.*`, `image_head.net.*` and, in 1.0 checkpoints,
the buffer `gen_pos_embed` (1, 32*32, hidden).

Image tokens: one 2x2 patch of the 16-channel latent is one token of 64 numbers, channel-major
inside the patch (c, p, q), tokens in raster order over the token grid (rows, cols).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers import Qwen2Config, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from ..errors import NextStepError
from .checkpoint import ModelFiles, NextStepConfig
from .head import FlowHead
from .precision import FP8, Fp8Linear, Precision, UpcastLinear, parse_precision, use_stored_linears
from .stream import SafetensorsFile

DECODER_PREFIXES = ("embed_tokens.", "layers.", "norm.")

POSITION_TABLE_TOKENS = 32 * 32  # image tokens the 1.0 position table (gen_pos_embed) covers


def patchify(latent: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(B, C, H, W) latent -> (B, H/p * W/p, C*p*p) tokens, raster order, (c, p, q) inside a token."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, token_grid: tuple[int, int], patch: int = 2) -> torch.Tensor:
    """(B, rows*cols, C*p*p) tokens -> (B, C, rows*p, cols*p) latent; the inverse of patchify."""
    rows, cols = token_grid
    b, n, d = tokens.shape
    if n != rows * cols:
        raise ValueError(f"{n} tokens do not fill a {rows}x{cols} token grid")
    c = d // (patch * patch)
    x = tokens.reshape(b, rows, cols, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, rows * patch, cols * patch)


def qwen2_config(config: NextStepConfig) -> Qwen2Config:
    """The transformers config of the decoder part (SDPA attention)."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {**config.rope_scaling, "rope_theta": config.rope_theta}
        rope.setdefault("rope_type", rope.pop("type", "default"))
    qwen = Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_word_embeddings,
        use_sliding_window=False,
    )
    qwen._attn_implementation = "sdpa"
    return qwen


def check_decoder_api() -> None:
    """Refuse a transformers whose Qwen2Model does not take the KV cache as `cache=` (before 5.24
    it was `past_key_values=`, and a `cache=` there is swallowed by **kwargs: every step would
    run without its cache and give a wrong image, silently)."""
    if "cache" not in inspect.signature(Qwen2Model.forward).parameters:
        raise NextStepError(f"transformers {transformers.__version__} is installed, and its Qwen2 decoder does not "
                            "take the KV cache as `cache=`: NextStep needs transformers 5.24 or newer "
                            "(pip install -U 'transformers>=5.24,<6')")


class NextStepModel(nn.Module):
    """Decoder + projectors + flow head.

    Shapes: hidden states (rows, L, hidden); image tokens (rows, token_dim = 64);
    head conditions (rows, hidden).
    """

    def __init__(self, config: NextStepConfig, head_dim: int = 1536, head_layers: int = 12, lm_head: bool = True,
                 position_table: bool | None = None):
        super().__init__()
        check_decoder_api()
        self.config = config
        hidden = config.hidden_size
        self.backbone = Qwen2Model(qwen2_config(config))
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False) if lm_head else None
        self.image_in_projector = nn.Linear(config.token_dim, hidden)
        self.image_out_projector = nn.Linear(hidden, hidden)
        self.image_head = FlowHead(config.token_dim, hidden, head_dim, head_layers)
        self.block_swap = None  # memory.offload.BlockSwap while layers are swapped
        # 1.0 checkpoints carry the (1, 32*32, hidden) table even where the config turns it off.
        if config.use_gen_pos_embed if position_table is None else position_table:
            self.register_buffer("gen_pos_embed", torch.zeros(1, POSITION_TABLE_TOKENS, hidden))
        else:
            self.gen_pos_embed = None

    @property
    def max_image_tokens(self) -> int | None:
        """Tokens the 1.0 position table covers (32*32) when it is used, else None."""
        return self.gen_pos_embed.shape[1] if self.config.use_gen_pos_embed else None

    def head_condition(self, hidden: torch.Tensor, token_index: int | torch.Tensor) -> torch.Tensor:
        """(rows, hidden) last hidden state -> (rows, hidden) head condition for token k.

        token_index: k, or a 0-d long tensor on the model's device (read there: no host sync, so
        a captured CUDA graph reads the current value)."""
        if self.config.use_gen_pos_embed:
            index = torch.as_tensor(token_index, device=hidden.device).reshape(1)
            hidden = hidden + self.gen_pos_embed[0].index_select(0, index)
        return self.image_out_projector(hidden)


def checkpoint_name_to_module_name(name: str) -> str:
    if name.startswith("model."):
        name = name[len("model."):]
    return "backbone." + name if name.startswith(DECODER_PREFIXES) else name


def head_size_from_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(dim, layers) of the flow head, read from the checkpoint's tensor shapes."""
    key = "image_head.net.input_proj.weight"
    if key not in shapes:
        raise NextStepError("the weights have no flow head (image_head.net.*); is this a NextStep checkpoint?")
    blocks = {n.split(".")[3] for n in shapes if n.startswith("image_head.net.res_blocks.")}
    return shapes[key][0], len(blocks)


def build_empty_model(files: ModelFiles, *, lm_head: bool = False, operations=None) -> NextStepModel:
    """The model on the meta device, shaped after the checkpoint; no memory is used yet.

    lm_head: build the text head (generation never uses it; training does). operations: a factory
    whose `Linear` class replaces every plain nn.Linear (use_operations)."""
    config = files.config
    head_dim, head_layers = head_size_from_shapes(files.tensor_shapes)
    in_shape = files.tensor_shapes.get("image_in_projector.weight")
    if in_shape is not None and in_shape[1] != config.token_dim:
        raise NextStepError(
            f"image_in_projector takes {in_shape[1]} numbers per token but config.json says "
            f"latent_channels {config.latent_channels} x patch {config.latent_patch_size}^2 = {config.token_dim}"
        )
    if lm_head and "lm_head.weight" not in files.tensor_shapes and not config.tie_word_embeddings:
        raise NextStepError(f"model folder {files.folder} has no lm_head.weight (and config.json does not tie it to "
                            "the embeddings): load it without the text head (load_lm_head=False)")
    with init_empty_weights(include_buffers=True):
        model = NextStepModel(config, head_dim, head_layers, lm_head=lm_head,
                              position_table="gen_pos_embed" in files.tensor_shapes or config.use_gen_pos_embed)
    if operations is not None:
        use_operations(model, operations)
    return model


def use_operations(model: nn.Module, operations) -> None:
    """Rebuild every plain nn.Linear of the model (on the meta device) as `operations.Linear`, the
    way ComfyUI's native models take `operations=` (comfy.ops classes cast their weights on use when
    ComfyUI streams them). Fp8Linear / UpcastLinear, swapped in later, are left as they are."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with init_empty_weights(include_buffers=True):
            new = operations.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        setattr(parent, attr, new)


def load_model(files: ModelFiles, *, device: str | torch.device = "cpu", precision: Precision | str = "fp32",
               lm_head: bool = False, operations=None) -> NextStepModel:
    """Build the model empty, then stream every tensor from the safetensors files into place.

    `precision`: a name such as "fp8_e4m3fn" or "float32", or a Precision. Each tensor is
    allocated once on `device` in its final dtype and filled from the file with positioned
    reads (see stream.py), shard by shard: no state dict, no fp32 detour, no mapped pages
    piling up. fp8 storage quantises the decoder matrices a block of rows at a time; a
    checkpoint saved already converted (`.weight` in F8_E4M3 + `.weight_scale`) loads as is.
    `lm_head.weight` is skipped unless `lm_head` (generation never reads it; see build_empty_model).
    Every other checkpoint tensor must land on a model tensor and vice versa.
    """
    precision = parse_precision(precision)
    model = build_empty_model(files, lm_head=lm_head, operations=operations)
    use_stored_linears(model, precision)
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    expected = {n for n in targets if "rotary_emb" not in n}
    loaded: set[str] = set()
    unexpected: list[str] = []
    for path in files.weight_files:
        with SafetensorsFile(path) as f:  # one shard open at a time
            for name in f.names():
                module_name = checkpoint_name_to_module_name(name)
                if module_name == "lm_head.weight" and not lm_head:
                    continue
                if module_name not in expected:
                    unexpected.append(name)
                    continue
                check_shape(f, name, targets[module_name])
                loaded.update(load_tensor(model, module_name, f, name, targets[module_name], precision.dtype, device))
    if model.lm_head is not None and "lm_head.weight" not in loaded and model.config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(expected - loaded)
    if missing or unexpected:
        raise NextStepError(describe_mismatch(files.folder, missing, unexpected))
    rebuild_rotary(model, device)
    model.precision = precision
    return model.eval()


def check_shape(f: SafetensorsFile, name: str, target: torch.Tensor) -> None:
    if tuple(f.shape(name)) != tuple(target.shape):
        raise NextStepError(
            f"tensor {name} in {f.path.name} has shape {tuple(f.shape(name))}, the config needs {tuple(target.shape)}; "
            "does config.json belong to these weights?"
        )


def load_tensor(model: nn.Module, name: str, f: SafetensorsFile, checkpoint_name: str, target: torch.Tensor,
                dtype: torch.dtype, device) -> list[str]:
    """Read one checkpoint tensor into the model; returns the model tensor names it filled.

    Integer tensors keep their dtype; fp8 targets keep the file's fp8 or are quantised from it
    (filling `<module>.weight_scale` too); float tensors take `dtype`.
    """
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if isinstance(module, Fp8Linear) and attr == "weight" and f.dtype(checkpoint_name) != FP8:
        weight, scale = f.read_fp8(checkpoint_name, device)
        set_tensor(module, "weight", weight, target)
        set_tensor(module, "weight_scale", scale, module.weight_scale)
        return [name, f"{module_path}.weight_scale"]
    keep_dtype = (not target.dtype.is_floating_point or target.dtype == FP8 or attr == "weight_scale"
                  or isinstance(module, UpcastLinear))
    set_tensor(module, attr, f.read(checkpoint_name, target.dtype if keep_dtype else dtype, device), target)
    return [name]


def set_tensor(module: nn.Module, attr: str, value: torch.Tensor, target: torch.Tensor) -> None:
    if isinstance(target, nn.Parameter):
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
    else:
        module._buffers[attr] = value


def rebuild_rotary(model: NextStepModel, device) -> None:
    """The rotary tables are computed, not stored: make them on the real device (float32)."""
    model.backbone.rotary_emb = Qwen2RotaryEmbedding(config=model.backbone.config).to(device)


def describe_mismatch(folder: Path, missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) the config needs are missing from the weights "
                     f"({', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the weights match nothing in the model "
                     f"({', '.join(unexpected[:4])})")
    return f"model folder {folder}: " + "; ".join(parts) + ". Do config.json and the safetensors files belong together?"
