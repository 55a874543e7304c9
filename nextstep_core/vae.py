"""The image tokenizer: a Flux-style 16-channel autoencoder on diffusers' `AutoencoderKL`.

On disk (`NextStep-1-f8ch16-Tokenizer/`, or `vae/` inside a 1.1 model): `config.json` with the
original Flux fields (`ch`, `ch_mult`, `num_res_blocks`, `z_channels`, `scaling_factor`,
`shift_factor`, `deterministic`, `encoder_norm`, `psz`, ...) and `checkpoint.pt`, a plain state
dict in the original Flux key names (`encoder.down.0.block.1.norm1.weight`, ...). It is read with
`torch.load(weights_only=True)` only; `.safetensors` works too.

Pixels are in [-1, 1], NCHW. latent = (z - shift_factor) * scaling_factor, where z is the
(optionally normalised) posterior mean plus exp(logvar / 2) * noise unless `deterministic`.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from .errors import NextStepError


@dataclass
class VaeConfig:
    """The tokenizer's config.json. `psz`: patch size of the latent normalisation (None/0: per position)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    deterministic: bool = False
    encoder_norm: bool = False
    psz: int | None = None

    @classmethod
    def from_dict(cls, raw: dict, *, nextstep_1_1_defaults: bool) -> "VaeConfig":
        """Unknown keys are ignored. Silent 1.1 configs mean: scale 1, shift 0, deterministic,
        encoder_norm on, psz 1. Silent 1.0 configs mean: scale 1, shift 0, sampled posterior, no norm."""
        defaults = dict(deterministic=True, encoder_norm=True, psz=1) if nextstep_1_1_defaults else {}
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__ and v is not None}
        config = cls(**{**defaults, **known})
        config.ch_mult = list(config.ch_mult)
        return config

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def build_autoencoder(config: VaeConfig) -> AutoencoderKL:
    levels = len(config.ch_mult)
    return AutoencoderKL(
        in_channels=config.in_channels, out_channels=config.out_ch,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[config.ch * m for m in config.ch_mult], layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels, norm_num_groups=32, sample_size=config.resolution,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    )


# ----- key names: original Flux autoencoder <-> diffusers -----

RESNET_PARTS = {"nin_shortcut": "conv_shortcut"}
ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def flux_name_to_diffusers(name: str, levels: int) -> str:
    side, rest = name.split(".", 1)
    m = re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)", rest)
    if m:
        i, j, part, kind = m.groups()
        return f"{side}.down_blocks.{i}.resnets.{j}.{RESNET_PARTS.get(part, part)}.{kind}"
    m = re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(\w+)", rest)
    if m:
        return f"{side}.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)", rest)
    if m:
        i, j, part, kind = m.groups()
        return f"{side}.up_blocks.{levels - 1 - int(i)}.resnets.{j}.{RESNET_PARTS.get(part, part)}.{kind}"
    m = re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(\w+)", rest)
    if m:
        return f"{side}.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"mid\.block_(\d)\.(\w+)\.(\w+)", rest)
    if m:
        part = RESNET_PARTS.get(m[2], m[2])
        return f"{side}.mid_block.resnets.{int(m[1]) - 1}.{part}.{m[3]}"
    m = re.fullmatch(r"mid\.attn_1\.(\w+)\.(\w+)", rest)
    if m:
        return f"{side}.mid_block.attentions.0.{ATTENTION_PARTS[m[1]]}.{m[2]}"
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest.split('.', 1)[1]}"
    return name  # conv_in, conv_out


def is_attention_projection(diffusers_name: str) -> bool:
    return ".attentions.0.to_" in diffusers_name and diffusers_name.endswith("weight")


def flux_keys_to_diffusers(state_dict: dict, levels: int = 4) -> dict:
    """Original Flux names -> diffusers names; 1x1 conv attention weights become linear."""
    out = {}
    for name, tensor in state_dict.items():
        new = flux_name_to_diffusers(name, levels)
        if is_attention_projection(new) and tensor.dim() == 4:
            tensor = tensor[:, :, 0, 0]
        out[new] = tensor
    return out


def diffusers_keys_to_flux(state_dict: dict, levels: int = 4) -> dict:
    """diffusers names -> original Flux names (attention weights back to 1x1 convs)."""
    flux_names = {}
    for name in state_dict:
        flux_names[name] = diffusers_name_to_flux(name, levels)
    out = {}
    for name, tensor in state_dict.items():
        if is_attention_projection(name) and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        out[flux_names[name]] = tensor
    return out


def diffusers_name_to_flux(name: str, levels: int) -> str:
    side, rest = name.split(".", 1)
    inverse_resnet = {v: k for k, v in RESNET_PARTS.items()}
    inverse_attention = {v: k for k, v in ATTENTION_PARTS.items()}
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", rest)
    if m:
        kind, i, j, part, leaf = m.groups()
        i = int(i) if kind == "down" else levels - 1 - int(i)
        return f"{side}.{kind}.{i}.block.{j}.{inverse_resnet.get(part, part)}.{leaf}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", rest)
    if m:
        return f"{side}.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", rest)
    if m:
        return f"{side}.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)\.(\w+)", rest)
    if m:
        return f"{side}.mid.block_{int(m[1]) + 1}.{inverse_resnet.get(m[2], m[2])}.{m[3]}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(to_out\.0|\w+)\.(\w+)", rest)
    if m:
        return f"{side}.mid.attn_1.{inverse_attention[m[1]]}.{m[2]}"
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.split('.', 1)[1]}"
    return name


# ----- the module -----


def normalize_latent_positions(mean: torch.Tensor, psz: int | None) -> torch.Tensor:
    """Layer-normalise each latent position (or each psz x psz patch) over its channels.

    (B, C, H, W) -> same shape; no affine, eps 1e-6, computed in float32.
    """
    b, c, h, w = mean.shape
    p = psz or 1
    x = mean.float().reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)
    x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    x = x.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    return x.to(mean.dtype)


class ImageTokenizer(torch.nn.Module):
    """pixels (B, 3, H, W) in [-1, 1] <-> latents (B, z_channels, H/8, W/8)."""

    def __init__(self, config: VaeConfig):
        super().__init__()
        self.config = config
        self.autoencoder = build_autoencoder(config)

    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each (B, z, H/8, W/8); mean normalised when encoder_norm; logvar clamped to [-30, 20]."""
        moments = self.autoencoder.encoder(pixels)
        mean, logvar = moments.chunk(2, dim=1)
        if self.config.encoder_norm:
            mean = normalize_latent_positions(mean, self.config.psz)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, pixels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels -> scaled latents. `noise` (same shape as the latent) samples the posterior unless deterministic."""
        mean, logvar = self.posterior(pixels)
        z = mean
        if noise is not None and not self.config.deterministic:
            z = mean + torch.exp(logvar / 2) * noise.to(mean)
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, z, h, w) -> pixels (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        z = latent / self.config.scaling_factor + self.config.shift_factor
        return self.autoencoder.decoder(z)


# ----- files -----


def random_flux_state_dict(config: VaeConfig, seed: int) -> dict[str, torch.Tensor]:
    """A randomly initialised tokenizer's weights in the original Flux naming."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = build_autoencoder(config)
    return diffusers_keys_to_flux(module.state_dict(), len(config.ch_mult))


def save_image_tokenizer(folder: str | Path, config: VaeConfig, flux_state_dict: dict, *, fmt: str = "pt") -> Path:
    """Write config.json and checkpoint.pt (a plain dict of tensors) or checkpoint.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    tensors = {k: v.detach().contiguous() for k, v in flux_state_dict.items()}
    if fmt == "safetensors":
        save_file(tensors, str(folder / "checkpoint.safetensors"))
    else:
        torch.save(tensors, folder / "checkpoint.pt")
    return folder


def find_vae_weights(folder: Path) -> Path:
    for name in ("checkpoint.safetensors", "checkpoint.pt", "diffusion_pytorch_model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found[0]
    raise NextStepError(f"image tokenizer (VAE) folder {folder} has no checkpoint.pt or .safetensors weights")


def read_vae_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pt file read with weights_only=True (never unpickled freely)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise NextStepError(
            f"VAE checkpoint {path} is not a plain tensor state dict and was refused (it is only read with "
            f"weights_only=True, which never runs code from the file): {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise NextStepError(f"VAE checkpoint {path} cannot be read (truncated or corrupt?): {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NextStepError(f"VAE checkpoint {path} does not hold a dict of tensors")
    return {k.removeprefix("vae."): v for k, v in state.items()}


def load_image_tokenizer(folder: str | Path, *, nextstep_1_1_defaults: bool, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> ImageTokenizer:
    """Read config.json and the weights of a tokenizer folder; every tensor must fit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NextStepError(f"image tokenizer (VAE) folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise NextStepError(f"image tokenizer (VAE) folder {folder} has no config.json")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise NextStepError(f"VAE config {folder / 'config.json'} is not valid JSON ({exc.msg})") from None
    config = VaeConfig.from_dict(raw, nextstep_1_1_defaults=nextstep_1_1_defaults)
    path = find_vae_weights(folder)
    state = read_vae_weights(path)
    if not any(k.startswith(("encoder.down_blocks", "decoder.up_blocks")) for k in state):
        state = flux_keys_to_diffusers(state, len(config.ch_mult))
    tokenizer = ImageTokenizer(config)
    check_vae_state(tokenizer, state, path)
    tokenizer.autoencoder.load_state_dict(state, strict=True)
    return tokenizer.to(device=device, dtype=dtype).eval()


def check_vae_state(tokenizer: ImageTokenizer, state: dict, path: Path) -> None:
    expected = tokenizer.autoencoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"is missing {len(missing)} tensors the config needs ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"has {len(unexpected)} tensors the config does not describe ({', '.join(unexpected[:3])})")
        raise NextStepError(f"VAE checkpoint {path} " + " and ".join(parts) + "; is this a Flux-style f8ch16 tokenizer "
                            "and does its config.json belong to it?")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise NextStepError(f"VAE checkpoint {path}: tensor {name} has shape {tuple(tensor.shape)}, config.json "
                                f"(ch, ch_mult, z_channels) needs {tuple(expected[name].shape)}")
