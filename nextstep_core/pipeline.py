"""generate(): prompt rows -> prefill -> KV-cached token loop -> latent grid -> pixels.

    pipe = NextStepPipeline.from_folder("models/nextstep/NextStep-1.1", precision="bf16", device="cuda")
    result = pipe.generate("a red circle", width=256, height=256, seed=1)
    result.to_pil()[0].save("out.png")

Randomness comes only from a `torch.Generator` (CPU) seeded with `seed`, drawn in the
reference order: (1.0 editing) one posterior draw for all image-carrying rows, then for each
sampled token its initial noise and one draw per stochastic step (given tokens draw nothing).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase, StaticCache

from .checks import check_device, image_to_pixels
from .engine.checkpoint import NextStepConfig, VersionSettings, inspect_model_folder
from .engine.latents import LatentImage
from .engine.model import NextStepModel, load_model, patchify, unpatchify
from .engine.precision import Precision, compute_device_of, default_exact, for_device, parse_precision
from .engine.prompt import PLACEHOLDER, PromptRows, load_tokenizer
from .engine.vae import ImageTokenizer, load_image_tokenizer
from .errors import NextStepError
from .memory.offload import check_block_swap, enable_block_swap
from .request import ImageInput, ModelFacts, Request, Resolved, image_input, input_size, resolve, sampler_settings
from .sampling.compiled import compile_failures_named
from .sampling.graphs import graph_mode
from .sampling.reference_loop import decode_tokens_reference
from .sampling.result import GenerationResult
from .sampling.settings import SamplerSettings
from .sampling.token_loop import (
    DecodeRequest,
    GenerationInterrupted,
    ProgressCallback,
    cpu_threads,
    decode_tokens,
    runs_best_on_one_thread,
)

LOOPS = ("fast", "reference")
__all__ = ["NextStepPipeline", "GenerationResult", "GenerationInterrupted", "LatentImage", "ProgressCallback", "LOOPS",
           "Request", "image_to_pixels"]


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
                    precision: str | torch.dtype | Precision = "float32", device: str | torch.device = "cpu",
                    compute_device: str | torch.device | None = None, block_swap: int = 0,
                    load_lm_head: bool = False, operations=None) -> NextStepPipeline:
        """Load a model folder as published (and its image tokenizer folder) onto `device`.

        precision: bf16, fp16, fp32, fp8_e4m3fn (float32, bfloat16, float16 too; a torch dtype, or a
        Precision such as parse_precision("fp8", fp8_compute=torch.float32)); see precision.py.
        device: where the weights are loaded (staged; "meta": shapes and dtypes, no data); compute_device:
        where the model will run (default: device), e.g. the GPU ComfyUI moves it to. The precision
        suits the compute device: bf16 and fp8 compute in float32 only on a CPU without native bfloat16
        (precision.for_device). block_swap keeps that many decoder layers on the CPU and streams them to
        the compute device when used (offload.py). load_lm_head: also load the text head, which
        generation never uses (training and the demo objective need it). operations: a factory of
        layer classes (`operations.Linear`, as ComfyUI's comfy.ops) the plain Linear layers are built from.
        """
        device = torch.device("meta") if str(device) == "meta" else check_device(device)  # meta: shapes only
        compute = device if compute_device is None else compute_device_of(compute_device)
        precision = for_device(parse_precision(precision), compute)
        files = inspect_model_folder(model_folder, vae_folder=vae_folder, version=version)
        check_block_swap(block_swap, files.config.num_hidden_layers)
        tokenizer = load_tokenizer(files.tokenizer_folder)
        image_tokenizer = load_image_tokenizer(files.vae_folder, nextstep_1_1_defaults=files.version.name == "1.1",
                                               dtype=precision.dtype, device=device)
        check_vae_channels(files.config, image_tokenizer, files.vae_folder)
        model = load_model(files, device=device, precision=precision, lm_head=load_lm_head, operations=operations)
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

    @property
    def facts(self) -> ModelFacts:
        """What resolving a request needs to know about this model (request.py)."""
        vae = self.image_tokenizer.config
        return ModelFacts(self.version, self.model.config, vae.downsample, vae.z_channels,
                          self.model.max_image_tokens)

    def sampler_settings(self, sampler: str = "auto", steps: int | None = None, shift: float | None = None,
                         noise_level: float = 0.8, velocity_norm: bool = False,
                         editing: bool = False) -> SamplerSettings:
        """The version's defaults where an option is left as auto/None (request.sampler_settings)."""
        return sampler_settings(self.version, sampler, steps, shift, noise_level, velocity_norm, editing)

    def resolve(self, prompts: str | list[str], request: Request) -> Resolved:
        """The request with this model's defaults filled and every check passed (request.resolve)."""
        return resolve(self.facts, request, prompts, self.tokenizer)

    @torch.no_grad()
    def generate(self, prompts: str | list[str], request: Request | None = None, *,
                 callback: ProgressCallback | None = None, decode: bool = True, loop: str = "fast",
                 exact: bool | None = None, compile: bool = False, graph: str | bool = "auto",
                 **keywords) -> GenerationResult:
        """Text-to-image, or editing when the request has an `image` (the prompt holds one `<image>` marker).

        request: what to generate (request.py: Request with its Sampling, Guidance, Given and
        Output groups; None leaves everything to the model's defaults). keywords: the flat form
        for scripts (width=, height=, seed=, cfg=, steps=, image=, keep_rows=, ...:
        request.KEYWORDS), set on top of `request`. The request is resolved and checked before
        any model work (NextStepError, one line).

        The edit image is a PIL image, a pixel tensor (H, W, 3) in [0, 1], or a LatentImage, used
        as it is (no encode: lossless edit chains; for 1.0 the generator still advances by the
        posterior draw the pixel path makes, so the tokens' noise is the pixel path's). Given
        tokens (nextstep-reference.md section 11; docs/given-tokens.md) run no head and draw no
        noise; the result's `given` marks them. Tokens from pixels are the tokenizer's
        normalised posterior mean (no random draw); from a LatentImage exactly its patchified latent.

        Speed options (sampling/token_loop.py): loop "fast" (default) or "reference" (the
        contract line by line, for comparison); exact (None: on for the CPU, off for CUDA; default_exact)
        gives the reference loop's bits on the CPU; exact=False lets the fast loop read each head
        modulation weight once per token instead of once per step and use a static KV cache
        (float rounding differs); compile=True torch.compiles the head step (off by default);
        graph "auto" (default) captures each token's whole step once as a CUDA graph on a CUDA
        device and replays it for every later token ("on": also on other devices, as a recorded
        replay that checks the step is graph-safe; "off": never; see sampling/graphs.py).
        """
        request = (request or Request()).updated(**keywords) if keywords else (request or Request())
        if loop not in LOOPS:
            raise NextStepError(f"loop {loop!r} is not one of {', '.join(LOOPS)}")
        graph_steps = None if loop == "reference" else graph_mode(
            graph, self.device, block_swap=getattr(self.model, "block_swap", None) is not None, compile=compile)
        r = self.resolve(prompts, request)
        token_grid, rows = r.token_grid, r.rows

        generator = torch.Generator(device="cpu").manual_seed(int(r.seed))
        image_tokens = None
        if r.image is not None:
            image_tokens = self.encode_edit_image(r.image, int(rows.image_rows.sum()), generator, r.seed)
        given_tokens = None if r.given_mask is None else self.reference_tokens(r.reference)
        exact = default_exact(self.device) if exact is None else exact
        static = loop == "fast" and (not exact or graph_steps is not None)
        static_tokens = token_grid[0] * token_grid[1] if static else None
        hidden, cache, mask = self.prefill(rows, image_tokens, static_tokens)
        request = DecodeRequest(rows=rows, token_grid=token_grid, num_images=r.num_images, num_prompts=len(r.prompts),
                                cfg=r.cfg, cfg_img=r.cfg_img, cfg_schedule=r.schedule, settings=r.settings,
                                use_norm=r.use_norm, generator=generator, callback=callback,
                                given_tokens=given_tokens, given_mask=r.given_mask, parallel_window=r.parallel_window,
                                head_steps_floor=r.head_steps_floor)
        with cpu_threads(1 if runs_best_on_one_thread(self.model, self.device) else None), \
                compile_failures_named(compile):  # small models run on one CPU thread; compile warms in here
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
        return GenerationResult(tokens, latents, images, token_grid, r.given_mask, request.forward_passes,
                                request.head_evaluations)

    def image_input(self, image: ImageInput, what: str) -> torch.Tensor | LatentImage:
        """An image argument as pixels (1, 3, H, W) in [-1, 1], or the LatentImage checked against
        the image tokenizer's channels."""
        return image_input(image, what, self.image_tokenizer.config.z_channels)

    def input_size(self, image: torch.Tensor | LatentImage | None) -> tuple[int, int] | None:
        """(width, height) in pixels of a checked image input."""
        return input_size(image, self.image_tokenizer.config.downsample)

    def reference_tokens(self, reference: torch.Tensor | LatentImage) -> torch.Tensor:
        """The given tokens (num_tokens, token_dim): a LatentImage's patchified latent, exactly;
        pixels' normalised posterior MEAN (no random draw), patchified."""
        if isinstance(reference, LatentImage):
            latent = reference.latent.to(self.device, self.dtype)
        else:
            latent = self.image_tokenizer.encode(reference.to(self.device, self.dtype))
        return patchify(latent, self.model.config.latent_patch_size)[0]

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
