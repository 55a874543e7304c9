"""The shipped workflows: served as templates, valid against /object_info, and (those that need only
NextStep checkpoints) converted to API prompts the way the frontend does and run in the server."""

import copy
import json

import pytest
from comfy_harness import EXAMPLE_IMAGE, EXAMPLE_SIZE, PACK_NAME, REPO, needs_comfyui, output_images
from workflow_convert import VIRTUAL_NODES, check_workflow, to_api_prompt

pytestmark = needs_comfyui

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
RUNNABLE_TYPES = {"LoadImage", "SaveImage", "PreviewImage"}  # besides the NextStep nodes


def load(path):
    return json.loads(path.read_text())


def needs_only_nextstep(workflow) -> bool:
    return all(n["type"].startswith("NextStep") or n["type"] in RUNNABLE_TYPES | VIRTUAL_NODES
               for n in workflow["nodes"])


def shrink(prompt: dict) -> dict:
    """Test-sized settings: sides over 64 pixels divided by 16 (at least 32), 2 flow steps per token."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"].startswith("NextStep") and "steps" in node["inputs"]:
            node["inputs"]["steps"] = 2
            for side in ("width", "height"):
                if node["inputs"].get(side, 0) > 64:
                    node["inputs"][side] = max(2, node["inputs"][side] // 256) * 16
    return prompt


def expected_size(prompt: dict, node_id: str) -> tuple[int, int]:
    """The (width, height) a node's images or latents have, following the graph back to its sources."""
    node = prompt[node_id]
    inputs, kind = node["inputs"], node["class_type"]
    if kind == "LoadImage":
        if inputs["image"] == EXAMPLE_IMAGE:
            return EXAMPLE_SIZE
        from PIL import Image  # one of the pack's own example inputs (workflows/input/)

        return Image.open(REPO / "workflows" / "input" / inputs["image"]).size
    if kind in ("NextStepTextToImage", "NextStepEditImage") and inputs["width"] and inputs["height"]:
        return inputs["width"], inputs["height"]
    for name in ("images", "samples", "pixels", "image", "latent"):
        if isinstance(inputs.get(name), list):
            return expected_size(prompt, inputs[name][0])
    raise AssertionError(f"cannot tell the size of node {node_id} ({kind})")


def test_there_are_workflows():
    names = {p.stem for p in WORKFLOWS}
    assert len(names) >= 5
    assert {"NextStep_demo_text_to_image", "NextStep_three_pass_edit_chain"} <= names


def test_workflows_are_served_as_templates_with_thumbnails(comfy):
    templates = comfy.get("/workflow_templates")
    assert sorted(templates[PACK_NAME]) == sorted(p.stem for p in WORKFLOWS)
    for path in WORKFLOWS:
        for suffix in (".json", ".jpg"):
            status, body = comfy.request(f"/api/workflow_templates/{PACK_NAME}/{path.stem}{suffix}")
            assert status == 200 and body, f"{path.stem}{suffix} is not served"
        assert json.loads(comfy.request(f"/api/workflow_templates/{PACK_NAME}/{path.name}")[1]) == load(path)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_object_info(comfy, path):
    object_info = comfy.get("/object_info")
    assert check_workflow(load(path), object_info) == []


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if needs_only_nextstep(load(p))], ids=lambda p: p.stem)
def test_workflow_runs_and_writes_images_of_the_expected_size(comfy, path):
    prompt = shrink(to_api_prompt(load(path), comfy.get("/object_info")))
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = output_images(entry)
    savers = [i for i, n in prompt.items() if n["class_type"] in ("SaveImage", "PreviewImage")]
    assert sorted(saved) == sorted(savers)
    for node_id in savers:
        batch = [n["inputs"].get("batch_size", 1) for n in prompt.values() if n["class_type"].startswith("NextStep")]
        sizes = [comfy.image(info).size for info in saved[node_id]]
        assert sizes == [expected_size(prompt, node_id)] * len(sizes) and len(sizes) in batch


def test_edit_chain_third_pass_depends_on_the_first_instruction(comfy):
    workflow = load(REPO / "workflows" / "NextStep_three_pass_edit_chain.json")
    prompt = shrink(to_api_prompt(workflow, comfy.get("/object_info")))
    edits = sorted((i for i, n in prompt.items() if n["class_type"] == "NextStepEditImage"), key=int)
    third_saver = next(i for i, n in prompt.items() if n["class_type"] == "SaveImage"
                       and prompt[n["inputs"]["images"][0]]["inputs"]["samples"][0] == edits[2])

    def third_output(prompt):
        entry = comfy.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        return comfy.image(output_images(entry)[third_saver][0]).tobytes()

    before = third_output(prompt)
    assert third_output(copy.deepcopy(prompt)) == before  # deterministic (and cached)
    changed = copy.deepcopy(prompt)
    changed[edits[0]]["inputs"]["instruction"] = "Make the background snowy mountains"
    assert third_output(changed) != before


def test_example_inputs_are_copied_into_the_input_folder_and_listed_by_load_image(comfy):
    shipped = sorted(p.name for p in (REPO / "workflows" / "input").glob("*.png"))
    assert shipped
    choices = comfy.get("/object_info/LoadImage")["LoadImage"]["input"]["required"]["image"][0]
    for name in shipped:
        assert (comfy.base / "input" / name).read_bytes() == (REPO / "workflows" / "input" / name).read_bytes()
        assert name in choices
    used = {n["widgets_values"][0] for p in WORKFLOWS for n in load(p)["nodes"] if n["type"] == "LoadImage"}
    assert used <= {EXAMPLE_IMAGE, *shipped}


def test_a_users_own_input_of_the_same_name_is_never_overwritten(tmp_path):
    import importlib.util

    # nodes/examples.py alone (it imports nothing of the pack or of ComfyUI when given a folder)
    spec = importlib.util.spec_from_file_location("nextstep_examples", REPO / "nodes" / "examples.py")
    examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(examples)
    name = next((REPO / "workflows" / "input").glob("*.png")).name
    (tmp_path / name).write_bytes(b"the user's own")
    copied = examples.install_example_inputs(tmp_path)
    assert (tmp_path / name).read_bytes() == b"the user's own"
    assert name not in {p.name for p in copied} and copied


def test_the_masked_example_input_carries_its_mask_in_the_alpha_channel():
    from PIL import Image

    picture = Image.open(REPO / "workflows" / "input" / "NextStep_demo_scene_masked.png")
    alpha = picture.getchannel("A")
    assert picture.mode == "RGBA" and alpha.getextrema() == (0, 255)  # Load Image's MASK: 1 where alpha is 0


def test_edit_chain_passes_latents_from_pass_to_pass(comfy):
    workflow = load(REPO / "workflows" / "NextStep_three_pass_edit_chain.json")
    edits = [n for n in workflow["nodes"] if n["type"] == "NextStepEditImage"]
    assert len(edits) == 3
    for node in edits:
        sockets = {s["name"]: s["link"] for s in node["inputs"]}
        assert sockets["latent"] is not None and sockets["image"] is None
