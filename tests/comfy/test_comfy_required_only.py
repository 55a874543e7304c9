"""Every NextStep node runs from an API prompt that gives only its required inputs.

Scripts, API clients and older saved workflows leave optional inputs out; the web UI happens to
send them all. Each node below gets exactly the inputs /object_info lists as required (widgets
at their advertised default unless named here), so every optional input falls back to the
node's own default. The nodes that need a reference get one of their two optional reference
inputs (an image or a latent), the least they run with.
"""

from comfy_harness import EXAMPLE_IMAGE, EXAMPLE_SIZE, needs_comfyui, output_images

pytestmark = needs_comfyui


def required_only(info: dict, class_type: str, **given) -> dict:
    """A prompt node with every required input of `class_type`: `given`'s value, else the widget's
    default (a combo's first choice when it names none)."""
    required = info[class_type]["input"]["required"]
    assert set(given) <= set(required), f"{class_type}: {sorted(set(given) - set(required))} are not required"
    inputs = {}
    for name, spec in required.items():
        if name in given:
            inputs[name] = given[name]
        elif len(spec) > 1 and "default" in spec[1]:
            inputs[name] = spec[1]["default"]
        elif isinstance(spec[0], list):
            inputs[name] = spec[0][0]
        else:
            raise AssertionError(f"{class_type}'s required input {name} needs a value or a link")
    return {"class_type": class_type, "inputs": inputs}


def with_optional(node: dict, **optional) -> dict:
    node["inputs"].update(optional)
    return node


def test_every_nextstep_node_runs_from_a_prompt_of_its_required_inputs(comfy):
    info = comfy.get("/object_info")
    ours = {name for name, node in info.items() if node.get("category", "").startswith("NextStep")}
    n = lambda class_type, **given: required_only(info, class_type, **given)  # noqa: E731
    prompt = {
        "1": n("NextStepModelLoader", model_name="NextStep-1.1"),
        "2": n("NextStepTextToImage", model=["1", 0], prompt="a red circle", width=32, height=32, steps=2),
        "3": n("NextStepVAEDecode", vae=["1", 1], samples=["2", 0]),
        "4": n("SaveImage", images=["3", 0], filename_prefix="required_t2i"),
        "5": with_optional(n("NextStepContinueImage", model=["1", 0], prompt="a red circle", steps=2),
                           latent=["2", 0]),
        "6": n("NextStepVAEDecode", vae=["1", 1], samples=["5", 0]),
        "7": n("SaveImage", images=["6", 0], filename_prefix="required_continue"),
        "8": n("LoadImage", image=EXAMPLE_IMAGE),
        "9": n("SolidMask", value=1.0, width=EXAMPLE_SIZE[0], height=EXAMPLE_SIZE[1]),
        "10": with_optional(n("NextStepRegenerateRegion", model=["1", 0], prompt="a red circle", mask=["9", 0],
                              steps=2), image=["8", 0]),
        "11": n("NextStepVAEDecode", vae=["1", 1], samples=["10", 0]),
        "12": n("SaveImage", images=["11", 0], filename_prefix="required_region"),
        "13": n("NextStepModelLoader", model_name="NextStep-1-Large-Edit"),
        "14": n("NextStepVAEEncode", vae=["13", 1], pixels=["8", 0]),
        "15": with_optional(n("NextStepEditImage", model=["13", 0], instruction="make the circle green", steps=2),
                            latent=["14", 0]),
        "16": n("NextStepVAEDecode", vae=["13", 1], samples=["15", 0]),
        "17": n("SaveImage", images=["16", 0], filename_prefix="required_edit"),
        "18": n("NextStepSampler", steps=2),
        "19": with_optional(n("NextStepTextToImage", model=["1", 0], prompt="a red circle", width=32, height=32),
                            sampler_settings=["18", 0]),
        "20": n("NextStepVAEDecode", vae=["1", 1], samples=["19", 0]),
        "21": n("SaveImage", images=["20", 0], filename_prefix="required_sampler"),
    }
    assert ours == {node["class_type"] for node in prompt.values()} & ours, "a NextStep node is not covered here"
    entry = comfy.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    sizes = {node: [comfy.image(i).size for i in images] for node, images in output_images(entry).items()}
    assert sizes == {"4": [(32, 32)], "7": [(32, 32)], "12": [EXAMPLE_SIZE], "17": [EXAMPLE_SIZE], "21": [(32, 32)]}
