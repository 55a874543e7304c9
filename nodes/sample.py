"""NextStep Text to Image and NextStep Edit Image: the engine's generate() behind ComfyUI widgets.

Widgets left at 0 / auto take the checkpoint version's defaults (the authors' own: NextStep-1.0
euler_maruyama, 50 steps, token normalisation on, editing shift 3.2; NextStep-1.1 sde, 28 steps).
Randomness comes only from the engine's torch.Generator seeded with `seed`; the global RNG is
never touched.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io
from comfy_execution.utils import get_executing_context

from ..nextstep_core import CFG_SCHEDULES, SAMPLERS
from ..nextstep_core.checks import check_image_size
from ..nextstep_core.demo.vocabulary import demo_model_warning
from ..nextstep_core.engine.prompt import IMAGE_MARKER
from ..nextstep_core.errors import NextStepError
from .latent import to_latent_dict
from .model import LoadedNextStep, NextStepModelType, load_for_generation, release_swap
from .preview import TokenProgress
from .reference import PIXELS_PER_TOKEN, reference_input, region_mask

MAX_SIZE = 4096
USE_NORM = {"auto": None, "on": True, "off": False}


def size_inputs(default: int, minimum: int, zero_hint: str = "") -> list:
    return [
        io.Int.Input(side, default=default, min=minimum, max=MAX_SIZE, step=PIXELS_PER_TOKEN,
                     tooltip=f"Image {side} in pixels, a multiple of 16 "
                             f"(each image token covers 16x16 pixels).{zero_hint}")
        for side in ("width", "height")
    ]


def sampling_inputs(*, editing: bool) -> list:
    """The widgets both sampling nodes share, in the order they appear."""
    return [
        io.Int.Input("batch_size", default=1, min=1, max=64,
                     tooltip="How many images to generate (each with its own noise)."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="The random seed. The same seed and settings give the same image."),
        io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                       tooltip="Text guidance scale: how strongly the image follows the prompt. 1 turns it off."),
        *([io.Float.Input("cfg_img", default=2.0, min=1.0, max=30.0, step=0.1, round=0.01,
                          tooltip="Image guidance scale: how closely the result keeps to the reference image. "
                                  "1 turns it off.")] if editing else []),
        io.Int.Input("steps", default=0, min=0, max=200,
                     tooltip="Flow steps per image token (each token is sampled by its own small flow). "
                             "0: the model's default (50 for NextStep-1.0, 28 for NextStep-1.1)."),
        io.Combo.Input("sampler", options=["auto", *SAMPLERS], default="auto",
                       tooltip="Token sampler. auto: the model's own (euler_maruyama for 1.0, sde for 1.1); "
                               "ode is deterministic."),
        io.Float.Input("shift", default=0.0, min=0.0, max=20.0, step=0.05, round=0.01,
                       tooltip="Time shift of each token's flow. 0: the model's default "
                               "(1.0; 3.2 when editing)."),
        io.Float.Input("noise_level", default=0.8, min=0.0, max=1.0, step=0.01,
                       tooltip="Noise injected per step by the sde and cps samplers."),
        io.Combo.Input("cfg_schedule", options=list(CFG_SCHEDULES), default="constant",
                       tooltip="constant: the same guidance for every token. linear: guidance changes "
                               "linearly over the image's tokens (the model's own direction)."),
        io.Combo.Input("use_norm", options=list(USE_NORM), default="auto",
                       tooltip="Layer-normalise every sampled token, which keeps high cfg stable. "
                               "auto: on for NextStep-1.0, off for NextStep-1.1."),
        io.Boolean.Input("velocity_norm", default=False,
                         tooltip="Clamp the guided velocity's norm to the conditional one's (a NextStep-1.1 option)."),
    ]


def text_inputs(prompt_name: str, prompt_tooltip: str) -> list:
    return [
        io.String.Input(prompt_name, multiline=True, default="", tooltip=prompt_tooltip),
        io.String.Input("negative", multiline=True, default="",
                        tooltip="Negative prompt: what the image should not look like (empty is fine)."),
        io.String.Input("positive", default="", optional=True,
                        tooltip="Text appended to the prompt after a space, e.g. a style or quality suffix."),
    ]


def warn_about_unknown_words(pipe, prompt: str) -> None:
    """The demo model ignores words outside its small vocabulary: say which, in the console and
    on the node (its progress text). Real checkpoints never warn."""
    warning = demo_model_warning(pipe.folder, prompt)
    if warning is None:
        return
    logging.warning("NextStep: %s", warning)
    context = get_executing_context()
    if context is not None:
        from server import PromptServer  # ComfyUI's server module, imported only when a node runs

        PromptServer.instance.send_progress_text(warning, context.node_id)


def generate(model: LoadedNextStep, prompt: str, *, width: int, height: int, image=None, negative="", positive="",
             batch_size, seed, cfg, cfg_img=None, steps, sampler, shift, noise_level, cfg_schedule, use_norm,
             velocity_norm, reference=None, keep_rows=0, region=None, grow=0) -> dict:
    """Run the engine with progress and interrupt wired to ComfyUI; returns a LATENT dict.

    image: the edit reference; reference, keep_rows, region, grow: the given tokens (continuation,
    region redraw, masked edit), passed to the engine as they are."""
    pipe = model.pipe
    grid = check_image_size(width, height, pipe.pixels_per_token)
    warn_about_unknown_words(pipe, prompt)
    progress = TokenProgress(model.vae, grid, pipe.model.config.latent_patch_size)
    with_vae = image is not None or reference is not None or progress.previews  # encodes / fits preview colours
    load_for_generation(model, width=width, height=height, images=batch_size, cfg=cfg, cfg_img=cfg_img,
                        editing=image is not None, with_vae=with_vae)  # the request's working memory reserved
    result = pipe.generate(
        prompt, width=width, height=height, negative=negative or None, positive=positive or None,
        num_images=batch_size, cfg=cfg, cfg_img=cfg_img, cfg_schedule=cfg_schedule, sampler=sampler,
        steps=steps or None, shift=shift or None, noise_level=noise_level, use_norm=USE_NORM[use_norm],
        velocity_norm=velocity_norm, image=image, seed=seed, callback=progress, decode=False,
        reference=reference, keep_rows=keep_rows, region=region, grow=grow,
    )
    release_swap(model)
    return to_latent_dict(result.latents, model.vae.config)


class NextStepTextToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NextStepTextToImage",
            display_name="NextStep Text to Image",
            category="NextStep",
            description="Generates images token by token from a prompt with a NextStep model. Decode the LATENT "
                        "with NextStep VAE Decode.",
            inputs=[
                NextStepModelType.Input("model", tooltip="The model from Load NextStep Model."),
                *text_inputs("prompt", "What to draw."),
                *size_inputs(512, PIXELS_PER_TOKEN),
                *sampling_inputs(editing=False),
            ],
            outputs=[io.Latent.Output(tooltip="The generated latent (16 channels, Flux layout).")],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None):
        # Named here, width and height skip ComfyUI's own range check: it is redone with the engine's.
        try:
            for side, value in (("width", width), ("height", height)):
                if value is not None and value > MAX_SIZE:
                    raise NextStepError(f"{side} {value} is larger than {MAX_SIZE}")
            if width is not None and height is not None:
                check_image_size(width, height, PIXELS_PER_TOKEN)
        except NextStepError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model, prompt, negative, width, height, batch_size, seed, cfg, steps, sampler, shift,
                noise_level, cfg_schedule, use_norm, velocity_norm, positive="") -> io.NodeOutput:
        return io.NodeOutput(generate(
            model, prompt, width=width, height=height, negative=negative, positive=positive,
            batch_size=batch_size, seed=seed, cfg=cfg, steps=steps, sampler=sampler, shift=shift,
            noise_level=noise_level, cfg_schedule=cfg_schedule, use_norm=use_norm, velocity_norm=velocity_norm))


def edit_prompt(instruction: str) -> str:
    """The engine wants exactly one `<image>` marker; put it in front when the user left it out."""
    instruction = instruction.strip()
    if not instruction or instruction == IMAGE_MARKER:
        raise NextStepError("the edit instruction is empty: say what to change, e.g. 'make the sky purple'")
    return instruction if IMAGE_MARKER in instruction else IMAGE_MARKER + instruction


class NextStepEditImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NextStepEditImage",
            display_name="NextStep Edit Image",
            category="NextStep",
            description="Edits a reference image by an instruction with an editing model (NextStep-1-Large-Edit). "
                        "The reference can be an IMAGE or a LATENT from another NextStep node, so edit passes chain "
                        "in latent space. With a mask, only the masked region is edited.",
            inputs=[
                NextStepModelType.Input("model", tooltip="An editing model from Load NextStep Model "
                                                          "(NextStep-1-Large-Edit)."),
                *text_inputs("instruction", "What to change. The <image> marker (where the reference image goes "
                                            "in the prompt) is put in front when it is left out."),
                *size_inputs(0, 0, " 0: the reference's size."),
                *sampling_inputs(editing=True),
                io.Image.Input("image", optional=True, tooltip="The image to edit (or connect a latent instead)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="The latent to edit, e.g. the output of another NextStep node "
                                        "(or connect an image instead). Used as it is: no decode and "
                                        "encode round trip."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: edit only here (> 0: redraw; e.g. Load Image's MASK, painted "
                                      "in its mask editor). Outside it the reference is kept token for token. "
                                      "The mask must have the output's size."),
            ],
            outputs=[io.Latent.Output(tooltip="The edited latent (16 channels, Flux layout).")],
        )

    @classmethod
    def validate_inputs(cls, instruction=None):
        if instruction is not None:
            try:
                edit_prompt(instruction)
            except NextStepError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, model, instruction, negative, width, height, batch_size, seed, cfg, cfg_img, steps, sampler,
                shift, noise_level, cfg_schedule, use_norm, velocity_norm, positive="", image=None,
                latent=None, mask=None) -> io.NodeOutput:
        prompt = edit_prompt(instruction)
        reference = reference_input(model, image, latent, "NextStep Edit Image")
        width = width or reference.width
        height = height or reference.height
        region = None if mask is None else region_mask(mask, width, height, "NextStep Edit Image")
        return io.NodeOutput(generate(
            model, prompt, width=width, height=height, image=reference.source, region=region,
            negative=negative, positive=positive,
            batch_size=batch_size, seed=seed, cfg=cfg, cfg_img=cfg_img, steps=steps, sampler=sampler, shift=shift,
            noise_level=noise_level, cfg_schedule=cfg_schedule, use_norm=use_norm, velocity_norm=velocity_norm))


NODES = [NextStepTextToImage, NextStepEditImage]
