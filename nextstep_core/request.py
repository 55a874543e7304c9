"""A generation request in four typed groups, resolved against a model folder without loading it.

    request = Request(sampling=Sampling(steps=20), guidance=Guidance(cfg=5.0),
                      output=Output(size=(512, 256), seed=7))
    result = pipe.generate("a red circle on the left", request)

Every field left as None takes the model's default (its version's, or its config.json's
sampling defaults: engine/checkpoint.py). `resolve(model, request, prompts)` fills those
defaults and runs every check of the request with its one-line message; it needs only the
inspected model folder (`inspect_model_folder`: config.json, the weights' headers, the image
tokenizer's config.json), so the CLI refuses bad settings before reading a weight, and a loaded
pipeline resolves the same way (`NextStepPipeline.generate`). With the text tokenizer it also
builds the prompt rows and checks the image fits the model's positions.

Scripts may keep the flat keywords (`pipe.generate(prompt, width=512, height=256, seed=7)`):
`Request.from_keywords` files each under its group (KEYWORDS).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image

from .checks import check_count, check_image_markers, check_image_size, check_number, image_to_pixels
from .engine.checkpoint import ModelFiles, NextStepConfig, VersionSettings
from .engine.latents import LatentImage
from .errors import NextStepError
from .sampling.given import plan_given
from .sampling.parallel_schedule import check_schedule_options
from .sampling.settings import CFG_SCHEDULES, RECOMMENDED_STEPS, SamplerSettings

ImageInput = Image.Image | torch.Tensor | LatentImage
RegionInput = torch.Tensor | np.ndarray | Image.Image
SamplerName = Literal["auto", "euler_maruyama", "sde", "cps", "ode", "heun", "midpoint", "dpm2m", "dpm2m_sde"]
CfgSchedule = Literal["constant", "linear"]


@dataclass(frozen=True)
class Sampling:
    """How each image token is sampled (sampling/settings.py).

    sampler: one of SAMPLERS; None or "auto": the model's own (euler_maruyama for 1.0, sde for 1.1).
    steps: flow steps per token; None: the model's (50 / 28; a few-step sampler's RECOMMENDED_STEPS).
    shift: time shift; None: the model's (1.0; 3.2 when editing). noise_level: sde, cps, dpm2m_sde.
    velocity_norm: clamp the guided velocity's norm (1.1 option). use_norm: layer-normalise each
    token; None: the model's (on for 1.0, off for 1.1). parallel_window, head_steps_floor: several
    tokens per pass (sampling/token_loop.py's DecodeRequest); 0 and None leave them off."""

    sampler: SamplerName | None = None
    steps: int | None = None
    shift: float | None = None
    noise_level: float = 0.8
    velocity_norm: bool = False
    use_norm: bool | None = None
    parallel_window: int = 0
    head_steps_floor: int | None = None


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance. cfg: text scale (None: the model's, 7.5; 1 turns it off);
    cfg_img: image scale when editing (None: 2.0; 1 when not editing); schedule: constant or
    linear over the image's tokens (sampling/guidance.py)."""

    cfg: float | None = None
    cfg_img: float | None = None
    schedule: CfgSchedule = "constant"


@dataclass(frozen=True, eq=False)
class Given:
    """Given tokens (docs/given-tokens.md): keep_rows (continuation: the reference's first rows)
    or region (a mask of the output's size, > 0 = redraw, widened by grow tokens); the kept
    tokens come from reference (PIL, pixel tensor (H, W, 3) in [0, 1], or LatentImage), or, when
    editing, from the edit image."""

    reference: ImageInput | None = None
    keep_rows: int = 0
    region: RegionInput | None = None
    grow: int = 0


@dataclass(frozen=True)
class Output:
    """size: (width, height) in pixels, multiples of the model's token size (16); None: the edit
    image's, else the reference's. num_images: per prompt, each with its own noise. seed: the
    only source of randomness (a CPU torch.Generator)."""

    size: tuple[int | None, int | None] | None = None
    num_images: int = 1
    seed: int = 0


@dataclass(frozen=True, eq=False)
class Request:
    """What to generate besides the prompt: negative / positive text, the edit image (the prompt
    then holds one `<image>` marker), and the four groups."""

    negative: str | None = None
    positive: str | None = None
    image: ImageInput | None = None
    sampling: Sampling = field(default_factory=Sampling)
    guidance: Guidance = field(default_factory=Guidance)
    given: Given = field(default_factory=Given)
    output: Output = field(default_factory=Output)

    @classmethod
    def from_keywords(cls, **keywords) -> Request:
        """The flat form: generate()'s keywords of before (width=, cfg_schedule=, keep_rows=, ...)."""
        return cls().updated(**keywords)

    def updated(self, **keywords) -> Request:
        """A copy with the flat keywords (KEYWORDS) set in their groups."""
        unknown = sorted(set(keywords) - set(KEYWORDS))
        if unknown:
            raise TypeError(f"generate() got unexpected keyword argument(s) {', '.join(unknown)}")
        groups: dict[str, dict] = {"request": {}, "sampling": {}, "guidance": {}, "given": {}, "output": {}}
        for name, value in keywords.items():
            group, field_name = KEYWORDS[name]
            groups[group][field_name] = value
        output = groups.pop("output")
        if "width" in output or "height" in output:
            width, height = self.output.size or (None, None)
            output["size"] = (output.pop("width", width), output.pop("height", height))
        top = groups.pop("request")
        return dataclasses.replace(self, **top, output=dataclasses.replace(self.output, **output),
                                   **{g: dataclasses.replace(getattr(self, g), **v) for g, v in groups.items()})


# flat keyword -> (group, field)
KEYWORDS = {
    **{name: ("request", name) for name in ("negative", "positive", "image")},
    **{name: ("sampling", name) for name in ("sampler", "steps", "shift", "noise_level", "velocity_norm", "use_norm",
                                              "parallel_window", "head_steps_floor")},
    "cfg": ("guidance", "cfg"), "cfg_img": ("guidance", "cfg_img"), "cfg_schedule": ("guidance", "schedule"),
    **{name: ("given", name) for name in ("reference", "keep_rows", "region", "grow")},
    **{name: ("output", name) for name in ("width", "height", "num_images", "seed")},
}


@dataclass(frozen=True)
class ModelFacts:
    """What resolving a request needs to know about a model: its version settings, config, the
    image tokenizer's pixels per latent position and latent channels, and the tokens its position
    table covers (None: no table)."""

    version: VersionSettings
    config: NextStepConfig
    downsample: int
    latent_channels: int
    max_image_tokens: int | None

    @classmethod
    def from_files(cls, files: ModelFiles) -> ModelFacts:
        """From an inspected folder: config.json and the image tokenizer's config.json only."""
        from .engine.model import POSITION_TABLE_TOKENS
        from .engine.vae_files import read_config

        if files.vae_folder is None:
            raise NextStepError(f"model folder {files.folder} has no image tokenizer to size the image with")
        vae = read_config(files.vae_folder, files.version.name == "1.1")
        table = POSITION_TABLE_TOKENS if files.config.use_gen_pos_embed else None
        return cls(files.version, files.config, vae.downsample, vae.z_channels, table)

    @property
    def pixels_per_token(self) -> int:
        """Pixels along each side of one image token: the tokenizer's downsample x the patch size."""
        return self.downsample * self.config.latent_patch_size


@dataclass(frozen=True, eq=False)
class Resolved:
    """A request with every default filled and every check passed, ready for the token loop.

    image / reference: pixels (1, 3, H, W) in [-1, 1] or a LatentImage. given_mask: (tokens,)
    bool or None. rows: the prompt rows (PromptRows) when resolved with the text tokenizer."""

    prompts: list[str]
    negative: str | None
    positive: str | None
    image: torch.Tensor | LatentImage | None
    reference: torch.Tensor | LatentImage | None
    settings: SamplerSettings
    cfg: float
    cfg_img: float
    schedule: str
    use_norm: bool
    token_grid: tuple[int, int]
    edit_grid: tuple[int, int] | None
    given_mask: torch.Tensor | None
    num_images: int
    seed: int
    parallel_window: int
    head_steps_floor: int | None
    rows: object = None


def sampler_settings(version: VersionSettings, sampler: str | None = "auto", steps: int | None = None,
                     shift: float | None = None, noise_level: float = 0.8, velocity_norm: bool = False,
                     editing: bool = False) -> SamplerSettings:
    """The version's defaults where an option is left as auto/None (a few-step sampler's steps
    default to its RECOMMENDED_STEPS), checked."""
    name = version.sampler if sampler in (None, "auto") else sampler
    if steps is None:
        steps = RECOMMENDED_STEPS.get(name, version.edit_steps if editing else version.steps)
    settings = SamplerSettings(name=name, steps=steps,
                               shift=(version.edit_shift if editing else version.shift) if shift is None else shift,
                               noise_level=noise_level, velocity_norm=velocity_norm)
    settings.validate()
    return settings


def image_input(image: ImageInput, what: str, latent_channels: int) -> torch.Tensor | LatentImage:
    """An image argument as pixels (1, 3, H, W) in [-1, 1], or the LatentImage checked against
    the image tokenizer's channels."""
    if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] != 1:
        raise NextStepError(f"input image tensor has shape {tuple(image.shape)}; expected (H, W, 3) or (1, H, W, 3)")
    if not isinstance(image, LatentImage):
        return image_to_pixels(image.float() if isinstance(image, torch.Tensor) else image)
    if image.channels != latent_channels:
        raise NextStepError(f"{what} LatentImage has {image.channels} channels but this model's image tokenizer "
                            f"makes {latent_channels}: use a latent of this model")
    return image


def input_size(image: torch.Tensor | LatentImage | None, downsample: int) -> tuple[int, int] | None:
    """(width, height) in pixels of a checked image input."""
    if image is None:
        return None
    if isinstance(image, LatentImage):
        return image.pixel_size(downsample)
    return image.shape[-1], image.shape[-2]


def resolve(model: ModelFiles | ModelFacts, request: Request, prompts: str | list[str], tokenizer=None) -> Resolved:
    """Fill the model's defaults into `request` and check it all (NextStepError, one line).

    model: an inspected folder (inspect_model_folder) or a loaded pipeline's facts. tokenizer:
    the text tokenizer; given, the prompt rows are built and the sequence length checked too."""
    facts = ModelFacts.from_files(model) if isinstance(model, ModelFiles) else model
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    sampling, guidance, given, output = request.sampling, request.guidance, request.given, request.output
    editing = request.image is not None
    v = facts.version
    cfg = v.cfg if guidance.cfg is None else guidance.cfg
    cfg_img = (v.edit_cfg_img if editing else 1.0) if guidance.cfg_img is None else guidance.cfg_img
    use_norm = v.use_norm if sampling.use_norm is None else sampling.use_norm
    settings = sampler_settings(v, sampling.sampler, sampling.steps, sampling.shift, sampling.noise_level,
                                sampling.velocity_norm, editing)
    check_schedule_options(sampling.parallel_window, sampling.head_steps_floor, settings.steps, settings.name)
    if not prompts:
        raise NextStepError("no prompt given")
    check_number("cfg", cfg, minimum=1, hint=" (1 turns text guidance off)")
    check_number("cfg_img", cfg_img, minimum=1, hint=" (1 turns image guidance off)")
    if guidance.schedule not in CFG_SCHEDULES:
        raise NextStepError(f"cfg schedule {guidance.schedule!r} is not one of {', '.join(CFG_SCHEDULES)}")
    check_count("number of images", output.num_images)
    check_image_markers(prompts, editing, request.negative, request.positive)
    image = None if request.image is None else image_input(request.image, "the edit image", facts.latent_channels)
    reference = given.reference
    if reference is None and editing and (given.keep_rows or given.region is not None):
        reference = request.image  # a masked edit keeps the edit image's own tokens
    reference = None if reference is None else image_input(reference, "the reference", facts.latent_channels)

    width, height = (None, None) if output.size is None else output.size
    for given_size in (input_size(image, facts.downsample), input_size(reference, facts.downsample)):
        if width is None and height is None and given_size is not None:
            width, height = given_size
    if width is None or height is None:
        raise NextStepError("give both width and height (or an input image to take them from)")
    ppt = facts.pixels_per_token
    token_grid = check_image_size(width, height, ppt)
    edit_size = input_size(image, facts.downsample)
    edit_grid = None if edit_size is None else check_image_size(*edit_size, ppt)
    given_mask = plan_given(keep_rows=given.keep_rows, region=given.region, grow=given.grow,
                            has_reference=reference is not None,
                            reference_size=input_size(reference, facts.downsample), token_grid=token_grid,
                            pixels_per_token=ppt)
    resolved = Resolved(prompts, request.negative, request.positive, image, reference, settings, cfg, cfg_img,
                        guidance.schedule, use_norm, token_grid, edit_grid, given_mask, output.num_images,
                        output.seed, sampling.parallel_window, sampling.head_steps_floor)
    if tokenizer is None:
        return resolved
    from .engine.prompt import build_prompt_rows

    rows = build_prompt_rows(tokenizer, prompts, token_grid=token_grid, negative=request.negative,
                             positive=request.positive, images_per_prompt=output.num_images, edit_grid=edit_grid,
                             cfg=cfg, cfg_img=cfg_img, prepend_bos=v.prepend_bos)
    check_sequence_length(facts, rows.input_ids.shape[1], token_grid)
    return dataclasses.replace(resolved, rows=rows)


def resolve_folder(folder, request: Request, prompts: str | list[str], *, vae_folder=None,
                   version: str = "auto") -> Resolved:
    """Resolve `request` against a model folder before loading it: the folder inspected (config,
    the weights' headers), the text tokenizer read (for the prompt's length), no weight loaded."""
    from .engine.checkpoint import inspect_model_folder
    from .engine.prompt import load_tokenizer

    files = inspect_model_folder(folder, vae_folder=vae_folder, version=version)
    return resolve(files, request, prompts, load_tokenizer(files.tokenizer_folder))


def check_sequence_length(facts: ModelFacts, prompt_tokens: int, token_grid: tuple[int, int]) -> None:
    """The image's tokens must fit the position table (1.0) and, with the prompt, the positions."""
    num_tokens = token_grid[0] * token_grid[1]
    size = f"{token_grid[1] * facts.pixels_per_token}x{token_grid[0] * facts.pixels_per_token}"
    table = facts.max_image_tokens
    if table is not None and num_tokens > table:
        raise NextStepError(
            f"image size {size} needs {num_tokens} image tokens; this model's position table covers {table}")
    total = prompt_tokens + num_tokens
    limit = facts.config.max_position_embeddings
    if total > limit:
        raise NextStepError(
            f"image size {size} needs {num_tokens} image tokens plus {prompt_tokens} prompt tokens = {total}; "
            f"the model's positions allow {limit}: use a smaller image or a shorter prompt"
        )
