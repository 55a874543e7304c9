"""`LatentImage`: an image handed to the engine as the image tokenizer's normalised latent grid.

A `GenerationResult.latents[i:i + 1]` is one, so is `(z - shift_factor) * scaling_factor` of an
encoded image. Handed to `generate` as the edit image (`image=`) or as the source of given
tokens (`reference=`), it is used as it is: no decode, no re-encode, so a chain of edits loses
nothing between passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NextStepError


@dataclass(frozen=True)
class LatentImage:
    """latent: (1, C, H/8, W/8) float tensor in the tokenizer's normalised latent space
    ((z - shift_factor) * scaling_factor, the space of `GenerationResult.latents`).

    Its channel count and size are checked against the model when it is used (`generate`)."""

    latent: torch.Tensor

    def __post_init__(self):
        latent = self.latent
        if not isinstance(latent, torch.Tensor):
            raise NextStepError(f"LatentImage takes a latent tensor, not {type(latent).__name__}")
        if latent.dim() != 4 or latent.shape[0] != 1:
            raise NextStepError(f"LatentImage's latent has shape {tuple(latent.shape)}; expected (1, channels, "
                                "height / 8, width / 8): one image (take result.latents[i:i + 1])")
        if not latent.dtype.is_floating_point:
            raise NextStepError(f"LatentImage's latent is {latent.dtype}; expected a float tensor")
        if not bool(torch.isfinite(latent).all()):
            raise NextStepError("LatentImage's latent holds NaN or infinite values")

    @property
    def channels(self) -> int:
        return self.latent.shape[1]

    def pixel_size(self, downsample: int) -> tuple[int, int]:
        """(width, height) in pixels of the image this latent decodes to."""
        return self.latent.shape[3] * downsample, self.latent.shape[2] * downsample
