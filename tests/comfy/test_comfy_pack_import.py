"""Without ComfyUI the pack folder imports cleanly and defines no ComfyUI entry point (runs everywhere)."""

import importlib.util
import sys

from comfy_harness import REPO


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
