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
from ..nextstep_core.checks import check_region
from ..nextstep_core.errors import NextStepError
from .latent import from_latent_dict

EMPTY_MASK_HINT = " (paint the area to redraw in Load Image's mask editor: the painted area is the mask)"


@dataclass(frozen=True)
class Reference:
    """What the engine takes as `image` / `reference` (pixels (1, H, W, 3) or a LatentImage), and its size."""

    source: torch.Tensor | LatentImage
    width: int
    height: int


def reference_input(model, image, latent, node: str) -> Reference:
    """The one reference of `node` from its IMAGE or its LATENT input; a LATENT's pixel size is the
    loaded model's (its image tokenizer's downsample factor)."""
    if image is not None and latent is not None:
        raise NextStepError(f"connect either the image or the latent reference of {node}, not both")
    if image is None and latent is None:
        raise NextStepError(f"{node} needs a reference: connect an image or a latent")
    samples = None if latent is None else from_latent_dict(latent, model.vae.config, "reference latent")
    count = image.shape[0] if samples is None else samples.shape[0]
    if count != 1:
        raise NextStepError(f"the reference holds {count} images; {node} takes one image at a time "
                            "(use batch_size for several results)")
    if samples is None:
        return Reference(image[..., :3], image.shape[2], image.shape[1])
    source = LatentImage(samples)
    width, height = source.pixel_size(model.pipe.image_tokenizer.config.downsample)
    return Reference(source, width, height)


def region_mask(mask: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A ComfyUI MASK ((1, H, W) or (H, W), > 0 = redraw), checked by the engine against the output's
    size and for being empty, before the model is moved or run."""
    check_region(mask, width, height, empty_hint=EMPTY_MASK_HINT)
    return mask
