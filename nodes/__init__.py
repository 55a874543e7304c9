"""The NextStep nodes for ComfyUI (V3 schema). Glue only: the work is done by nextstep_core."""

from comfy_api.latest import ComfyExtension, io

from . import given, loaders, sample, vae


class NextStepExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*loaders.NODES, *sample.NODES, *given.NODES, *vae.NODES]


async def comfy_entrypoint() -> NextStepExtension:
    return NextStepExtension()
