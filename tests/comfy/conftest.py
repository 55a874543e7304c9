"""One real ComfyUI server per test session, with this pack and tiny checkpoints.

Its base directory is a fresh temp folder: custom_nodes/ComfyUI-NextStep links to this repo,
models/nextstep/ holds tiny random checkpoints under the folder names the shipped workflows
expect, input/ a small example image. Nothing is installed here: scripts/comfy_env.sh does that.
"""

from __future__ import annotations

import pytest
from comfy_harness import COMFY_DIR, EXAMPLE_IMAGE, PACK_NAME, REPO, ComfyServer, write_example_image

FLUX_FILES = [("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
              ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"), ("vae", "ae.safetensors")]


def write_models(models):
    from nextstep_core import DEMO_MODEL
    from nextstep_core.demo.tiny import write_tiny_model

    nextstep = models / "nextstep"
    write_tiny_model(nextstep, version="1.1", name="NextStep-1.1", seed=2)
    write_tiny_model(nextstep, version="1.0", name="NextStep-1-Large-Edit", seed=1)  # + NextStep-1-f8ch16-Tokenizer/
    if not (DEMO_MODEL / "config.json").is_file():
        # Until the embedded demo model ships, a tiny model stands in under its listed name.
        write_tiny_model(nextstep, version="1.1", name="nextstep-demo", seed=3)
    (nextstep / "NextStep-broken").mkdir()
    (nextstep / "NextStep-broken" / "README.md").write_text("a download that never finished\n")
    # Empty stand-ins, so that the Flux refine workflow's file names are valid choices (it is
    # checked against /object_info, not run).
    for folder, name in FLUX_FILES:
        (models / folder).mkdir(parents=True, exist_ok=True)
        (models / folder / name).write_bytes(b"")


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
