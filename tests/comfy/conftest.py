"""One real ComfyUI server per test session, with this pack and tiny checkpoints.

Its base directory is a fresh temp folder: custom_nodes/ComfyUI-NextStep links to this repo,
models/nextstep/ holds tiny random checkpoints under the folder names the shipped workflows
expect, input/ a small example image. Nothing is installed here: scripts/comfy_env.sh does that.
"""

from __future__ import annotations

import pytest
from comfy_harness import COMFY_DIR, PACK_NAME, REPO, ComfyServer

EXAMPLE_IMAGE = "example.png"
EXAMPLE_SIZE = (48, 32)  # non-square, whole 16-pixel tokens


def write_example_image(path):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", EXAMPLE_SIZE, (40, 90, 200))
    ImageDraw.Draw(image).ellipse((4, 4, 26, 26), fill=(220, 40, 30))
    image.save(path)


def write_models(models):
    from nextstep_core.cli import DEMO_MODEL
    from nextstep_core.tiny import write_tiny_model

    nextstep = models / "nextstep"
    write_tiny_model(nextstep, version="1.1", name="NextStep-1.1", seed=2)
    write_tiny_model(nextstep, version="1.0", name="NextStep-1-Large-Edit", seed=1)  # + NextStep-1-f8ch16-Tokenizer/
    if not (DEMO_MODEL / "config.json").is_file():
        # Until the embedded demo model ships, a tiny model stands in under its listed name.
        write_tiny_model(nextstep, version="1.1", name="nextstep-demo", seed=3)
    (nextstep / "NextStep-broken").mkdir()
    (nextstep / "NextStep-broken" / "README.md").write_text("a download that never finished\n")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    if COMFY_DIR is None:
        pytest.skip("no ComfyUI in this interpreter (see scripts/comfy_env.sh)")
    base = tmp_path_factory.mktemp("comfyui")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    write_models(base / "models")
    (base / "input").mkdir()
    write_example_image(base / "input" / EXAMPLE_IMAGE)
    server = ComfyServer(base, ["--preview-method", "auto"]).start()
    try:
        yield server
    finally:
        server.stop()
