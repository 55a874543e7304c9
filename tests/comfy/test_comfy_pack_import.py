"""Importing the pack: without ComfyUI it defines no entry point (runs everywhere); inside ComfyUI
it loads no training or scene code of the demo model, only its word list."""

import importlib.util
import subprocess
import sys

import pytest
from comfy_harness import COMFY_DIR, REPO, needs_comfyui

# What ComfyUI does with a custom node folder (nodes.py load_custom_node): the folder imported as
# a package under its own name, then its V3 entry point asked for the node list.
IMPORT_AS_COMFYUI_DOES = """
import asyncio, importlib.util, os, sys
comfy_dir, pack = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
os.chdir(comfy_dir)
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
spec = importlib.util.spec_from_file_location("ComfyUI-NextStep", os.path.join(pack, "__init__.py"),
                                              submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
extension = asyncio.run(module.comfy_entrypoint())
nodes = asyncio.run(extension.get_node_list())
print(len(nodes))
print(" ".join(sorted(name for name in sys.modules if name.startswith("ComfyUI-NextStep.nextstep_core.demo"))))
"""


def test_pack_imports_without_comfyui():
    assert importlib.util.find_spec("comfy_api") is None, "this check needs an interpreter without ComfyUI on its path"
    spec = importlib.util.spec_from_file_location("ComfyUI-NextStep", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert not hasattr(module, "comfy_entrypoint")


@needs_comfyui
def test_loading_the_pack_imports_only_the_demo_word_list(tmp_path):
    result = subprocess.run([sys.executable, "-c", IMPORT_AS_COMFYUI_DOES, str(COMFY_DIR), str(REPO)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    count, demo_modules = result.stdout.strip().splitlines()[-2:]
    assert int(count) >= 7
    assert demo_modules.split() == ["ComfyUI-NextStep.nextstep_core.demo",
                                    "ComfyUI-NextStep.nextstep_core.demo.vocabulary"]


def test_nextstep_comfyui_points_the_harness_at_another_checkout(tmp_path, monkeypatch):
    from comfy_harness import COMFYUI_ENV, find_comfyui

    (tmp_path / "main.py").write_text("")
    monkeypatch.setenv(COMFYUI_ENV, str(tmp_path))
    assert find_comfyui() == tmp_path.resolve()
    monkeypatch.setenv(COMFYUI_ENV, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="is not a ComfyUI checkout: it has no main.py"):
        find_comfyui()
