"""generate(): prompt rows -> prefill -> KV-cached token loop -> latent grid -> pixels.

    pipe = NextStepPipeline.from_folder("models/nextstep/NextStep-1.1", dtype="bfloat16", device="cuda")
    result = pipe.generate("a red circle", width=256, height=256, seed=1)
    result.to_pil()[0].save("out.png")

Randomness comes only from a `torch.Generator` (CPU) seeded with `seed`, drawn in the
reference order: (1.0 editing) one posterior draw for all image-carrying rows, then for each
sampled token its initial noise and one draw per stochastic step (given tokens draw nothing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache, PreTrainedTokenizerBase, StaticCache

from .checks import check_count, check_device, check_image_size, check_number, image_to_pixels
from .engine.checkpoint import NextStepConfig, VersionSettings, inspect_model_folder
from .engine.latents import LatentImage
from .engine.model import NextStepModel, load_model, patchify, unpatchify
from .engine.precision import for_device, parse_precision
from .engine.prompt import IMAGE_MARKER, PLACEHOLDER, PromptRows, build_prompt_rows, load_tokenizer
from .engine.vae import ImageTokenizer, load_image_tokenizer
from .errors import NextStepError
from .memory.offload import check_block_swap, enable_block_swap
from .sampling.given import plan_given
from .sampling.graphs import graph_mode
from .sampling.reference_loop import decode_tokens_reference
from .sampling.result import GenerationResult
from .sampling.settings import CFG_SCHEDULES, RECOMMENDED_STEPS, SamplerSettings
from .sampling.token_loop import (
    DecodeRequest,
    GenerationInterrupted,
    ProgressCallback,
    cpu_threads,
    decode_tokens,
    runs_best_on_one_thread,
)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

LOOPS = ("fast", "reference")
__all__ = ["NextStepPipeline", "GenerationResult", "GenerationInterrupted", "LatentImage", "ProgressCallback", "LOOPS",
           "image_to_pixels"]
ImageInput = Image.Image | torch.Tensor | LatentImage


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NextStepError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    return DTYPES[dtype]


class NextStepPipeline:
    """A loaded model, its text tokenizer and image tokenizer, and its version settings."""

    def __init__(self, model: NextStepModel, tokenizer: PreTrainedTokenizerBase, image_tokenizer: ImageTokenizer,
                 version: VersionSettings, version_reasons: list[str] | None = None, folder: Path | None = None):
        self.folder = folder  # the model folder it was loaded from, if any
        self.model = model
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.version = version
        self.version_reasons = version_reasons or []
        check_tokenizer_matches(model, image_tokenizer)

    @classmethod
    def from_folder(cls, model_folder: str | Path, vae_folder: str | Path | None = None, *, version: str = "auto",
                    dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                    precision: str | None = None, block_swap: int = 0,
                    fp8_compute: torch.dtype = torch.bfloat16) -> NextStepPipeline:
        """Load a model folder as published (and its image tokenizer folder) onto `device` in `dtype`.

        precision (bf16, fp16, fp32, fp8_e4m3fn; see precision.py) overrides dtype; fp8 keeps the
        decoder matrices in fp8 and computes in `fp8_compute` (bfloat16). block_swap keeps that many decoder
        layers on the CPU and streams them to the compute device when used (offload.py).
        """
        device = check_device(device)
        precision = parse_precision(parse_dtype(dtype) if precision is None else precision, fp8_compute=fp8_compute)
        precision = for_device(precision, device)
        dtype = precision.dtype
        files = inspect_model_folder(model_folder, vae_folder=vae_folder, version=version)
        check_block_swap(block_swap, files.config.num_hidden_layers)
        tokenizer = load_tokenizer(files.tokenizer_folder)
        image_tokenizer = load_image_tokenizer(files.vae_folder, nextstep_1_1_defaults=files.version.name == "1.1",
                                               dtype=dtype, device=device)
        check_vae_channels(files.config, image_tokenizer, files.vae_folder)
        model = load_model(files, device=device, precision=precision)
        if block_swap:
            enable_block_swap(model, block_swap)
        return cls(model, tokenizer, image_tokenizer, files.version, files.version_reasons, files.folder)

    @property
    def device(self) -> torch.device:
        return self.model.image_in_projector.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.image_in_projector.weight.dtype

    @property
    def pixels_per_token(self) -> int:
        return self.image_tokenizer.config.downsample * self.model.config.latent_patch_size

    def sampler_settings(self, sampler: str = "auto", steps: int | None = None, shift: float | None = None,
                         noise_level: float = 0.8, velocity_norm: bool = False,
                         editing: bool = False) -> SamplerSettings:
        """The version's defaults where an option is left as auto/None (a few-step sampler's
        steps default to its RECOMMENDED_STEPS)."""
        v = self.version
        name = v.sampler if sampler == "auto" else sampler
        if steps is None:
            steps = RECOMMENDED_STEPS.get(name, v.edit_steps if editing else v.steps)
        settings = SamplerSettings(
            name=name,
            steps=steps,
            shift=(v.edit_shift if editing else v.shift) if shift is None else shift,
            noise_level=noise_level, velocity_norm=velocity_norm,
        )
        settings.validate()
        return settings

    @torch.no_grad()
    def generate(
        self,
        prompts: str | list[str],
        *,
        width: int | None = None,
        height: int | None = None,
        negative: str | None = None,
        positive: str | None = None,
        num_images: int = 1,
        cfg: float | None = None,
        cfg_img: float | None = None,
        cfg_schedule: str = "constant",
        sampler: str = "auto",
        steps: int | None = None,
        shift: float | None = None,
        noise_level: float = 0.8,
        use_norm: bool | None = None,
        velocity_norm: bool = False,
        image: ImageInput | None = None,
        reference: ImageInput | None = None,
        keep_rows: int = 0,
        region: torch.Tensor | np.ndarray | Image.Image | None = None,
        grow: int = 0,
        seed: int = 0,
        callback: ProgressCallback | None = None,
        decode: bool = True,
        loop: str = "fast",
        exact: bool = True,
        compile: bool = False,
        graph: str | bool = "auto",
        parallel_window: int = 0,
        head_steps_floor: int | None = None,
    ) -> GenerationResult:
        """Text-to-image, or editing when `image` is given (the prompt holds one `<image>` marker).

        image: a PIL image, a pixel tensor (H, W, 3) in [0, 1], or a LatentImage, used as it is
        (no encode: lossless edit chains; for 1.0 the generator still advances by the posterior
        draw the pixel path makes, so the tokens' noise is the pixel path's).
        Given tokens (nextstep-reference.md section 11; docs/given-tokens.md): their head is
        not run and they draw no noise; the result's `given` marks them.
        - keep_rows: continuation; the first keep_rows token rows (16 px each) are taken from
          `reference` (PIL, pixel tensor or LatentImage, of the output's size; when editing,
          the edit image unless `reference` is given);
        - region: a mask of the output's size (tensor (H, W) / (1, H, W), > 0 = redraw; numpy
          array; PIL image): every token whose 16x16 cell overlaps it is sampled (the cells
          widened by `grow` tokens), the others are given from `reference`; when editing, from
          the edit image unless `reference` says otherwise (a masked edit).
        Tokens from pixels are the tokenizer's normalised posterior mean (no random draw);
        from a LatentImage exactly its patchified latent.

        width/height default to the input image's size when editing (else the reference's). Options left as None take
        the checkpoint version's defaults (see checkpoint.VersionSettings). Raises NextStepError
        for bad input before any model work.

        Speed options (sampling/token_loop.py): loop "fast" (default) or "reference" (the
        contract line by line, for comparison); exact=False lets the fast loop read each head
        modulation weight once per token instead of once per step and use a static KV cache
        (float rounding differs); compile=True torch.compiles the head step (off by default);
        graph "auto" (default) captures each token's whole step once as a CUDA graph on a CUDA
        device and replays it for every later token ("on": also on other devices, as a recorded
        replay that checks the step is graph-safe; "off": never; see sampling/graphs.py).
        parallel_window w > 0: next-set decoding, a row starts once the row above is w tokens
        ahead (sampling/parallel.py); head_steps_floor: annealed head steps (None: off).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        editing = image is not None
        v = self.version
        cfg = v.cfg if cfg is None else cfg
        cfg_img = (v.edit_cfg_img if editing else 1.0) if cfg_img is None else cfg_img
        use_norm = v.use_norm if use_norm is None else use_norm
        settings = self.sampler_settings(sampler, steps, shift, noise_level, velocity_norm, editing)
        source = self.check_request(prompts, image, cfg, cfg_img, cfg_schedule, num_images)
        if reference is None and editing and (keep_rows or region is not None):
            reference = image  # a masked edit keeps the edit image's own tokens
        reference = None if reference is None else self.image_input(reference, "the reference")
        if loop not in LOOPS:
            raise NextStepError(f"loop {loop!r} is not one of {', '.join(LOOPS)}")
        graph_steps = None if loop == "reference" else graph_mode(
            graph, self.device, block_swap=getattr(self.model, "block_swap", None) is not None, compile=compile)
        for given_size in (self.input_size(source), self.input_size(reference)):
            if width is None and height is None and given_size is not None:
                width, height = given_size
        if width is None or height is None:
            raise NextStepError("give both width and height (or an input image to take them from)")
        token_grid = check_image_size(width, height, self.pixels_per_token)
        edit_size = self.input_size(source)
        edit_grid = None if edit_size is None else check_image_size(*edit_size, self.pixels_per_token)
        given_mask = plan_given(keep_rows=keep_rows, region=region, grow=grow, has_reference=reference is not None,
                                reference_size=self.input_size(reference), token_grid=token_grid,
                                pixels_per_token=self.pixels_per_token)

        rows = build_prompt_rows(
            self.tokenizer, prompts, token_grid=token_grid, negative=negative, positive=positive,
            images_per_prompt=num_images, edit_grid=edit_grid, cfg=cfg, cfg_img=cfg_img,
            prepend_bos=v.prepend_bos,
        )
        self.check_sequence_length(rows, token_grid)

        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        image_tokens = None
        if source is not None:
            image_tokens = self.encode_edit_image(source, int(rows.image_rows.sum()), generator, seed)
        given_tokens = None if given_mask is None else self.reference_tokens(reference)
        static = loop == "fast" and (not exact or graph_steps is not None)
        static_tokens = token_grid[0] * token_grid[1] if static else None
        hidden, cache, mask = self.prefill(rows, image_tokens, static_tokens)
        request = DecodeRequest(rows, token_grid, num_images, len(prompts), cfg, cfg_img, cfg_schedule, settings,
                                use_norm, generator, callback, given_tokens, given_mask, parallel_window,
                                head_steps_floor)
        with cpu_threads(1 if runs_best_on_one_thread(self.model, self.device) else None):  # small models, CPU
            if loop == "reference":
                tokens = decode_tokens_reference(self.model, self.version, hidden, cache, mask, request)
            else:
                tokens = decode_tokens(self.model, self.version, hidden, cache, mask, request, exact=exact,
                                       compile=compile, graph=graph_steps)
        latents = unpatchify(tokens, token_grid, self.model.config.latent_patch_size)
        images = None
        if decode:
            pixels_out = self.image_tokenizer.decode(latents.to(self.dtype))
            images = ((pixels_out.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        return GenerationResult(tokens, latents, images, token_grid, given_mask, request.forward_passes,
                                request.head_evaluations)

    def image_input(self, image: ImageInput, what: str) -> torch.Tensor | LatentImage:
        """An image argument as pixels (1, 3, H, W) in [-1, 1], or the LatentImage checked against
        the image tokenizer's channels."""
        if not isinstance(image, LatentImage):
            return image_to_pixels(image)
        channels = self.image_tokenizer.config.z_channels
        if image.channels != channels:
            raise NextStepError(f"{what} LatentImage has {image.channels} channels but this model's image tokenizer "
                                f"makes {channels}: use a latent of this model")
        return image

    def input_size(self, image: torch.Tensor | LatentImage | None) -> tuple[int, int] | None:
        """(width, height) in pixels of a checked image input."""
        if image is None:
            return None
        if isinstance(image, LatentImage):
            return image.pixel_size(self.image_tokenizer.config.downsample)
        return image.shape[-1], image.shape[-2]

    def reference_tokens(self, reference: torch.Tensor | LatentImage) -> torch.Tensor:
        """The given tokens (num_tokens, token_dim): a LatentImage's patchified latent, exactly;
        pixels' normalised posterior MEAN (no random draw), patchified."""
        if isinstance(reference, LatentImage):
            latent = reference.latent.to(self.device, self.dtype)
        else:
            latent = self.image_tokenizer.encode(reference.to(self.device, self.dtype))
        return patchify(latent, self.model.config.latent_patch_size)[0]

    def check_request(self, prompts: list[str], image: ImageInput | None, cfg: float, cfg_img: float,
                      cfg_schedule: str, num_images: int) -> torch.Tensor | LatentImage | None:
        if not prompts:
            raise NextStepError("no prompt given")
        check_number("cfg", cfg, minimum=1, hint=" (1 turns text guidance off)")
        check_number("cfg_img", cfg_img, minimum=1, hint=" (1 turns image guidance off)")
        if cfg_schedule not in CFG_SCHEDULES:
            raise NextStepError(f"cfg schedule {cfg_schedule!r} is not one of {', '.join(CFG_SCHEDULES)}")
        check_count("number of images", num_images)
        markers = [p.count(IMAGE_MARKER) for p in prompts]
        if image is None:
            if any(markers):
                raise NextStepError("the prompt has an `<image>` marker but no input image was given")
            return None
        if not all(markers):
            raise NextStepError("an input image was given but the edit prompt has no `<image>` marker")
        if any(m > 1 for m in markers):
            raise NextStepError(f"the edit prompt has {max(markers)} `<image>` markers; use exactly one")
        return self.image_input(image, "the edit image")

    def check_sequence_length(self, rows: PromptRows, token_grid: tuple[int, int]) -> None:
        num_tokens = token_grid[0] * token_grid[1]
        size = f"{token_grid[1] * self.pixels_per_token}x{token_grid[0] * self.pixels_per_token}"
        table = self.model.max_image_tokens
        if table is not None and num_tokens > table:
            raise NextStepError(
                f"image size {size} needs {num_tokens} image tokens; this model's position table covers {table}")
        total = rows.input_ids.shape[1] + num_tokens
        limit = self.model.config.max_position_embeddings
        if total > limit:
            raise NextStepError(
                f"image size {size} needs {num_tokens} image tokens plus {rows.input_ids.shape[1]} prompt tokens "
                f"= {total}; "
                f"the model's positions allow {limit}: use a smaller image or a shorter prompt"
            )

    def encode_edit_image(self, image: torch.Tensor | LatentImage, image_rows: int, generator: torch.Generator,
                          seed: int) -> torch.Tensor:
        """Input image -> (image_rows, tokens, 64), one posterior sample per image-carrying row;
        a LatentImage's own patchified latent on every such row (no posterior sample)."""
        vae = self.image_tokenizer.config
        width, height = self.input_size(image)
        grid = (image_rows, vae.z_channels, height // vae.downsample, width // vae.downsample)
        # 1.0 draws the posterior noise from the seeded stream even for a deterministic tokenizer;
        # 1.1 encodes before seeding, so its draw must not touch the token stream.
        source = generator if self.version.posterior_draw_on_seeded_stream else torch.Generator().manual_seed(seed)
        if isinstance(image, LatentImage):
            if source is generator:  # the pixel path's draw, discarded: the token noise stays the same stream
                torch.randn(grid, generator=generator)
            latents = image.latent.to(self.device, self.dtype).expand(image_rows, -1, -1, -1)
            return patchify(latents, self.model.config.latent_patch_size)
        noise = torch.randn(grid, generator=source).to(self.device, self.dtype)
        latents = self.image_tokenizer.encode(image.to(self.device, self.dtype).expand(image_rows, -1, -1, -1),
                                              noise=noise)
        return patchify(latents, self.model.config.latent_patch_size)

    def prefill(self, rows: PromptRows, image_tokens: torch.Tensor | None,
                static_tokens: int | None = None) -> tuple[torch.Tensor, DynamicCache | StaticCache, torch.Tensor]:
        """Run the prompt rows; returns the last hidden state (rows, hidden), the cache and mask.

        static_tokens: allocate a static KV cache for the prompt plus that many image tokens
        (fixed shapes for compiled/graph-captured steps; attention then also runs over the
        not-yet-filled, masked slots, which changes float rounding by ~1e-7)."""
        input_ids = rows.input_ids.to(self.device)
        mask = rows.attention_mask.to(self.device)
        embeds = self.model.backbone.embed_tokens(input_ids)
        if image_tokens is not None:
            placeholders = input_ids == self.tokenizer.convert_tokens_to_ids(PLACEHOLDER)
            projected = self.model.image_in_projector(image_tokens.to(self.dtype)).reshape(-1, embeds.shape[-1])
            if int(placeholders.sum()) != projected.shape[0]:
                raise NextStepError("the edit prompt's placeholders do not match the input image's tokens")
            embeds = embeds.masked_scatter(placeholders[..., None], projected)
        # Positions 0..L-1 on every row, padding included, as the reference does.
        positions = torch.arange(input_ids.shape[1], device=self.device).expand(input_ids.shape[0], -1)
        config = self.model.backbone.config
        cache = (DynamicCache(config=config) if static_tokens is None
                 else StaticCache(config=config, max_cache_len=input_ids.shape[1] + static_tokens))
        out = self.model.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  cache=cache, use_cache=True)
        return out.last_hidden_state[:, -1], cache, mask


def check_vae_channels(config: NextStepConfig, image_tokenizer: ImageTokenizer, vae_folder: str | Path) -> None:
    vae = image_tokenizer.config
    if vae.z_channels != config.latent_channels:
        raise NextStepError(
            f"image tokenizer {vae_folder} makes {vae.z_channels}-channel latents but the model expects "
            f"latent_channels {config.latent_channels}: pick the tokenizer that belongs to this model"
        )
    if vae.psz and vae.psz > 1 and vae.psz != config.latent_patch_size:
        raise NextStepError(
            f"image tokenizer {vae_folder} normalises {vae.psz}x{vae.psz} patches but the model's tokens are "
            f"{config.latent_patch_size}x{config.latent_patch_size} patches (latent_patch_size): "
            "they do not belong together"
        )


def check_tokenizer_matches(model: NextStepModel, image_tokenizer: ImageTokenizer) -> None:
    check_vae_channels(model.config, image_tokenizer, "(given)")
