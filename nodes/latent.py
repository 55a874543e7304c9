"""LATENT dicts in ComfyUI's Flux convention, and the NextStep tokenizer's own latent space.

ComfyUI's LATENT for Flux-family models is `{"samples": z}` with z shaped (batch, 16, H/8,
W/8) and z the autoencoder's RAW latent, exactly what the VAE's encoder gives (VAEEncode) and
its decoder takes (VAEDecode); the model's own scaling (Flux: (z - 0.1159) * 0.3611) is
applied inside the sampler by `latent_format.process_in` and undone by `process_out`.
Empty latents (EmptySD3LatentImage) are zeros of that shape.

The NextStep engine works in the tokenizer's NORMALISED space, latent = (z - shift_factor) *
scaling_factor (the tokenizer's config.json), so on a LATENT wire
    z = latent / scaling_factor + shift_factor      (to_latent_dict)
    latent = (z - shift_factor) * scaling_factor    (from_latent_dict)
— the same relation as Flux's process_out / process_in, with NextStep's factors.

What the raw z means: the NextStep tokenizer is a Flux-architecture autoencoder with its own
weights, and its encoder layer-normalises every latent position (or 2x2 patch) across the 16
channels (`encoder_norm`). So a NextStep LATENT has Flux's shape and can go through native
latent nodes (save/load, crop, composite, batch) and be decoded by the NextStep tokenizer,
also when it is loaded with the native VAELoader; but it is NOT in Flux's VAE space: a Flux
model would read it as a different image. To refine with Flux, decode to pixels first and
encode with Flux's VAE. The native VAEEncode with the NextStep tokenizer returns the posterior
mean WITHOUT the per-position normalisation; NextStep VAE Encode returns it normalised.
"""

from __future__ import annotations

import torch

from ..nextstep_core.errors import NextStepError
from .model import to_output


def to_latent_dict(latents: torch.Tensor, vae_config) -> dict:
    """Engine latents (B, 16, H/8, W/8), normalised -> {"samples": raw z} on the intermediate device."""
    raw = latents.float() / vae_config.scaling_factor + vae_config.shift_factor
    return {"samples": to_output(raw)}


def from_latent_dict(latent: dict, vae_config, what: str = "latent") -> torch.Tensor:
    """{"samples": raw z} -> engine latents (float32), checking it is a 16-channel image latent."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise NextStepError(f"the {what} input is not a LATENT with samples")
    if samples.dim() != 4 or samples.shape[1] != vae_config.z_channels:
        raise NextStepError(f"the {what} has shape {tuple(samples.shape)}; NextStep's image tokenizer uses "
                            f"{vae_config.z_channels}-channel image latents (batch, {vae_config.z_channels}, H/8, W/8)")
    return (samples.float() - vae_config.shift_factor) * vae_config.scaling_factor
