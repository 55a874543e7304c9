"""The pack loads into a real ComfyUI and its nodes are described in /object_info."""

import re

from comfy_harness import PACK_NAME, needs_comfyui

pytestmark = needs_comfyui

NODES = {
    "NextStepModelLoader": ["model_name", "tokenizer", "dtype", "version", "block_swap"],
    "NextStepTextToImage": ["model", "prompt", "negative", "width", "height", "batch_size", "seed", "cfg", "steps",
                            "sampler", "shift", "noise_level", "cfg_schedule", "use_norm", "velocity_norm", "positive",
                            "sampler_settings"],
    "NextStepEditImage": ["model", "instruction", "negative", "width", "height", "batch_size", "seed", "cfg", "cfg_img",
                          "steps", "sampler", "shift", "noise_level", "cfg_schedule", "use_norm", "velocity_norm",
                          "positive", "image", "latent", "mask", "sampler_settings"],
    "NextStepContinueImage": ["model", "prompt", "negative", "keep_rows", "batch_size", "seed", "cfg", "steps",
                              "sampler", "shift", "noise_level", "cfg_schedule", "use_norm", "velocity_norm",
                              "positive", "image", "latent", "sampler_settings"],
    "NextStepRegenerateRegion": ["model", "prompt", "negative", "mask", "grow", "batch_size", "seed", "cfg", "steps",
                                 "sampler", "shift", "noise_level", "cfg_schedule", "use_norm", "velocity_norm",
                                 "positive", "image", "latent", "sampler_settings"],
    "NextStepSampler": ["steps", "sampler", "shift", "noise_level", "cfg_schedule", "use_norm", "velocity_norm",
                        "parallel_window", "head_steps_floor"],
    "NextStepVAEEncode": ["vae", "pixels"],
    "NextStepVAEDecode": ["vae", "samples"],
}


def test_pack_imports_without_errors(comfy):
    log = comfy.log()
    assert not re.search(rf"IMPORT FAILED\)?:.*{PACK_NAME}", log), comfy.log_tail()
    assert re.search(rf"seconds: .*{PACK_NAME}", log), "the pack is missing from ComfyUI's custom node import list"


def test_object_info_lists_every_node_with_inputs(comfy):
    info = comfy.get("/object_info")
    for node, inputs in NODES.items():
        assert node in info, f"{node} missing from /object_info"
        spec = info[node]
        assert spec["category"] == "NextStep"
        order = spec["input_order"]["required"] + spec["input_order"].get("optional", [])
        assert order == inputs
        declared = {**spec["input"]["required"], **spec["input"].get("optional", {})}
        for name in inputs:
            assert declared[name][1].get("tooltip"), f"{node}.{name} has no tooltip"
    loader = info["NextStepModelLoader"]
    assert loader["output"] == ["NEXTSTEP_MODEL", "NEXTSTEP_VAE"]
    options = loader["input"]["required"]["model_name"][1]["options"]
    assert {"NextStep-1.1", "NextStep-1-Large-Edit", "nextstep-demo"} <= set(options)
    assert "NextStep-1-f8ch16-Tokenizer" not in options  # the 1.0 image tokenizer is offered as a tokenizer
    tokenizers = loader["input"]["required"]["tokenizer"][1]["options"]
    assert tokenizers[0] == "auto" and "NextStep-1-f8ch16-Tokenizer" in tokenizers
    seed = info["NextStepTextToImage"]["input"]["required"]["seed"]
    assert seed[1]["control_after_generate"] is True
    width = info["NextStepTextToImage"]["input"]["required"]["width"][1]
    assert (width["step"], width["min"]) == (16, 16)
    assert info["NextStepTextToImage"]["output"] == ["LATENT"]
    assert info["NextStepEditImage"]["output"] == ["LATENT"]
    assert info["NextStepContinueImage"]["output"] == ["LATENT"]
    assert info["NextStepRegenerateRegion"]["output"] == ["LATENT"]
    assert info["NextStepContinueImage"]["display_name"] == "NextStep Continue Image"
    assert info["NextStepRegenerateRegion"]["display_name"] == "NextStep Regenerate Region"
    assert info["NextStepRegenerateRegion"]["input"]["required"]["mask"][0] == "MASK"
    assert info["NextStepEditImage"]["input"]["optional"]["mask"][0] == "MASK"
    assert info["NextStepVAEDecode"]["output"] == ["IMAGE"]
