"""NextStep VAE Encode (IMAGE -> LATENT) and NextStep VAE Decode (LATENT -> IMAGE)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..nextstep_core.checks import image_to_pixels
from ..nextstep_core.engine.vae import pixels_to_image
from .latent import from_latent_dict, to_latent_dict
from .model import LoadedImageTokenizer, NextStepVAEType, load_onto_device, to_output


def device_of(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = next(module.parameters())
    return weight.device, weight.dtype


@torch.no_grad()
def encode_images(vae: LoadedImageTokenizer, images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] -> engine latents (B, 16, H/8, W/8): the posterior mean, normalised."""
    load_onto_device(vae.patcher)
    device, dtype = device_of(vae.image_tokenizer)
    out = []
    for image in images[..., :3]:  # one at a time bounds the activation memory
        pixels = image_to_pixels(image[None].to(device=device, dtype=dtype))
        out.append(vae.image_tokenizer.encode(pixels).float())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae: LoadedImageTokenizer, latents: torch.Tensor) -> torch.Tensor:
    """Engine latents (B, 16, h, w) -> IMAGE (B, 8h, 8w, 3) float32 in [0, 1]."""
    load_onto_device(vae.patcher)
    device, dtype = device_of(vae.image_tokenizer)
    out = [pixels_to_image(vae.image_tokenizer.decode(latent[None].to(device=device, dtype=dtype)))
           for latent in latents]
    return to_output(torch.cat(out))


class NextStepVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NextStepVAEEncode",
            display_name="NextStep VAE Encode",
            category="NextStep",
            description="Encodes images with NextStep's image tokenizer into a 16-channel LATENT (Flux layout, raw "
                        "latent). Width and height must be multiples of 8 (16 to edit them).",
            inputs=[
                NextStepVAEType.Input("vae", tooltip="The image tokenizer from Load NextStep Model."),
                io.Image.Input("pixels", tooltip="The images to encode."),
            ],
            outputs=[io.Latent.Output(tooltip="The encoded latent (16 channels, 1/8 of the image size).")],
        )

    @classmethod
    def execute(cls, vae, pixels) -> io.NodeOutput:
        return io.NodeOutput(to_latent_dict(encode_images(vae, pixels), vae.config))


class NextStepVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NextStepVAEDecode",
            display_name="NextStep VAE Decode",
            category="NextStep",
            description="Decodes a NextStep LATENT into images with NextStep's image tokenizer.",
            inputs=[
                NextStepVAEType.Input("vae", tooltip="The image tokenizer from Load NextStep Model."),
                io.Latent.Input("samples",
                                tooltip="The latent to decode (from a NextStep node or NextStep VAE Encode)."),
            ],
            outputs=[io.Image.Output(tooltip="The decoded images.")],
        )

    @classmethod
    def execute(cls, vae, samples) -> io.NodeOutput:
        return io.NodeOutput(decode_latents(vae, from_latent_dict(samples, vae.config, "samples")))


NODES = [NextStepVAEEncode, NextStepVAEDecode]
