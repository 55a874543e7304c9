"""The NextStep nodes for ComfyUI (V3 schema). Glue only: the work is done by nextstep_core.

Loading the pack also copies the workflows' example input pictures into ComfyUI's input folder
when they are missing there (nodes/examples.py)."""

from comfy_api.latest import ComfyExtension, io

from . import given, loaders, sample, sampler, vae
from .examples import install_example_inputs


class NextStepExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*loaders.NODES, *sampler.NODES, *sample.NODES, *given.NODES, *vae.NODES]


async def comfy_entrypoint() -> NextStepExtension:
    install_example_inputs()
    return NextStepExtension()
