"""Given tokens through the nodes, in the real server: NextStep Continue Image, NextStep Regenerate
Region, and NextStep Edit Image with a mask or a LATENT reference.

Kept tokens are compared exactly: a LATENT wire holds the raw latent z, the node turns it into
the engine's normalised latent (z - shift) * scale, the engine hands given tokens back bit for
bit, and the node turns them back with latent / scale + shift. So the output's kept positions
equal from_raw(reference) pushed through to_raw with the same float32 operations here.
"""

import functools

import pytest
import torch
from comfy_harness import EXAMPLE_IMAGE, EXAMPLE_SIZE, needs_comfyui, output_images
from test_comfy_bad_input import error_message
from test_comfy_execution import SAMPLING, collect, decode, edit, save
from test_comfy_execution import loader as any_loader

pytestmark = needs_comfyui

MASKED_SCENE = "NextStep_demo_scene_masked.png"  # 64x64, its alpha painted away over the bottom right 32x32


def loader(model="NextStep-1.1"):
    """float32 weights, as the comparisons with the engine called here assume."""
    return any_loader(model, dtype="float32")


def load_image(name=EXAMPLE_IMAGE):
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def encode(source, vae=("1", 1)):
    return {"class_type": "NextStepVAEEncode", "inputs": {"vae": list(vae), "pixels": [source, 0]}}


def save_latent(source, prefix):
    return {"class_type": "SaveLatent", "inputs": {"samples": [source, 0], "filename_prefix": f"latents/{prefix}"}}


def solid_mask(value, width, height):
    return {"class_type": "SolidMask", "inputs": {"value": value, "width": width, "height": height}}


def continue_image(keep_rows=1, prompt="a red circle", **kw):
    return {"class_type": "NextStepContinueImage",
            "inputs": {"model": ["1", 0], "prompt": prompt, "keep_rows": keep_rows, **SAMPLING, **kw}}


def regenerate_region(mask, grow=0, prompt="a red circle", **kw):
    return {"class_type": "NextStepRegenerateRegion",
            "inputs": {"model": ["1", 0], "prompt": prompt, "mask": mask, "grow": grow, **SAMPLING, **kw}}


def saved_latent(comfy, entry, node) -> torch.Tensor:
    from safetensors.torch import load_file

    info = entry["outputs"][node]["latents"][0]
    return load_file(comfy.base / "output" / info["subfolder"] / info["filename"])["latent_tensor"]


@functools.cache
def pipeline(base, model):
    """The tiny checkpoint the server loads, loaded here the same way (float32 on the CPU)."""
    from nextstep_core import NextStepPipeline

    folder = base / "models" / "nextstep"
    vae_folder = None if (folder / model / "vae").is_dir() else folder / "NextStep-1-f8ch16-Tokenizer"
    return NextStepPipeline.from_folder(folder / model, vae_folder, device="cpu", precision="float32")


def vae_factors(comfy, model):
    """(scaling_factor, shift_factor) of a model's image tokenizer, as the nodes read them."""
    config = pipeline(comfy.base, model).image_tokenizer.config
    return config.scaling_factor, config.shift_factor


def kept_raw(raw, factors):
    """What a given token's raw latent comes back as: (z - shift) * scale, then / scale + shift, in float32."""
    scale, shift = factors
    return (raw.float() - shift) * scale / scale + shift


def run(comfy, prompt):
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


# ----- kept tokens -----


def test_continue_keeps_the_top_rows_and_returns_the_reference_size(comfy):
    prompt = {"1": loader(), "2": load_image(), "3": encode("2"), "4": save_latent("3", "continue_ref"),
              "5": continue_image(keep_rows=1, latent=["3", 0], seed=21), "6": save_latent("5", "continue_out"),
              "7": continue_image(keep_rows=1, image=["2", 0], seed=21), "8": decode("7"), "9": save("8", "cont")}
    entry = run(comfy, prompt)
    reference, out = saved_latent(comfy, entry, "4"), saved_latent(comfy, entry, "6")
    width, height = EXAMPLE_SIZE
    assert out.shape == (1, 16, height // 8, width // 8)
    expected = kept_raw(reference, vae_factors(comfy, "NextStep-1.1"))
    assert torch.equal(out[:, :, :2], expected[:, :, :2])  # one token row = two latent rows
    assert not torch.equal(out[:, :, 2:], expected[:, :, 2:])  # the rest is drawn anew
    assert [comfy.image(i).size for i in output_images(entry)["9"]] == [EXAMPLE_SIZE]


def test_regenerate_region_keeps_everything_outside_the_mask(comfy):
    # Load Image's MASK from the alpha channel: the bottom right 2x2 of the 4x4 tokens
    prompt = {"1": loader(), "2": load_image(MASKED_SCENE), "3": encode("2"), "4": save_latent("3", "region_ref"),
              "5": regenerate_region(["2", 1], latent=["3", 0], seed=22), "6": save_latent("5", "region_out"),
              "7": regenerate_region(["2", 1], image=["2", 0], grow=1, seed=22, batch_size=2),
              "8": save_latent("7", "region_grown")}
    entry = run(comfy, prompt)
    reference, out = saved_latent(comfy, entry, "4"), saved_latent(comfy, entry, "6")
    assert out.shape == (1, 16, 8, 8)
    expected = kept_raw(reference, vae_factors(comfy, "NextStep-1.1"))
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[4:, 4:] = True
    assert torch.equal(out[..., ~inside], expected[..., ~inside])
    assert not torch.equal(out[..., inside], expected[..., inside])
    assert saved_latent(comfy, entry, "8").shape == (2, 16, 8, 8)


def test_masked_edit_keeps_everything_outside_the_mask(comfy):
    prompt = {"1": loader("NextStep-1-Large-Edit"), "2": load_image(MASKED_SCENE), "3": encode("2"),
              "4": save_latent("3", "masked_edit_ref"),
              "5": edit("make the square green", latent=["3", 0], mask=["2", 1], seed=23),
              "6": save_latent("5", "masked_edit_out")}
    entry = run(comfy, prompt)
    reference, out = saved_latent(comfy, entry, "4"), saved_latent(comfy, entry, "6")
    assert out.shape == (1, 16, 8, 8)
    expected = kept_raw(reference, vae_factors(comfy, "NextStep-1-Large-Edit"))
    assert torch.equal(out[..., :4, :], expected[..., :4, :])  # the top half: outside the mask
    assert torch.equal(out[..., :, :4], expected[..., :, :4])  # the left half
    assert not torch.equal(out[..., 4:, 4:], expected[..., 4:, 4:])


def test_edit_with_a_latent_reference_is_generate_with_that_latent_as_is(comfy):
    """No decode and re-encode: the node's result is the engine's generate(image=LatentImage(latent))."""
    from nextstep_core import LatentImage

    prompt = {"1": loader("NextStep-1-Large-Edit"), "2": load_image(), "3": encode("2"),
              "4": save_latent("3", "edit_ref"), "5": edit("make the circle green", latent=["3", 0], seed=24),
              "6": save_latent("5", "edit_out")}
    entry = run(comfy, prompt)
    reference, out = saved_latent(comfy, entry, "4"), saved_latent(comfy, entry, "6")
    scale, shift = vae_factors(comfy, "NextStep-1-Large-Edit")
    pipe = pipeline(comfy.base, "NextStep-1-Large-Edit")
    result = pipe.generate("<image>make the circle green", image=LatentImage((reference.float() - shift) * scale),
                           cfg=7.5, cfg_img=2.0, steps=2, noise_level=0.8, seed=24, decode=False)
    assert torch.equal(out, result.latents.float() / scale + shift)


# ----- progress, preview, interrupt -----


def test_region_progress_counts_every_token_and_a_long_continuation_can_be_interrupted(comfy):
    ws, client_id = comfy.websocket()
    try:
        prompt = {"1": loader(), "2": load_image(MASKED_SCENE), "3": regenerate_region(["2", 1], image=["2", 0],
                                                                                       seed=25, prompt="progress"),
                  "4": save_latent("3", "progress")}
        status, answer = comfy.queue(prompt, client_id)
        assert status == 200, answer
        texts, binaries = collect(ws, answer["prompt_id"])
        assert texts[-1]["type"] == "execution_success"
        progress = [m["data"] for m in texts if m["type"] == "progress" and m["data"]["node"] == "3"]
        assert progress[-1]["value"] == progress[-1]["max"] == 16  # 4 x 4 tokens, the given ones included
        assert binaries, "no preview image was sent"

        # a 128x128 zero latent, one row kept: 56 tokens of 200 flow steps each
        long_run = {"1": loader(), "2": {"class_type": "EmptySD3LatentImage",
                                         "inputs": {"width": 128, "height": 128, "batch_size": 1}},
                    "3": continue_image(keep_rows=1, latent=["2", 0], steps=200, seed=26, prompt="long"),
                    "4": save_latent("3", "long")}
        seen = []

        def on_message(data):
            if data["type"] == "progress" and not seen:
                seen.append(data["data"]["value"])
                assert comfy.request("/interrupt", {})[0] == 200

        status, answer = comfy.queue(long_run, client_id)
        assert status == 200, answer
        texts, _ = collect(ws, answer["prompt_id"], on_message=on_message)
    finally:
        ws.close()
    assert texts[-1]["type"] == "execution_interrupted", texts[-1]
    values = [m["data"]["value"] for m in texts if m["type"] == "progress"]
    assert max(values) < 64
    assert run(comfy, {"1": loader(), "2": load_image(), "3": continue_image(image=["2", 0], seed=27),
                       "4": save_latent("3", "after")})


# ----- the demo model's vocabulary warning -----


@pytest.mark.parametrize("node", ["continue", "region"])
def test_the_new_nodes_name_the_demo_models_unknown_words(comfy, node):
    from test_comfy_vocabulary import node_texts

    prompt = {"1": loader("nextstep-demo"), "2": load_image(MASKED_SCENE)}
    if node == "continue":
        prompt["3"] = continue_image(keep_rows=2, image=["2", 0], prompt="a purple cat on the left", seed=29)
    else:
        prompt["3"] = regenerate_region(["2", 1], image=["2", 0], prompt="a purple cat on the left", seed=29)
    prompt["4"] = save_latent("3", f"vocabulary_{node}")
    warnings = [(n, text) for n, text in node_texts(comfy, prompt) if "does not know" in text]
    assert warnings and warnings[0][0] == "3"
    assert warnings[0][1].startswith("the demo model does not know the word(s) purple, cat and ignores them.")


# ----- bad input -----


@pytest.mark.parametrize("case, message", [
    ("both", "connect either the image or the latent reference of NextStep Continue Image, not both"),
    ("neither", "NextStep Regenerate Region needs a reference: connect an image or a latent"),
    ("mask size", "the region mask is 64x64 but the output is 48x32 (width x height): give a mask of the output's "
                  "size (it is not resized)"),
    ("empty mask", "the region mask is all zero: nothing to redraw (paint the area to redraw in Load Image's mask "
                   "editor: the painted area is the mask)"),
    ("keep_rows", "keep_rows 2 must be a whole number from 0 to 1 (the output has 2 token rows of 16 pixels; at "
                  "least one is drawn)"),
    ("edit mask size", "the region mask is 64x64 but the output is 48x32"),
])
def test_bad_given_token_inputs_are_node_errors(comfy, case, message):
    width, height = EXAMPLE_SIZE
    prompt = {"1": loader(), "2": load_image(), "3": encode("2")}
    node = {
        "both": continue_image(image=["2", 0], latent=["3", 0]),
        "neither": regenerate_region(["4", 0]),
        "mask size": regenerate_region(["4", 0], image=["2", 0]),
        "empty mask": regenerate_region(["5", 0], latent=["3", 0]),
        "keep_rows": continue_image(keep_rows=2, image=["2", 0]),
        "edit mask size": edit(image=["2", 0], mask=["4", 0]),
    }[case]
    if case == "edit mask size":
        prompt["1"] = loader("NextStep-1-Large-Edit")
    prompt.update({"4": solid_mask(1.0, 64, 64), "5": solid_mask(0.0, width, height), "6": node,
                   "7": save_latent("6", "bad")})
    assert message in error_message(comfy, prompt)
    assert comfy.run({"1": loader(), "2": load_image(), "3": continue_image(image=["2", 0], seed=28),
                      "4": save_latent("3", "still")})["status"]["status_str"] == "success"

