"""Write small random NextStep checkpoints in the exact released layouts.

Tests, benchmarks and the demo-model training start from these: the same loader reads them as
reads a real download. Layouts:
- "1.0": `<root>/<name>/` (config.json with model_type "nextstep" and use_gen_pos_embed,
  safetensors shards + index, tokenizer files) and the tokenizer folder
  `<root>/NextStep-1-f8ch16-Tokenizer/` (config.json + checkpoint.pt) beside it.
- "1.1": `<root>/<name>/` with the image tokenizer inside as `vae/`, and 1.1 config keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.checkpoint import NextStepConfig, save_sharded
from ..engine.model import NextStepModel
from ..engine.vae import random_flux_state_dict
from ..engine.vae_files import VaeConfig, save_image_tokenizer
from .tiny_tokenizer import write_tiny_tokenizer

VAE_FOLDER_1_0 = "NextStep-1-f8ch16-Tokenizer"


@dataclass
class TinySpec:
    """Sizes of a tiny model. The defaults make a ~1 MB model that generates 64x64 in seconds."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    head_dim: int = 64
    head_layers: int = 2
    vae_ch: int = 32
    vae_ch_mult: tuple[int, ...] = (1, 1, 1, 1)
    vae_res_blocks: int = 1
    shards: int = 2
    tokenizer_bos: bool = False
    weight_dtype: str = "float32"  # the dtype of the written weights ("bfloat16" like the releases)


def sincos_table(grid: int, dim: int) -> torch.Tensor:
    """(1, grid*grid, dim) 2-D sin-cos position table: half the channels for rows, half for columns."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos):
        args = pos.reshape(-1, 1) * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()[None]


def tiny_config_dict(spec: TinySpec, vocab_size: int, special: dict[str, int], version: str) -> dict:
    config = {
        "architectures": ["NextStep"],
        "model_type": "nextstep" if version == "1.0" else "stepx_llama",
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": spec.max_position_embeddings,
        "attention_bias": True,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "latent_channels": 16,
        "latent_patch_size": 2,
        "fm_head_dim": spec.head_dim,
        "fm_head_layers": spec.head_layers,
        "boi": special["boi"],
        "eoi": special["eoi"],
        "image_placeholder_id": special["placeholder"],
        "pad_token_id_added": special["pad"],
        "torch_dtype": "float32",
    }
    if version == "1.0":
        config.update(latent_size=32, use_gen_pos_embed=True, o_attention_bias=False,
                      vae_name_or_path=f"stepfun-ai/{VAE_FOLDER_1_0}",
                      lm_loss_weight=0.01, im_loss_weight=1.0, fm_head_batch_mul=4)
    else:
        config.update(genloss_dim=spec.head_dim, genloss_depth=spec.head_layers, base_image_grid_size=16)
    return config


def release_state_dict(model: NextStepModel) -> dict[str, torch.Tensor]:
    """Module tensors under their released names (decoder tensors without any prefix)."""
    out = {}
    for name, tensor in list(model.state_dict().items()):
        if "rotary_emb" in name:
            continue
        out[name.removeprefix("backbone.")] = tensor.detach().contiguous().clone()
    return out



def tiny_vae_config(spec: TinySpec, version: str) -> VaeConfig:
    fields = {"resolution": 256, "in_channels": 3, "ch": spec.vae_ch, "out_ch": 3, "ch_mult": list(spec.vae_ch_mult),
              "num_res_blocks": spec.vae_res_blocks, "z_channels": 16}
    if version == "1.0":
        fields.update(scaling_factor=1.0, shift_factor=0.0, deterministic=True, encoder_norm=True, psz=2)
    return VaeConfig.from_dict(fields, nextstep_1_1_defaults=version == "1.1")


def write_tiny_model(root: str | Path, *, version: str = "1.1", name: str | None = None, seed: int = 0,
                     spec: TinySpec | None = None) -> Path:
    """Write a random tiny model in the `version` release layout under `root`; returns the model folder."""
    spec = spec or TinySpec()
    root = Path(root)
    folder = root / (name or f"tiny-nextstep-{version}")
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(folder, with_bos=spec.tokenizer_bos)
    from ..engine.prompt import SpecialIds, load_tokenizer

    tokenizer = load_tokenizer(folder)
    special = SpecialIds.from_tokenizer(tokenizer)
    config_dict = tiny_config_dict(spec, len(tokenizer), vars(special), version)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))

    config = NextStepConfig.from_dict(config_dict)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = NextStepModel(config, spec.head_dim, spec.head_layers)
        for p in model.image_head.parameters():  # the released init zeroes the output; keep it live
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.2)
    if model.gen_pos_embed is not None:
        model.gen_pos_embed.copy_(sincos_table(32, config.hidden_size) * 0.1)
    weight_dtype = getattr(torch, spec.weight_dtype)
    save_sharded(folder, {n: t.to(weight_dtype) if t.is_floating_point() else t
                          for n, t in release_state_dict(model).items()}, spec.shards)

    vae_config = tiny_vae_config(spec, version)
    vae_folder = folder / "vae" if version == "1.1" else root / VAE_FOLDER_1_0
    save_image_tokenizer(vae_folder, vae_config, random_flux_state_dict(vae_config, seed=seed))
    return folder
