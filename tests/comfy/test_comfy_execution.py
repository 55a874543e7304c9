"""API prompts run in the real server: images of the right size, progress, preview, interrupt, errors."""

import json
import struct
from io import BytesIO

import pytest
from comfy_harness import EXAMPLE_IMAGE, EXAMPLE_SIZE, needs_comfyui, output_images, status_messages

pytestmark = needs_comfyui

SAMPLING = {"negative": "", "positive": "", "batch_size": 1, "seed": 1, "cfg": 7.5, "steps": 2, "sampler": "auto",
            "shift": 0.0, "noise_level": 0.8, "cfg_schedule": "constant", "use_norm": "auto", "velocity_norm": False}


def loader(model="NextStep-1.1", **kw):
    return {"class_type": "NextStepModelLoader",
            "inputs": {"model_name": model, "tokenizer": "auto", "dtype": "auto", "version": "auto", **kw}}


def text_to_image(width=32, height=32, prompt="a red circle", **kw):
    return {"class_type": "NextStepTextToImage",
            "inputs": {"model": ["1", 0], "prompt": prompt, "width": width, "height": height, **SAMPLING, **kw}}


def edit(instruction="make the circle green", width=0, height=0, model=("1", 0), **kw):
    return {"class_type": "NextStepEditImage",
            "inputs": {"model": list(model), "instruction": instruction, "width": width, "height": height,
                       **SAMPLING, "cfg_img": 2.0, **kw}}


def decode(source, vae=("1", 1)):
    return {"class_type": "NextStepVAEDecode", "inputs": {"vae": list(vae), "samples": [source, 0]}}


def save(source, prefix="nextstep"):
    return {"class_type": "SaveImage", "inputs": {"images": [source, 0], "filename_prefix": prefix}}


def t2i_prompt(**kw):
    return {"1": loader(), "2": text_to_image(**kw), "3": decode("2"), "4": save("3")}


def saved_sizes(comfy, entry, node):
    return [comfy.image(info).size for info in output_images(entry)[node]]


def node_error_details(answer) -> str:
    return json.dumps(answer.get("node_errors", {}))


# ----- running -----


def test_text_to_image_writes_images_of_the_requested_size(comfy):
    entry = comfy.run(t2i_prompt(width=48, height=32, batch_size=2))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert saved_sizes(comfy, entry, "4") == [(48, 32), (48, 32)]


def test_bfloat16_weights_run_end_to_end(comfy):
    prompt = {"1": loader(dtype="bfloat16"),
              "2": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}},
              "3": {"class_type": "NextStepVAEEncode", "inputs": {"vae": ["1", 1], "pixels": ["2", 0]}},
              "4": edit(latent=["3", 0], model=("1", 0)), "5": decode("4"), "6": save("5", "bf16")}
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert saved_sizes(comfy, entry, "6") == [EXAMPLE_SIZE]


def test_same_seed_same_image_other_seed_other_image(comfy):
    # seed 5, 6, then 5 again: each run changes the node's inputs, so each one samples anew
    images = [comfy.image(output_images(comfy.run(t2i_prompt(seed=seed, prompt="seeds")))["4"][0]).tobytes()
              for seed in (5, 6, 5)]
    assert images[0] == images[2]
    assert images[0] != images[1]


def test_edit_image_from_an_image_and_from_a_latent(comfy):
    prompt = {
        "1": loader("NextStep-1-Large-Edit"),
        "2": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}},
        "3": edit(image=["2", 0]),  # size 0 x 0: the reference's
        "4": decode("3"),
        "5": save("4", "edit_image"),
        "6": edit("<image> now make it blue", latent=["3", 0], width=32, height=32),
        "7": decode("6"),
        "8": save("7", "edit_latent"),
    }
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert saved_sizes(comfy, entry, "5") == [EXAMPLE_SIZE]
    assert saved_sizes(comfy, entry, "8") == [(32, 32)]


def test_vae_encode_decode_round_trip_keeps_the_size(comfy):
    prompt = {
        "1": loader(),
        "2": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}},
        "3": {"class_type": "NextStepVAEEncode", "inputs": {"vae": ["1", 1], "pixels": ["2", 0]}},
        "4": decode("3"),
        "5": save("4", "roundtrip"),
        # a native latent node accepts the 16-channel LATENT
        "6": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                                          "scale_by": 2.0}},
        "7": decode("6"),
        "8": save("7", "upscaled"),
    }
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert saved_sizes(comfy, entry, "5") == [EXAMPLE_SIZE]
    assert saved_sizes(comfy, entry, "8") == [(EXAMPLE_SIZE[0] * 2, EXAMPLE_SIZE[1] * 2)]


# ----- progress, preview, interrupt -----


def collect(ws, prompt_id, until=("execution_success", "execution_error", "execution_interrupted"), on_message=None):
    """Websocket messages of one prompt until it ends: (json messages, binary messages)."""
    texts, binaries = [], []
    while True:
        message = ws.recv()
        if isinstance(message, bytes):
            binaries.append(message)
            continue
        data = json.loads(message)
        if data.get("data", {}).get("prompt_id") not in (None, prompt_id):
            continue
        texts.append(data)
        if on_message is not None:
            on_message(data)
        if data["type"] in until:
            return texts, binaries


def assert_token_progress(values: list[int], maxima: set[int], tokens: int) -> None:
    """Progress as any ComfyUI sends it: newer releases throttle the messages (so not one per
    token), but they rise, end at the token count and show at least one step on the way."""
    assert values == sorted(values) and len(set(values)) == len(values), values
    assert values[-1] == tokens and maxima == {tokens}, (values, maxima)
    assert any(0 < v < tokens for v in values), f"no intermediate update: {values}"


def test_progress_per_token_and_a_preview(comfy):
    from PIL import Image

    ws, client_id = comfy.websocket()
    try:
        status, answer = comfy.queue(t2i_prompt(width=48, height=32, seed=11), client_id)
        assert status == 200, answer
        texts, binaries = collect(ws, answer["prompt_id"])
    finally:
        ws.close()
    assert texts[-1]["type"] == "execution_success"
    progress = [m["data"] for m in texts if m["type"] == "progress" and m["data"]["node"] == "2"]
    assert_token_progress([p["value"] for p in progress], {p["max"] for p in progress}, 6)  # a 3 x 2 token grid
    previews = [b for b in binaries if struct.unpack(">I", b[:4])[0] == 1]  # PREVIEW_IMAGE
    assert previews, "no preview image was sent"
    picture = Image.open(BytesIO(previews[0][8:]))
    assert picture.format == "JPEG" and picture.width > picture.height  # the image's 3:2 shape


def test_interrupt_stops_within_a_token_and_the_next_prompt_runs(comfy):
    ws, client_id = comfy.websocket()
    # 64 tokens of 200 flow steps each: a token takes far longer than a message takes to travel
    long_run = t2i_prompt(width=128, height=128, steps=200, seed=3, prompt="a long run")
    progress_seen = []
    seen_when_interrupted = []

    def on_message(data):
        if data["type"] == "progress":
            progress_seen.append(data["data"]["value"])
            if not seen_when_interrupted:
                status, _ = comfy.request("/interrupt", {})  # returns once the server has set the flag
                assert status == 200
                seen_when_interrupted.append(len(progress_seen))

    try:
        status, answer = comfy.queue(long_run, client_id)
        assert status == 200, answer
        texts, _ = collect(ws, answer["prompt_id"], on_message=on_message)
    finally:
        ws.close()
    assert texts[-1]["type"] == "execution_interrupted", texts[-1]
    # After the flag is set no token reports progress: the one being sampled then is dropped.
    # At most one report generated before it can still have been on its way.
    assert len(progress_seen) - seen_when_interrupted[0] <= 1, progress_seen
    assert max(progress_seen) < 64
    entry = comfy.run(t2i_prompt(seed=4))
    assert entry["status"]["status_str"] == "success"


# ----- errors -----


def test_size_not_a_multiple_of_16_is_a_node_error_with_the_engines_message(comfy):
    status, answer = comfy.queue(t2i_prompt(width=1000, height=32))
    assert status == 400
    assert "width 1000 is not a multiple of 16" in node_error_details(answer)
    assert "2" in answer["node_errors"]


def test_empty_edit_instruction_is_a_node_error(comfy):
    prompt = {"1": loader("NextStep-1-Large-Edit"),
              "2": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}},
              "3": edit("  ", image=["2", 0]), "4": decode("3"), "5": save("4")}
    status, answer = comfy.queue(prompt)
    assert status == 400
    assert "the edit instruction is empty" in node_error_details(answer)


@pytest.mark.parametrize("model, message", [
    ("NoSuchModel", "NoSuchModel does not exist"),
    ("NextStep-broken", "NextStep-broken has no config.json"),
])
def test_missing_or_broken_model_folder_is_a_node_error(comfy, model, message):
    prompt = t2i_prompt()
    prompt["1"] = loader(model)
    status, answer = comfy.queue(prompt)
    assert status == 400
    assert message in node_error_details(answer)
    assert "1" in answer["node_errors"]


def test_engine_errors_at_run_time_are_execution_errors_with_the_message(comfy):
    prompt = {"1": loader(),
              "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
              "3": decode("2"), "4": save("3")}
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error"
    error = status_messages(entry)["execution_error"]
    assert error["node_id"] == "3"
    assert error["exception_type"].endswith("NextStepError")
    assert "16-channel image latents" in error["exception_message"]


def test_server_keeps_serving_after_errors_and_after_freeing_models(comfy):
    comfy.queue(t2i_prompt(width=1000))
    status, _ = comfy.request("/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    entry = comfy.run(t2i_prompt(seed=9, prompt="after the errors"))
    assert entry["status"]["status_str"] == "success"


def test_fp8_weights_with_block_swap_give_the_same_image_as_without_swap(comfy):
    """The loader's memory options end to end: fp8 storage runs, and swapping a decoder layer in
    from its storage placement on use changes nothing in the image."""
    def image(block_swap):
        prompt = {"1": loader(dtype="fp8_e4m3fn", block_swap=block_swap),
                  "2": text_to_image(prompt="fp8 swap", seed=3), "3": decode("2"), "4": save("3", "fp8")}
        entry = comfy.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        return comfy.image(output_images(entry)["4"][0])

    without, swapped = image(0), image(1)
    assert without.size == (32, 32)
    assert without.tobytes() == swapped.tobytes()
