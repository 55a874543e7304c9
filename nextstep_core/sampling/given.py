"""Given tokens (nextstep-reference.md section 11): positions whose token the caller supplies.

- `continuation_mask`: the first keep_rows token rows given;
- `region_given_mask`: every token whose cell (pixels_per_token square) overlaps the region
  is sampled, grown by `grow` tokens (a square neighbourhood), the others given;
- `GivenFeed`: what both token loops read: for each position whether it is given and, if so,
  its token (images, token_dim) in the model's dtype. At a given position a loop evaluates no
  head and draws no noise; the token is output and fed back as it is (no `use_norm`) to every
  guidance row. Sampled positions draw their noise in the contract's order, skipping given
  ones, so with nothing given the loops are exactly plain generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_count, check_keep_rows, check_region, check_same_size
from ..errors import NextStepError


def continuation_mask(keep_rows: int, token_grid: tuple[int, int]) -> torch.Tensor:
    """(rows * cols,) bool: True for the first keep_rows * cols positions (raster order)."""
    rows, cols = token_grid
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[: keep_rows * cols] = True
    return mask


def region_sampled_cells(region: torch.Tensor, pixels_per_token: int, grow: int = 0) -> torch.Tensor:
    """region (H, W) bool (True = redraw) -> (rows, cols) bool, True where a token is sampled:
    its pixels_per_token square cell holds a True pixel, or one within `grow` tokens does
    (dilation with a (2 grow + 1)^2 square)."""
    h, w = region.shape
    p = pixels_per_token
    cells = region.reshape(h // p, p, w // p, p).any(dim=3).any(dim=1)
    if grow > 0:
        grown = F.max_pool2d(cells[None, None].float(), kernel_size=2 * grow + 1, stride=1, padding=grow)
        cells = grown[0, 0] > 0
    return cells


def region_given_mask(region: torch.Tensor, pixels_per_token: int, grow: int = 0) -> torch.Tensor:
    """(rows * cols,) bool, True where a token is given: outside the (grown) region's cells."""
    return ~region_sampled_cells(region, pixels_per_token, grow).reshape(-1)


class GivenFeed:
    """The given positions of one generation, as the token loops read them.

    tokens: (T, D) or (n, T, D) given tokens (n = images; a single (T, D) is shared by every
    image), mask: (T,) bool, or both None for plain generation. Tokens are moved once to
    `device` in `dtype` (the model's: the loops' tokens are in it)."""

    def __init__(self, tokens: torch.Tensor | None, mask: torch.Tensor | None, images: int, num_tokens: int,
                 dtype: torch.dtype, device):
        if (tokens is None) != (mask is None):
            raise ValueError("given_tokens and given_mask go together")
        self.flags = [False] * num_tokens if mask is None else [bool(v) for v in mask.tolist()]
        if len(self.flags) != num_tokens:
            raise ValueError(f"given_mask has {len(self.flags)} positions for {num_tokens} tokens")
        self.tokens = None
        if tokens is not None:
            block = tokens if tokens.dim() == 3 else tokens[None]
            if block.shape[1] != num_tokens or block.shape[0] not in (1, images):
                raise ValueError(f"given_tokens of shape {tuple(tokens.shape)} do not fit {images} image(s) "
                                 f"of {num_tokens} tokens")
            self.tokens = block.to(device=device, dtype=dtype).expand(images, -1, -1)

    @property
    def any(self) -> bool:
        return any(self.flags)

    def __getitem__(self, k: int) -> bool:
        """Whether position k is given."""
        return self.flags[k]

    def token(self, k: int) -> torch.Tensor:
        """The given token at position k for every image: (images, D), contiguous."""
        return self.tokens[:, k].contiguous()


def plan_given(*, keep_rows, region, grow, has_reference: bool, reference_size: tuple[int, int] | None,
               token_grid: tuple[int, int], pixels_per_token: int) -> torch.Tensor | None:
    """Check the given-token options (checks.py) and return the (num_tokens,) given mask, or
    None when nothing is given (keep_rows 0 and no region). Runs before any model work.

    reference_size: the (width, height) of the reference (or, for a masked edit, the edit
    image) the given tokens come from."""
    rows, cols = token_grid
    size = (cols * pixels_per_token, rows * pixels_per_token)
    keep_rows = check_keep_rows(keep_rows, rows, pixels_per_token)
    grow = check_count("grow", grow, minimum=0)
    if keep_rows and region is not None:
        raise NextStepError("keep_rows and region cannot be used together: keep the top rows (continuation) "
                            "or redraw a region, not both")
    if grow and region is None:
        raise NextStepError(f"grow {grow} widens a region, but no region was given")
    if not keep_rows and region is None:
        return None
    if not has_reference:
        need = "keep_rows" if keep_rows else "a region redraw"
        raise NextStepError(f"{need} needs a reference image to take the kept tokens from (reference=, or an "
                            "edit image for a masked edit)")
    check_same_size("the reference", reference_size, size)
    if keep_rows:
        return continuation_mask(keep_rows, token_grid)
    return region_given_mask(check_region(region, *size), pixels_per_token, grow)
