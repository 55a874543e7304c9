"""NextStep Continue Image and NextStep Regenerate Region: generation with some tokens given.

Both take a reference (an IMAGE or a LATENT) whose image tokens are kept where asked, and
sample the rest with the prompt, seeing the kept tokens as the model sees its own: Continue
keeps the top `keep_rows` token rows (16 pixels each) and draws the rows below; Regenerate
Region keeps everything outside a mask and redraws every token the mask touches. Kept tokens
come back unchanged. The output is a LATENT of the reference's size.
"""

from __future__ import annotations

from comfy_api.latest import io

from .model import NextStepModelType
from .reference import reference_input, region_mask
from .sample import generate, sampling_inputs, text_inputs
from .sampler import sampler_input


def reference_inputs(what: str) -> list:
    return [
        io.Image.Input("image", optional=True, tooltip=f"The picture to {what} (or connect a latent instead). "
                                                        "Its sides must be multiples of 16."),
        io.Latent.Input("latent", optional=True,
                        tooltip=f"The latent to {what}, e.g. another NextStep node's output (or connect an image "
                                "instead). Used as it is: no decode and encode round trip."),
    ]


# The optional widgets' defaults: an API prompt may leave any optional input out.
OPTIONAL_DEFAULTS = {i.id: getattr(i, "default", None)  # a socket without a widget has no default: None
                     for i in [*text_inputs("prompt", ""), *sampling_inputs(editing=False), sampler_input()]
                     if i.optional}


def settings(kw: dict) -> dict:
    """The sampling widgets' values, as generate() takes them (an optional one left out: its default)."""
    names = ("negative", "positive", "batch_size", "seed", "cfg", "steps", "sampler", "shift", "noise_level",
             "cfg_schedule", "use_norm", "velocity_norm", "sampler_settings")
    values = {**OPTIONAL_DEFAULTS, **kw}
    return {name: values[name] for name in names}


class NextStepContinueImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NextStepContinueImage",
            display_name="NextStep Continue Image",
            category="NextStep",
            description="Keeps the top rows of a picture and lets a NextStep model draw the rest below them, "
                        "following the prompt (the way it continues its own rows). The kept rows come back "
                        "unchanged; the LATENT has the reference's size.",
            inputs=[
                NextStepModelType.Input("model", tooltip="The model from Load NextStep Model."),
                *text_inputs("prompt", "What the whole picture shows; the rows below the kept ones follow it."),
                io.Int.Input("keep_rows", default=1, min=0, max=256,
                             tooltip="How many image-token rows to keep from the top, each 16 pixels high "
                                     "(2 keeps the top 32 pixels). Must be fewer than the picture's rows."),
                *sampling_inputs(editing=False),
                *reference_inputs("continue"),
                sampler_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The continued latent, the reference's size (16 channels, "
                                              "Flux layout).")],
        )

    @classmethod
    def execute(cls, model, prompt, keep_rows, image=None, latent=None, **kw) -> io.NodeOutput:
        reference = reference_input(model, image, latent, "NextStep Continue Image")
        return io.NodeOutput(generate(
            model, prompt, width=reference.width, height=reference.height, reference=reference.source,
            keep_rows=keep_rows, **settings(kw)))


class NextStepRegenerateRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NextStepRegenerateRegion",
            display_name="NextStep Regenerate Region",
            category="NextStep",
            description="Redraws the masked region of a picture with a NextStep model, following the prompt; "
                        "everything outside the mask is kept token for token. Paint the mask in Load Image's "
                        "mask editor and connect its MASK output.",
            inputs=[
                NextStepModelType.Input("model", tooltip="The model from Load NextStep Model."),
                *text_inputs("prompt", "What the whole picture shows; the region is redrawn to fit it."),
                io.Mask.Input("mask", tooltip="Where to redraw (> 0), at the picture's pixel size, e.g. Load "
                                              "Image's MASK (the area painted in its mask editor). Every 16x16 "
                                              "token it touches is redrawn. It is not resized."),
                io.Int.Input("grow", default=0, min=0, max=64,
                             tooltip="Widen the region by this many tokens (16 pixels each) on every side."),
                *sampling_inputs(editing=False),
                *reference_inputs("redraw"),
                sampler_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The latent with the region redrawn, the reference's size "
                                              "(16 channels, Flux layout).")],
        )

    @classmethod
    def execute(cls, model, prompt, mask, grow, image=None, latent=None, **kw) -> io.NodeOutput:
        reference = reference_input(model, image, latent, "NextStep Regenerate Region")
        region = region_mask(mask, reference.width, reference.height)
        return io.NodeOutput(generate(
            model, prompt, width=reference.width, height=reference.height, reference=reference.source,
            region=region, grow=grow, **settings(kw)))


NODES = [NextStepContinueImage, NextStepRegenerateRegion]
