"""The image tokenizer: a Flux-style 16-channel, 8x-downsampling autoencoder on diffusers' `AutoencoderKL`.

Its files (config.json, weights in Flux or diffusers naming) are read, checked and written by
vae_files.py; load_image_tokenizer here builds the network from them.

Conventions (B = batch, z = z_channels, f = downsample factor, 8 for ch_mult [1, 2, 4, 4]):
- pixels: (B, 3, H, W) in [-1, 1] (uint8 x / 127.5 - 1); images: (B, H, W, 3) floats in [0, 1].
- posterior: mean and logvar, each (B, z, H/f, W/f); with `encoder_norm` the mean is
  layer-normalised per position (or per psz x psz patch); logvar is clamped to [-30, 20].
- latent = (z_sample - shift_factor) * scaling_factor, z_sample = mean (+ exp(logvar/2) * noise
  unless `deterministic`); decoding inverts it before the decoder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ..checks import image_to_pixels
from ..errors import NextStepError
from .vae_files import (
    VaeConfig,
    check_weights,
    diffusers_keys_to_flux,
    find_weights,
    flux_keys_to_diffusers,
    read_config,
    read_weights,
    rename,
)

LOGVAR_RANGE = (-30.0, 20.0)
NORM_EPS = 1e-6


def build_autoencoder(config: VaeConfig) -> AutoencoderKL:
    """diffusers' AutoencoderKL shaped like the Flux autoencoder: no quant convs, mid-block attention on."""
    levels = len(config.ch_mult)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=config.block_channels,
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=config.norm_groups,
        sample_size=config.resolution,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


# ----- encoder normalisation and pixel conversions -----


def normalize_latent_positions(mean: torch.Tensor, psz: int | None) -> torch.Tensor:
    """Layer-normalise every latent position (psz None/0/1) or every psz x psz patch over its channels.

    mean (B, C, h, w) -> (B, C, h, w); no affine, eps 1e-6, computed in float32, returned in
    mean's dtype. A patch is the C * psz * psz numbers of psz x psz neighbouring positions.
    """
    b, c, h, w = mean.shape
    p = psz or 1
    if h % p or w % p:
        raise NextStepError(f"the latent grid {h}x{w} cannot be cut into {p}x{p} patches (VAE config field 'psz' "
                            f"is {p}); use an image size that is a multiple of {p} latent positions")
    patches = mean.float().reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    normed = F.layer_norm(patches.reshape(b, h // p, w // p, c * p * p), (c * p * p,), eps=NORM_EPS)
    back = normed.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return back.reshape(b, c, h, w).to(mean.dtype)


def pixels_to_image(pixels: torch.Tensor) -> torch.Tensor:
    """pixels (B, 3, H, W), nominally [-1, 1] -> float32 images (B, H, W, 3), (x + 1) / 2 clamped to [0, 1]."""
    return ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


# ----- the module -----


class ImageTokenizer(torch.nn.Module):
    """pixels (B, 3, H, W) in [-1, 1] <-> latents (B, z_channels, H/8, W/8), per `config`."""

    config: VaeConfig
    autoencoder: AutoencoderKL

    def __init__(self, config: VaeConfig, autoencoder: AutoencoderKL | None = None):
        """Randomly initialised unless a ready `autoencoder` (of this config's shape) is given."""
        super().__init__()
        self.config = config
        self.autoencoder = autoencoder if autoencoder is not None else build_autoencoder(config)

    image_to_pixels = staticmethod(image_to_pixels)
    pixels_to_image = staticmethod(pixels_to_image)
    pil_to_pixels = staticmethod(image_to_pixels)  # a PIL image -> pixels (1, 3, H, W) float32

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """Refuse pixel tensors the encoder cannot turn into a whole latent grid."""
        f, channels = self.config.downsample, self.config.in_channels
        if pixels.dim() != 4 or pixels.shape[1] != channels:
            raise NextStepError(f"the image tokenizer takes pixels shaped (batch, {channels}, height, width), "
                                f"got {tuple(pixels.shape)}")
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise NextStepError(f"image size {pixels.shape[3]}x{pixels.shape[2]} (width x height) is not a "
                                f"multiple of {f}, the image tokenizer's downsampling")

    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, z, H/f, W/f).

        The mean is already normalised when `encoder_norm`; logvar is clamped to [-30, 20].
        """
        self.check_pixels(pixels)
        moments = self.autoencoder.encoder(pixels.to(self.autoencoder.dtype))
        mean, logvar = moments.chunk(2, dim=1)
        if self.config.encoder_norm:
            mean = normalize_latent_positions(mean, self.config.psz)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, pixels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (B, 3, H, W) -> latents (B, z, H/f, W/f) = (z_sample - shift) * scale.

        z_sample = mean + exp(logvar / 2) * noise when `noise` (B, z, H/f, W/f) is given and the
        config is not deterministic, else the mean. A deterministic tokenizer still accepts (and
        ignores) noise, which callers draw anyway to keep their random stream in step.
        """
        mean, logvar = self.posterior(pixels)
        if noise is not None and noise.shape != mean.shape:
            raise ValueError(f"posterior noise has shape {tuple(noise.shape)}, expected {tuple(mean.shape)}")
        z = mean
        if noise is not None and not self.config.deterministic:
            z = mean + torch.exp(logvar / 2) * noise.to(mean)
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latents (B, z, h, w) -> pixels (B, 3, f*h, f*w), nominally in [-1, 1] (not clamped)."""
        z = latent.to(self.autoencoder.dtype) / self.config.scaling_factor + self.config.shift_factor
        return self.autoencoder.decoder(z)

    def latent_to_image(self, latent: torch.Tensor) -> torch.Tensor:
        """latents (B, z, h, w) -> float32 images (B, f*h, f*w, 3) in [0, 1]."""
        return pixels_to_image(self.decode(latent))


# ----- a random tokenizer, and reading one -----


def random_flux_state_dict(config: VaeConfig, seed: int) -> dict[str, torch.Tensor]:
    """Weights of a freshly initialised tokenizer in the original Flux naming; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = build_autoencoder(config)
    return diffusers_keys_to_flux(autoencoder.state_dict(), len(config.ch_mult))


def load_image_tokenizer(folder, *, nextstep_1_1_defaults: bool, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> ImageTokenizer:
    """Read a tokenizer folder (config.json + weights in Flux or diffusers naming) strictly; returns it in eval mode."""
    folder = Path(folder)
    config = read_config(folder, nextstep_1_1_defaults)
    path = find_weights(folder)
    from_file = read_weights(path)
    levels = len(config.ch_mult)
    original_names = {rename(n, to_diffusers=True, levels=levels): n for n in from_file}
    state = flux_keys_to_diffusers(from_file, levels)
    if len(state) != len(from_file):
        raise NextStepError(f"VAE checkpoint {path} holds some tensors twice, under their Flux and their diffusers "
                            "names; keep one naming")
    with torch.device("meta"):
        autoencoder = build_autoencoder(config)
    check_weights(state, autoencoder.state_dict(), original_names, config, path)
    autoencoder.load_state_dict(state, strict=True, assign=True)
    tokenizer = ImageTokenizer(config, autoencoder)
    return tokenizer.to(device=device, dtype=dtype).eval()
