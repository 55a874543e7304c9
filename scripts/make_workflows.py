"""Write workflows/*.json (ComfyUI's UI format) and a .jpg thumbnail for each.

    bash scripts/comfy_env.sh && .venv-comfy/bin/python scripts/make_workflows.py

The graphs are described below by node, widget name and link; widget ORDER, socket types and
defaults come from the /object_info of a real ComfyUI started with this pack, so the files
match what the frontend itself would save. ComfyUI 0.3.75 serves a custom node's `workflows/`
folder in its template browser (under the pack's folder name), with `<name>.jpg` as thumbnail.
Workflows that run on the embedded demo model ("run": True) are run in that server and their
thumbnail shows the input picture and the saved outputs; the others (they need downloaded
checkpoints) get a drawn card. The example input pictures go to workflows/input/, which the
pack copies into ComfyUI's input folder at start-up (nodes/examples.py).
"""

from __future__ import annotations

import json
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "comfy"))
sys.path.insert(0, str(REPO))  # nextstep_core, for the example pictures

from comfy_harness import PACK_NAME, ComfyServer  # noqa: E402
from workflow_convert import extra_values, input_specs, is_widget  # noqa: E402
from workflow_examples import (  # noqa: E402
    CHAIN_SCENE,
    MASKED_SCENE,
    SCENE,
    held_out_chain,
    run_for_thumbnail,
    write_example_inputs,
)

OUT = REPO / "workflows"  # and OUT/input: the example pictures the workflows load
COLUMN = 420

LOADER = {"tokenizer": "auto", "dtype": "auto", "version": "auto", "block_swap": -1}
EDIT_IMAGE = "example.png"  # ComfyUI's own input/example.png; pick your image in the Load Image node

WORKFLOWS = {
    "NextStep_demo_text_to_image": {
        "title": "NextStep demo: text to image",
        "note": "Runs out of the box: nextstep-demo is the small model shipped inside the pack, trained on "
                "simple drawn scenes (flat shapes on plain backgrounds, 64x64 and 128x64 pixels). Describe "
                "shapes, colours and places the way the prompt does. For real pictures load NextStep-1.1 "
                "instead (see the NextStep-1.1 workflow).",
        "nodes": [
            (1, "NextStepModelLoader", (0, 0), {"model_name": "nextstep-demo", **LOADER}),
            (2, "NextStepTextToImage", (1, 0), {
                "prompt": "a large red circle on the left and a small blue square at the bottom right, "
                          "on a white background",
                "width": 64, "height": 64, "seed": 42}),
            (3, "NextStepVAEDecode", (2, 0), {}),
            (4, "SaveImage", (3, 0), {"filename_prefix": "NextStep/demo"}),
        ],
        "links": [(1, 0, 2, "model"), (1, 1, 3, "vae"), (2, 0, 3, "samples"), (3, 0, 4, "images")],
    },
    "NextStep-1.1_text_to_image": {
        "title": "NextStep-1.1: text to image",
        "note": "Put the NextStep-1.1 folder as downloaded (config.json, *.safetensors, tokenizer files and "
                "vae/) in models/nextstep/NextStep-1.1. It is a 14B model: about 30 GB of memory in bfloat16. "
                "Steps, shift and sampler at 0 / auto take the authors' defaults (sde, 28 steps). Each image "
                "token is sampled in turn, so the preview fills in row by row.",
        "nodes": [
            (1, "NextStepModelLoader", (0, 0), {"model_name": "NextStep-1.1", **LOADER}),
            (2, "NextStepTextToImage", (1, 0), {
                "prompt": "A baby panda sitting in a bamboo forest, soft morning light, detailed fur, photograph",
                "negative": "blurry, low quality, distorted", "width": 512, "height": 512, "seed": 1}),
            (3, "NextStepVAEDecode", (2, 0), {}),
            (4, "SaveImage", (3, 0), {"filename_prefix": "NextStep/1.1"}),
        ],
        "links": [(1, 0, 2, "model"), (1, 1, 3, "vae"), (2, 0, 3, "samples"), (3, 0, 4, "images")],
    },
    "NextStep-1-Large-Edit_edit_image": {
        "title": "NextStep-1-Large-Edit: edit an image",
        "note": "Put NextStep-1-Large-Edit in models/nextstep/ and its image tokenizer folder "
                "NextStep-1-f8ch16-Tokenizer beside it (tokenizer: auto finds it). Load your image (sides "
                "that are multiples of 16; width and height 0 keep its size) and say what to change. The "
                "<image> marker is added in front of the instruction when it is left out.",
        "nodes": [
            (1, "NextStepModelLoader", (0, 0), {"model_name": "NextStep-1-Large-Edit", **LOADER}),
            (2, "LoadImage", (0, 1), {"image": EDIT_IMAGE}),
            (3, "NextStepEditImage", (1, 0), {"instruction": "Add a red hat to the subject", "seed": 7}),
            (4, "NextStepVAEDecode", (2, 0), {}),
            (5, "SaveImage", (3, 0), {"filename_prefix": "NextStep/edit"}),
        ],
        "links": [(1, 0, 3, "model"), (2, 0, 3, "image"), (1, 1, 4, "vae"), (3, 0, 4, "samples"),
                  (4, 0, 5, "images")],
    },
    "NextStep_three_pass_edit_chain": {
        "title": "NextStep: three edit passes in a chain",
        "note": "Each pass edits the previous pass's LATENT as it is (no decode to pixels and encode back between "
                "passes, so nothing blurs on the way), and every pass is saved. The picture is encoded once, by "
                "NextStep VAE Encode. Runs on the demo model: the scene and the three instructions are the first "
                "chain of the demo model's held-out chains, with the seeds its evaluation uses for them "
                "(1000, 2000, 3000). For real pictures load NextStep-1-Large-Edit (see the edit workflow for where "
                "its files go) and write real instructions. Seeds are fixed so that changing one instruction re-runs "
                "only that pass and the ones after it.",
        "run": True,
        "nodes": [
            (1, "NextStepModelLoader", (0, 0), {"model_name": "nextstep-demo", **LOADER}),
            (2, "LoadImage", (0, 1), {"image": CHAIN_SCENE}),
            (12, "NextStepVAEEncode", (0, 2), {}),
            *[(3 + p, "NextStepEditImage", (1 + p, 0), {"instruction": instruction, "seed": 1000 * (p + 1)}, "fixed")
              for p, (instruction, _) in enumerate(held_out_chain()[1])],
            (6, "NextStepVAEDecode", (1, 2), {}),
            (7, "NextStepVAEDecode", (2, 2), {}),
            (8, "NextStepVAEDecode", (3, 2), {}),
            (9, "SaveImage", (1, 3), {"filename_prefix": "NextStep/chain_pass1"}),
            (10, "SaveImage", (2, 3), {"filename_prefix": "NextStep/chain_pass2"}),
            (11, "SaveImage", (3, 3), {"filename_prefix": "NextStep/chain_pass3"}),
        ],
        "links": [(1, 0, 3, "model"), (1, 0, 4, "model"), (1, 0, 5, "model"), (1, 1, 12, "vae"),
                  (2, 0, 12, "pixels"), (12, 0, 3, "latent"),
                  (3, 0, 4, "latent"), (4, 0, 5, "latent"),
                  (1, 1, 6, "vae"), (1, 1, 7, "vae"), (1, 1, 8, "vae"),
                  (3, 0, 6, "samples"), (4, 0, 7, "samples"), (5, 0, 8, "samples"),
                  (6, 0, 9, "images"), (7, 0, 10, "images"), (8, 0, 11, "images")],
    },
    "NextStep_demo_continue_image": {
        "title": "NextStep demo: continue an image",
        "note": "Keeps the top keep_rows image-token rows of the picture (16 pixels each; 2 keeps the top 32) and "
                "lets the model draw the rest below them, following the prompt. The kept rows come back "
                "unchanged. Runs on the demo model; for real pictures load NextStep-1.1 and your own image "
                "(sides that are multiples of 16).",
        "run": True,
        "nodes": [
            (1, "NextStepModelLoader", (0, 0), {"model_name": "nextstep-demo", **LOADER}),
            (2, "LoadImage", (0, 1), {"image": SCENE}),
            (3, "NextStepContinueImage", (1, 0), {
                "prompt": "a large red circle on the left and a small yellow triangle at the bottom right, "
                          "on a white background", "keep_rows": 2, "seed": 4}),
            (4, "NextStepVAEDecode", (2, 0), {}),
            (5, "SaveImage", (3, 0), {"filename_prefix": "NextStep/continued"}),
        ],
        "links": [(1, 0, 3, "model"), (2, 0, 3, "image"), (1, 1, 4, "vae"), (3, 0, 4, "samples"),
                  (4, 0, 5, "images")],
    },
    "NextStep_demo_regenerate_region": {
        "title": "NextStep demo: regenerate a masked region",
        "note": "Redraws the masked region with the prompt and keeps everything else token for token. The mask "
                "is Load Image's MASK output: right-click Load Image, Open in MaskEditor, paint the area to "
                "redraw and save (the example picture comes with its bottom right corner painted). Every 16x16 "
                "token the mask touches is redrawn; grow widens the region by whole tokens. Runs on the demo "
                "model; for real pictures load NextStep-1.1.",
        "run": True,
        "nodes": [
            (1, "NextStepModelLoader", (0, 0), {"model_name": "nextstep-demo", **LOADER}),
            (2, "LoadImage", (0, 1), {"image": MASKED_SCENE}),
            (3, "NextStepRegenerateRegion", (1, 0), {
                "prompt": "a large red circle on the left and a small yellow triangle at the bottom right, "
                          "on a white background", "seed": 5}),
            (4, "NextStepVAEDecode", (2, 0), {}),
            (5, "SaveImage", (3, 0), {"filename_prefix": "NextStep/region"}),
        ],
        "links": [(1, 0, 3, "model"), (2, 0, 3, "image"), (2, 1, 3, "mask"), (1, 1, 4, "vae"),
                  (3, 0, 4, "samples"), (4, 0, 5, "images")],
    },
    "NextStep_demo_masked_edit": {
        "title": "NextStep demo: edit inside a mask",
        "note": "Edits only inside the mask (Load Image's MASK output: paint the area in its mask editor; the "
                "example picture comes with its bottom right corner painted); outside it the picture is kept "
                "token for token. Runs on the demo model; for real pictures load NextStep-1-Large-Edit.",
        "run": True,
        "nodes": [
            (1, "NextStepModelLoader", (0, 0), {"model_name": "nextstep-demo", **LOADER}),
            (2, "LoadImage", (0, 1), {"image": MASKED_SCENE}),
            (3, "NextStepEditImage", (1, 0), {"instruction": "make the blue square green", "seed": 6}),
            (4, "NextStepVAEDecode", (2, 0), {}),
            (5, "SaveImage", (3, 0), {"filename_prefix": "NextStep/masked_edit"}),
        ],
        "links": [(1, 0, 3, "model"), (2, 0, 3, "image"), (2, 1, 3, "mask"), (1, 1, 4, "vae"),
                  (3, 0, 4, "samples"), (4, 0, 5, "images")],
    },
    "NextStep_to_Flux_img2img_refine": {
        "title": "NextStep-1.1 composes, Flux refines",
        "note": "NextStep-1.1 lays out the picture; Flux.1 [dev] repaints it at denoise 0.45. NextStep's "
                "LATENT has Flux's shape but comes from NextStep's own autoencoder, so the image goes through "
                "pixels: NextStep VAE Decode, then VAE Encode with Flux's ae.safetensors. Flux files: "
                "models/diffusion_models/flux1-dev.safetensors, models/text_encoders/clip_l.safetensors and "
                "t5xxl_fp8_e4m3fn.safetensors, models/vae/ae.safetensors.",
        "nodes": [
            (1, "NextStepModelLoader", (0, 0), {"model_name": "NextStep-1.1", **LOADER}),
            (2, "NextStepTextToImage", (1, 0), {
                "prompt": "A cozy reading corner with a green armchair, a floor lamp and a tall bookshelf",
                "width": 512, "height": 512, "seed": 5}),
            (3, "NextStepVAEDecode", (2, 0), {}),
            (4, "SaveImage", (3, 0), {"filename_prefix": "NextStep/before_refine"}),
            (5, "UNETLoader", (0, 2), {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}),
            (6, "DualCLIPLoader", (0, 3), {"clip_name1": "clip_l.safetensors",
                                           "clip_name2": "t5xxl_fp8_e4m3fn.safetensors", "type": "flux"}),
            (7, "VAELoader", (0, 4), {"vae_name": "ae.safetensors"}),
            (8, "CLIPTextEncode", (1, 2), {
                "text": "A cozy reading corner with a green armchair, a floor lamp and a tall bookshelf, "
                        "photograph, soft evening light, fine detail"}),
            (9, "FluxGuidance", (1, 3), {"guidance": 3.5}),
            (10, "ConditioningZeroOut", (1, 4), {}),
            (11, "VAEEncode", (2, 1), {}),
            (12, "KSampler", (2, 2), {"seed": 5, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                                       "scheduler": "simple", "denoise": 0.45}),
            (13, "VAEDecode", (3, 2), {}),
            (14, "SaveImage", (3, 3), {"filename_prefix": "NextStep/refined"}),
        ],
        "links": [(1, 0, 2, "model"), (1, 1, 3, "vae"), (2, 0, 3, "samples"), (3, 0, 4, "images"),
                  (6, 0, 8, "clip"), (8, 0, 9, "conditioning"), (8, 0, 10, "conditioning"),
                  (3, 0, 11, "pixels"), (7, 0, 11, "vae"),
                  (5, 0, 12, "model"), (9, 0, 12, "positive"), (10, 0, 12, "negative"), (11, 0, 12, "latent_image"),
                  (12, 0, 13, "samples"), (7, 0, 13, "vae"), (13, 0, 14, "images")],
    },
}


def default_value(kind, options):
    if "default" in options:
        return options["default"]
    choices = kind if isinstance(kind, list) else options.get("options", [])
    if choices:
        return choices[0]
    raise ValueError(f"no default for {kind} {options}")


def build(spec: dict, object_info: dict) -> dict:
    nodes, links = [], []
    by_id = {}
    for order, entry in enumerate(spec["nodes"]):
        node_id, kind, (col, row), widgets = entry[:4]
        control = entry[4] if len(entry) > 4 else "randomize"
        info = object_info[kind]
        values, sockets = [], []
        for name, input_kind, options in input_specs(info):
            if is_widget(input_kind, options):
                values.append(widgets[name] if name in widgets else default_value(input_kind, options))
                if options.get("control_after_generate"):
                    values.append(control)
                values.extend(["image"] * (extra_values(options) - bool(options.get("control_after_generate"))))
            else:
                sockets.append({"name": name, "type": input_kind, "link": None})
        unknown = set(widgets) - {name for name, k, o in input_specs(info) if is_widget(k, o)}
        assert not unknown, f"{kind}: no widgets {unknown}"
        outputs = [{"name": name, "type": out_type, "links": [], "slot_index": i}
                   for i, (name, out_type) in enumerate(zip(info["output_name"], info["output"]))]
        height = 46 + 24 * (len(values) + len(sockets)) + (60 * sum(isinstance(v, str) and len(v) > 40 for v in values))
        node = {"id": node_id, "type": kind, "pos": [40 + COLUMN * col, 140 + 330 * row],
                "size": [380 if len(values) > 6 else 320, height], "flags": {}, "order": order, "mode": 0,
                "inputs": sockets, "outputs": outputs, "properties": {"Node name for S&R": kind},
                "widgets_values": values}
        nodes.append(node)
        by_id[node_id] = node
    for link_id, (src, slot, dst, name) in enumerate(spec["links"], start=1):
        source, target = by_id[src], by_id[dst]
        socket = next(s for s in target["inputs"] if s["name"] == name)
        assert socket["link"] is None, f"{dst}.{name} linked twice"
        socket["link"] = link_id
        source["outputs"][slot]["links"].append(link_id)
        links.append([link_id, src, slot, dst, target["inputs"].index(socket), source["outputs"][slot]["type"]])
    note_id = max(by_id) + 1
    nodes.append({"id": note_id, "type": "Note", "pos": [40, -120], "size": [900, 110], "flags": {},
                  "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                  "widgets_values": [spec["note"]], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": note_id, "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [40, 160]}}, "version": 0.4}


def thumbnail(spec: dict, object_info: dict, path: Path) -> None:
    """A 400x300 card: the title and the graph's main path. Drawn, not rendered by a model."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (400, 300), (32, 34, 40))
    draw = ImageDraw.Draw(image)
    title = ImageFont.load_default(size=22)
    small = ImageFont.load_default(size=13)
    draw.rectangle((0, 0, 400, 6), fill=(120, 170, 255))
    y = 18
    for line in textwrap.wrap(spec["title"], 30):
        draw.text((16, y), line, font=title, fill=(235, 235, 240))
        y += 28
    boxes = [object_info[kind]["display_name"] for _, kind, *_ in spec["nodes"]][:7]
    y += 10
    for i, kind in enumerate(boxes):
        x0 = 16 + (i % 2) * 190
        y0 = y + (i // 2) * 44
        colour = (70, 110, 190) if "NextStep" in kind else (80, 84, 92)
        draw.rounded_rectangle((x0, y0, x0 + 176, y0 + 34), radius=6, fill=colour)
        draw.text((x0 + 8, y0 + 10), kind, font=small, fill=(245, 245, 250))
    image.save(path, quality=90)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    write_example_inputs(OUT / "input")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "custom_nodes").mkdir()
        (base / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
        server = ComfyServer(base).start()  # the pack copies workflows/input/ into its input folder
        try:
            object_info = server.get("/object_info")
            for name, spec in WORKFLOWS.items():
                workflow = build(spec, object_info)
                (OUT / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
                if spec.get("run"):  # a thumbnail of what the workflow really gives, on the demo model
                    run_for_thumbnail(server, workflow, object_info, spec["title"], OUT / f"{name}.jpg",
                                      OUT / "input")
                else:
                    thumbnail(spec, object_info, OUT / f"{name}.jpg")
                print("wrote", OUT / f"{name}.json")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
