"""ComfyUI-NextStep as a ComfyUI custom node pack.

ComfyUI imports this folder as a package and calls `comfy_entrypoint()` (the V3 extension
API). Everything inside the pack is imported relatively: ComfyUI owns top-level module names
such as `nodes`, `utils` and `server`. Outside ComfyUI (the engine's tests, the CLI) this file
defines nothing, so importing the folder never needs ComfyUI.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]
