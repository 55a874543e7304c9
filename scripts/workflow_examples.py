"""The workflows' example input pictures, and thumbnails drawn from a real run of a workflow.

Used by scripts/make_workflows.py. The input pictures are demo-model scenes (64x64, the demo
model's own world); the masked one has its alpha channel painted away over the area to redraw,
as ComfyUI's mask editor saves it, so Load Image's MASK output is that area.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

SCENE_PROMPT = "a large red circle on the left and a small blue square at the bottom right, on a white background"
SCENE = "NextStep_demo_scene.png"
MASKED_SCENE = "NextStep_demo_scene_masked.png"
MASKED_BOX = (32, 32, 64, 64)  # left, top, right, bottom: the bottom right 2x2 tokens, around the blue square
CHAIN_SCENE = "NextStep_demo_chain_scene.png"


def held_out_chain():
    """The chain workflow's scene and its three (instruction, scene after it) passes: the first
    held-out chain of `evaluate --chains` (edit_eval.held_out_chains), taken as it comes, not
    picked by how the model does on it."""
    from nextstep_core.demo.edit_eval import held_out_chains

    return held_out_chains(1)[0]


def scene_picture():
    from nextstep_core.demo.scenes import Scene, SceneObject, render

    objects = (SceneObject("circle", "red", "large", 10.5, 32.5), SceneObject("square", "blue", "small", 53.5, 53.5))
    return render(Scene(64, 64, "white", objects=objects))


def write_example_inputs(folder: Path) -> None:
    """SCENE (RGB), MASKED_SCENE (RGBA, alpha 0 inside MASKED_BOX) and CHAIN_SCENE (the held-out
    chain's scene, RGB) into `folder`."""
    from PIL import Image

    from nextstep_core.demo.scenes import render

    folder.mkdir(parents=True, exist_ok=True)
    picture = scene_picture()
    picture.save(folder / SCENE)
    alpha = Image.new("L", picture.size, 255)
    alpha.paste(0, MASKED_BOX)
    masked = picture.convert("RGBA")
    masked.putalpha(alpha)
    masked.save(folder / MASKED_SCENE)
    render(held_out_chain()[0]).save(folder / CHAIN_SCENE)


def panel(image, side: int):
    """A picture scaled up (nearest) to about `side` pixels; a mask-painted (transparent) area shown tinted."""
    from PIL import Image

    rgba = image.convert("RGBA")
    rgb = rgba.convert("RGB")
    tinted = Image.blend(rgb, Image.new("RGB", rgb.size, (220, 60, 220)), 0.55)
    shown = Image.composite(rgb, tinted, rgba.getchannel("A"))
    scale = side / max(shown.size)
    return shown.resize((round(shown.width * scale), round(shown.height * scale)), Image.NEAREST)


def draw_thumbnail(title: str, pictures: list[tuple[str, object]], path: Path) -> None:
    """A 400x300 card: the title, then the pictures (label, PIL image) side by side, scaled up."""
    from PIL import Image, ImageDraw, ImageFont

    card = Image.new("RGB", (400, 300), (32, 34, 40))
    draw = ImageDraw.Draw(card)
    draw.rectangle((0, 0, 400, 6), fill=(120, 170, 255))
    font, small = ImageFont.load_default(size=20), ImageFont.load_default(size=13)
    y = 16
    for line in textwrap.wrap(title, 34):
        draw.text((14, y), line, font=font, fill=(235, 235, 240))
        y += 25
    side = min(120, (372 - 8 * (len(pictures) - 1)) // len(pictures))
    x = (400 - len(pictures) * side - 8 * (len(pictures) - 1)) // 2
    top = max(y + 12, 300 - side - 40)
    for label, picture in pictures:
        shown = panel(picture, side)
        card.paste(shown, (x + (side - shown.width) // 2, top))
        draw.text((x, top + side + 6), label, font=small, fill=(200, 200, 210))
        x += side + 8
    card.save(path, quality=92)


def run_for_thumbnail(server, workflow: dict, object_info: dict, title: str, path: Path, inputs: Path) -> None:
    """Queue the workflow as the frontend would, and draw its input picture and saved outputs."""
    import sys

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "comfy"))
    from comfy_harness import output_images
    from workflow_convert import to_api_prompt

    prompt = to_api_prompt(workflow, object_info)
    entry = server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", entry["status"]
    pictures = [("input", Image.open(inputs / n["inputs"]["image"])) for n in prompt.values()
                if n["class_type"] == "LoadImage"]
    saved = output_images(entry)
    for node_id in sorted(saved, key=int):
        label = prompt[node_id]["inputs"]["filename_prefix"].rsplit("/", 1)[-1].replace("_", " ")
        pictures += [(label, server.image(info).copy()) for info in saved[node_id]]
    draw_thumbnail(title, pictures, path)
