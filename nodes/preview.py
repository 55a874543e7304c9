"""Per-token progress, interrupt checks and a cheap live preview of the image being generated.

NextStep writes its image one 2x2-latent token at a time in raster order, so the preview shows
the rows filling in. It is a linear map from the 16 latent channels to RGB, fitted once per
image tokenizer by least squares on a few flat-colour images run through its encoder (no
random numbers, a few milliseconds on a GPU); positions not generated yet are grey.

Like ComfyUI's own samplers, previews follow the server's --preview-method: none turns them
off (the progress bar still moves), any other method gives this linear preview.
"""

from __future__ import annotations

import itertools
import time

import comfy.model_management as mm
import comfy.utils
import torch
from comfy.cli_args import LatentPreviewMethod, args
from PIL import Image

from ..nextstep_core.engine.model import unpatchify
from .model import LoadedImageTokenizer

PREVIEW_INTERVAL_S = 0.25  # at most this often (besides the first and the last token)
CALIBRATION_LEVELS = (-1.0, 0.0, 1.0)  # per RGB channel, in pixel units [-1, 1]


@torch.no_grad()
def fit_preview_factors(vae: LoadedImageTokenizer) -> torch.Tensor:
    """(17, 3): RGB in [-1, 1] ~ [latent channels, 1] @ factors, fitted on flat colours."""
    if vae.preview_factors is None:
        tokenizer = vae.image_tokenizer
        weight = next(tokenizer.parameters())
        size = 2 * tokenizer.config.downsample * max(1, tokenizer.config.psz or 1)
        colours = torch.tensor(list(itertools.product(CALIBRATION_LEVELS, repeat=3)))
        pixels = colours[:, :, None, None].expand(-1, -1, size, size).contiguous()
        latents = tokenizer.encode(pixels.to(weight.device, weight.dtype)).float().cpu()  # (K, C, h, w)
        c = latents.shape[1]
        x = latents.permute(0, 2, 3, 1).reshape(-1, c)
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        y = colours[:, None, :].expand(-1, latents.shape[2] * latents.shape[3], -1).reshape(-1, 3)
        vae.preview_factors = torch.linalg.lstsq(x, y).solution
    return vae.preview_factors


def render_preview(tokens: torch.Tensor, token_grid: tuple[int, int], patch: int, factors: torch.Tensor) -> Image.Image:
    """The first image's tokens so far (done, token_dim) -> an RGB picture, grey where nothing is generated yet."""
    rows, cols = token_grid
    done = tokens.shape[0]
    full = torch.zeros(rows * cols, tokens.shape[1])
    full[:done] = tokens.float().cpu()
    latent = unpatchify(full[None], token_grid, patch)[0]  # (C, h, w)
    rgb = torch.einsum("chw,cd->hwd", latent, factors[:-1]) + factors[-1]
    generated = (torch.arange(rows * cols) < done).reshape(rows, cols)
    generated = generated.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    rgb = torch.where(generated[..., None], rgb, torch.zeros(()))
    array = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(array)
    scale = max(1, 128 // max(image.size))  # small latents are scaled up so the preview is visible
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


class TokenProgress:
    """The engine's per-token callback: interrupt check, progress bar, throttled preview."""

    def __init__(self, vae: LoadedImageTokenizer, token_grid: tuple[int, int], patch: int):
        self.vae = vae
        self.token_grid = token_grid
        self.patch = patch
        self.bar = comfy.utils.ProgressBar(token_grid[0] * token_grid[1])
        self.previews = args.preview_method != LatentPreviewMethod.NoPreviews
        self.last_preview = 0.0

    def __call__(self, done: int, total: int, tokens: torch.Tensor) -> None:
        # raises comfy.model_management.InterruptProcessingException after POST /interrupt:
        # the engine lets it through, so the run stops within one token
        mm.throw_exception_if_processing_interrupted()
        preview = None
        now = time.monotonic()
        if self.previews and (done in (1, total) or now - self.last_preview >= PREVIEW_INTERVAL_S):
            picture = render_preview(tokens[0], self.token_grid, self.patch, fit_preview_factors(self.vae))
            preview = ("JPEG", picture, args.preview_size)
            self.last_preview = now
        self.bar.update_absolute(done, total, preview)
