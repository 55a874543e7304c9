"""NextStep Sampler: its settings, connected to a sampling node, replace that node's own sampler
widgets, and give the same image as the same values typed into the node's widgets."""

import numpy as np
from comfy_harness import needs_comfyui, output_images
from test_comfy_execution import decode, loader, save, text_to_image

pytestmark = needs_comfyui

SHARED = {"steps": 3, "sampler": "dpm2m", "shift": 1.5, "noise_level": 0.5, "cfg_schedule": "linear",
          "use_norm": "on", "velocity_norm": True}


def image_of(comfy, prompt):
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return comfy.image(output_images(entry)["4"][0])


def test_a_shared_sampler_replaces_the_nodes_own_sampler_widgets(comfy):
    typed = image_of(comfy, {"1": loader(), "2": text_to_image(seed=21, prompt="shared", **SHARED),
                             "3": decode("2"), "4": save("3", "typed")})
    # the node's own widgets say something else: the connected sampler's values win
    node = text_to_image(seed=21, prompt="shared", steps=2, sampler="sde", shift=0.0, cfg_schedule="constant",
                         use_norm="off", velocity_norm=False, sampler_settings=["5", 0])
    shared = image_of(comfy, {"1": loader(), "5": {"class_type": "NextStepSampler", "inputs": SHARED}, "2": node,
                              "3": decode("2"), "4": save("3", "shared")})
    own = image_of(comfy, {"1": loader(), "2": text_to_image(seed=21, prompt="shared", steps=2, sampler="sde"),
                           "3": decode("2"), "4": save("3", "own")})
    assert shared.tobytes() == typed.tobytes()
    assert own.tobytes() != typed.tobytes()


def test_the_shared_sampler_carries_several_tokens_per_pass(comfy):
    """parallel_window reaches the engine: a window of 1 draws rows side by side (another image); a
    window as wide as the image (4 tokens) is sequential decoding through the next-set loop, whose
    tokens equal the default loop's within float32 rounding (tests/test_parallel_decoding.py), far
    below the half level that could move a decoded pixel by more than one level."""
    def with_window(window, name):
        settings = {**SHARED, "parallel_window": window, "head_steps_floor": 0}
        return image_of(comfy, {"1": loader(), "5": {"class_type": "NextStepSampler", "inputs": settings},
                                "2": text_to_image(seed=5, prompt="rows", width=64, height=64,
                                                   sampler_settings=["5", 0]),
                                "3": decode("2"), "4": save("3", name)})

    sequential, full, side_by_side = with_window(0, "w0"), with_window(4, "w4"), with_window(1, "w1")
    assert np.abs(np.asarray(full, np.int16) - np.asarray(sequential, np.int16)).max() <= 1
    assert np.abs(np.asarray(side_by_side, np.int16) - np.asarray(sequential, np.int16)).max() > 1
