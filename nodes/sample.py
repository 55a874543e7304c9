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

from ..nextstep_core.checks import IMAGE_MARKER, check_image_markers, check_image_size
from ..nextstep_core.demo.vocabulary import demo_model_warning
from ..nextstep_core.errors import NextStepError
from ..nextstep_core.request import Given, Guidance, Output, Request, Sampling
from .latent import to_latent_dict
from .model import LoadedNextStep, NextStepModelType, load_for_generation, release_swap
from .preview import TokenProgress
from .reference import reference_input, region_mask
from .sampler import USE_NORM, sampler_input, sampler_widgets, shared_sampler

MAX_SIZE = 4096
# The size widgets' step, before any model is loaded: the token size of every released checkpoint.
# At run time the engine checks the size against the loaded model's own token size.
SIZE_STEP = 16


def size_inputs(default: int, minimum: int, zero_hint: str = "") -> list:
    return [
        io.Int.Input(side, default=default, min=minimum, max=MAX_SIZE, step=SIZE_STEP,
                     tooltip=f"Image {side} in pixels, a multiple of 16 "
                             f"(each image token covers 16x16 pixels).{zero_hint}")
        for side in ("width", "height")
    ]


def sampling_inputs(*, editing: bool) -> list:
    """The widgets every sampling node shares, in the order they appear (the sampler's widgets last,
    then the optional input for a shared NextStep Sampler)."""
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
        *sampler_widgets(),
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
             velocity_norm, reference=None, keep_rows=0, region=None, grow=0, sampler_settings=None) -> dict:
    """Run the engine with progress and interrupt wired to ComfyUI; returns a LATENT dict.

    The widgets become the engine's request (steps and shift 0: the model's default), resolved
    and checked by the engine before the model is moved or run. image: the edit reference;
    reference, keep_rows, region, grow: the given tokens (continuation, region redraw, masked edit).
    sampler_settings: a connected NextStep Sampler's values, in place of the node's own."""
    pipe = model.pipe
    own = dict(steps=steps, sampler=sampler, shift=shift, noise_level=noise_level, cfg_schedule=cfg_schedule,
               use_norm=use_norm, velocity_norm=velocity_norm)
    s = shared_sampler(own, sampler_settings)
    request = Request(
        negative=negative or None, positive=positive or None, image=image,
        sampling=Sampling(sampler=s["sampler"], steps=s["steps"] or None, shift=s["shift"] or None,
                          noise_level=s["noise_level"], velocity_norm=s["velocity_norm"],
                          use_norm=USE_NORM[s["use_norm"]], parallel_window=s.get("parallel_window", 0),
                          head_steps_floor=s.get("head_steps_floor") or None),
        guidance=Guidance(cfg=cfg, cfg_img=cfg_img, schedule=s["cfg_schedule"]),
        given=Given(reference=reference, keep_rows=keep_rows, region=region, grow=grow),
        output=Output(size=(width, height), num_images=batch_size, seed=seed),
    )
    resolved = pipe.resolve(prompt, request)
    grid = resolved.token_grid
    warn_about_unknown_words(pipe, prompt)
    progress = TokenProgress(model.vae, grid, pipe.model.config.latent_patch_size)
    with_vae = image is not None or reference is not None or progress.previews  # encodes / fits preview colours
    size = pipe.pixels_per_token
    load_for_generation(model, width=grid[1] * size, height=grid[0] * size, images=batch_size, cfg=resolved.cfg,
                        cfg_img=resolved.cfg_img, editing=image is not None,
                        with_vae=with_vae)  # the request's working memory reserved
    result = pipe.generate(prompt, request, callback=progress, decode=False)
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
                *size_inputs(512, SIZE_STEP),
                *sampling_inputs(editing=False),
                sampler_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The generated latent (16 channels, Flux layout).")],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None, prompt=None, negative=None, positive=None):
        # The values ComfyUI gives at queue time (not linked ones) go through the engine's checks; the
        # whole request is resolved against the loaded model when the node runs. Named here, width and
        # height skip ComfyUI's own range check: it is redone with the engine's.
        try:
            for side, value in (("width", width), ("height", height)):
                if value is not None and value > MAX_SIZE:
                    raise NextStepError(f"{side} {value} is larger than {MAX_SIZE}")
            if width is not None and height is not None:
                check_image_size(width, height, SIZE_STEP)
            if prompt is not None:
                check_image_markers([prompt], False, negative, positive)
        except NextStepError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model, prompt, negative, width, height, batch_size, seed, cfg, steps, sampler, shift,
                noise_level, cfg_schedule, use_norm, velocity_norm, positive="",
                sampler_settings=None) -> io.NodeOutput:
        return io.NodeOutput(generate(
            model, prompt, width=width, height=height, negative=negative, positive=positive,
            batch_size=batch_size, seed=seed, cfg=cfg, steps=steps, sampler=sampler, shift=shift,
            noise_level=noise_level, cfg_schedule=cfg_schedule, use_norm=use_norm, velocity_norm=velocity_norm,
            sampler_settings=sampler_settings))


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
                sampler_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The edited latent (16 channels, Flux layout).")],
        )

    @classmethod
    def validate_inputs(cls, instruction=None, negative=None, positive=None):
        if instruction is not None:
            try:
                check_image_markers([edit_prompt(instruction)], True, negative, positive)
            except NextStepError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, model, instruction, negative, width, height, batch_size, seed, cfg, cfg_img, steps, sampler,
                shift, noise_level, cfg_schedule, use_norm, velocity_norm, positive="", image=None,
                latent=None, mask=None, sampler_settings=None) -> io.NodeOutput:
        prompt = edit_prompt(instruction)
        reference = reference_input(model, image, latent, "NextStep Edit Image")
        width = width or reference.width
        height = height or reference.height
        region = None if mask is None else region_mask(mask, width, height)
        return io.NodeOutput(generate(
            model, prompt, width=width, height=height, image=reference.source, region=region,
            negative=negative, positive=positive,
            batch_size=batch_size, seed=seed, cfg=cfg, cfg_img=cfg_img, steps=steps, sampler=sampler, shift=shift,
            noise_level=noise_level, cfg_schedule=cfg_schedule, use_norm=use_norm, velocity_norm=velocity_norm,
            sampler_settings=sampler_settings))


NODES = [NextStepTextToImage, NextStepEditImage]
