"""The reference picture of the Edit, Continue and Regenerate Region nodes, and their masks.

A reference comes in as an IMAGE or as a LATENT (exactly one of the two). A LATENT goes to the
engine as a LatentImage, used as it is: no decode to pixels and encode back, so no posterior
draw and no blur from the round trip. An IMAGE goes as pixels, which the engine encodes.

Masks follow ComfyUI's MASK convention: float (H, W) or (1, H, W) at the image's pixel size,
> 0 where the picture is to be redrawn (Load Image's MASK output is 1 where the alpha channel
was painted away in the mask editor). Nothing is resized silently: a mask of another size is
an error that names both sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nextstep_core import LatentImage
from ..nextstep_core.errors import NextStepError
from .latent import from_latent_dict

PIXELS_PER_TOKEN = 16  # 8 (autoencoder) x 2 (token patch), the same for every released checkpoint
LATENT_SCALE = 8  # pixels per latent position


@dataclass(frozen=True)
class Reference:
    """What the engine takes as `image` / `reference` (pixels (1, H, W, 3) or a LatentImage), and its size."""

    source: torch.Tensor | LatentImage
    width: int
    height: int


def reference_input(model, image, latent, node: str) -> Reference:
    """The one reference of `node` from its IMAGE or its LATENT input."""
    if image is not None and latent is not None:
        raise NextStepError(f"connect either the image or the latent reference of {node}, not both")
    if image is None and latent is None:
        raise NextStepError(f"{node} needs a reference: connect an image or a latent")
    if latent is not None:
        samples = from_latent_dict(latent, model.vae.config, "reference latent")
        count, height, width = samples.shape[0], samples.shape[2] * LATENT_SCALE, samples.shape[3] * LATENT_SCALE
    else:
        count, height, width = image.shape[0], image.shape[1], image.shape[2]
    if count != 1:
        raise NextStepError(f"the reference holds {count} images; {node} takes one image at a time "
                            "(use batch_size for several results)")
    source = LatentImage(samples) if latent is not None else image[..., :3]
    return Reference(source, width, height)


def region_mask(mask: torch.Tensor, width: int, height: int, node: str) -> torch.Tensor:
    """A ComfyUI MASK -> (H, W) float32 on the CPU, checked against the output size and for being empty."""
    if mask.dim() == 3:
        if mask.shape[0] != 1:
            raise NextStepError(f"the mask holds {mask.shape[0]} masks; {node} takes one")
        mask = mask[0]
    if mask.dim() != 2:
        raise NextStepError(f"the mask has shape {tuple(mask.shape)}; {node} takes a MASK (height, width)")
    if tuple(mask.shape) != (height, width):
        raise NextStepError(f"the mask is {mask.shape[1]}x{mask.shape[0]} pixels but the image is {width}x{height}; "
                            "give a mask of the image's size (it is not resized)")
    mask = mask.float().cpu()
    if not bool((mask > 0).any()):
        raise NextStepError("the mask is empty: paint the region to redraw (e.g. in Load Image's mask editor: "
                            "the painted area is the mask)")
    return mask


def check_keep_rows(keep_rows: int, height: int) -> None:
    """keep_rows must leave at least one image-token row to generate."""
    rows = height // PIXELS_PER_TOKEN
    if keep_rows >= rows:
        raise NextStepError(f"keep_rows {keep_rows} keeps the whole image: it is {height} pixels high, {rows} token "
                            f"rows of 16 pixels; keep fewer rows than that")
