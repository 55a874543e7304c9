"""GenerationResult: what pipeline.generate returns (kept here so pipeline.py stays small)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass
class GenerationResult:
    """tokens (images, rows*cols, 64); latents (images, 16, H/8, W/8) in the tokenizer's
    normalised latent space; images (images, H, W, 3) float in [0, 1] (None if not decoded).
    Images are ordered prompt-major: image i of prompt p is row p * images_per_prompt + i.
    given: (rows*cols,) bool in raster order, True where the token was given (keep_rows,
    region), the same for every image; None when neither keep_rows nor a region was asked for.
    forward_passes: decoder passes after the prefill (rows*cols - 1 one token per pass; fewer
    with parallel_window). head_evaluations: flow-head evaluations per token summed over the
    sampled tokens (each on every guidance branch and image at once; fewer with head_steps_floor)."""

    tokens: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor | None
    token_grid: tuple[int, int]
    given: torch.Tensor | None = None
    forward_passes: int = 0
    head_evaluations: int = 0

    def to_pil(self) -> list[Image.Image]:
        if self.images is None:
            raise ValueError("the images were not decoded (decode=False)")
        arrays = (self.images.float().cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arrays]
