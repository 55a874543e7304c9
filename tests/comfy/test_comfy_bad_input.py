"""Bad settings reaching the nodes through an API prompt (where the web UI's widget limits do not
apply): each stops with the engine's one-line message on the node, before or while it runs, and
the server keeps serving."""

import json
import shutil
import sys

import pytest
from comfy_harness import REPO, input_named, needs_comfyui, status_messages
from test_comfy_execution import t2i_prompt

pytestmark = needs_comfyui


def error_message(comfy, prompt) -> str:
    """The node's error text: a 400 at queue time, or the execution error of the run."""
    status, answer = comfy.queue(prompt)
    if status == 400:
        return json.dumps(answer.get("node_errors", {})) + json.dumps(answer.get("error", {}))
    entry = comfy.wait(answer["prompt_id"])
    assert entry["status"]["status_str"] == "error", entry["status"]
    error = status_messages(entry)["execution_error"]
    assert error["exception_type"].endswith("NextStepError"), error
    return error["exception_message"]


@pytest.mark.parametrize("setting, value, message", [
    # NaN passes ComfyUI's own min/max check of the widget values (every comparison with NaN is
    # false), so the engine's check names it; infinities and values out of the widget's range
    # are refused by ComfyUI's check, with the widget's name in the node error (its wording is
    # ComfyUI's, so only the input's name is asserted).
    ("cfg", float("nan"), "cfg nan must be a finite number"),
    ("noise_level", float("nan"), "noise level nan must be a finite number"),
    ("shift", float("nan"), "shift nan must be a finite number"),
    ("cfg", float("inf"), input_named("cfg")),
    ("shift", float("inf"), input_named("shift")),
    ("noise_level", 3.0, input_named("noise_level")),
])
def test_non_finite_and_out_of_range_numbers_are_node_errors(comfy, setting, value, message):
    assert message in error_message(comfy, t2i_prompt(**{setting: value}))
    assert comfy.run(t2i_prompt(seed=3))["status"]["status_str"] == "success"  # still serving


@pytest.fixture(scope="module")
def broken_models(comfy):
    """Broken copies of the server's tiny NextStep-1.1 folder, in its models/nextstep/ while it runs."""
    sys.path.insert(0, str(REPO / "tests"))
    from broken_models import write_broken_models

    nextstep = comfy.base / "models" / "nextstep"
    made = write_broken_models(nextstep / "NextStep-1.1", nextstep)
    yield made
    for folder, _ in made.values():
        shutil.rmtree(folder)


@pytest.mark.parametrize("name", ["empty", "truncated", "garbage", "missing-shard", "mismatched-config",
                                  "no-tokenizer", "no-image-tokenizer", "pickle"])
def test_broken_model_folders_are_node_errors(comfy, broken_models, name):
    folder, message = broken_models[name]
    prompt = t2i_prompt(seed=40)
    prompt["1"]["inputs"]["model_name"] = folder.name
    assert message in error_message(comfy, prompt)
    assert not (folder.parent / f"{folder.name}-code-ran").exists()  # the pickle's code never ran
    assert comfy.run(t2i_prompt(seed=41))["status"]["status_str"] == "success"  # still serving


def test_an_image_marker_without_an_image_is_a_node_error(comfy):
    message = "the prompt has an `<image>` marker but no input image was given"
    assert message in error_message(comfy, t2i_prompt(prompt="<image> a red circle", seed=42))


def test_two_image_markers_in_an_edit_instruction_are_a_node_error(comfy):
    from comfy_harness import EXAMPLE_IMAGE
    from test_comfy_execution import decode, edit, loader, save

    load_image = {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}}
    prompt = {"1": loader("NextStep-1-Large-Edit"), "2": load_image,
              "3": edit("<image> <image> make it green", image=["2", 0]), "4": decode("3"), "5": save("4")}
    assert "the edit prompt has 2 `<image>` markers; use exactly one" in error_message(comfy, prompt)


def test_marker_errors_are_refused_at_queue_time_by_the_engines_check(comfy):
    """validate_inputs runs the engine's marker check on the values ComfyUI gives it: a 400, no run."""
    status, answer = comfy.queue(t2i_prompt(negative="no <image>", seed=43))
    assert status == 400, answer
    assert "the negative prompt has an `<image>` marker" in json.dumps(answer.get("node_errors", {}))
