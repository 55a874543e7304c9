"""NextStep-1 / 1.1 image generation: plain PyTorch, no ComfyUI import.

    from nextstep_core import NextStepPipeline

    pipe = NextStepPipeline.from_folder("models/nextstep/NextStep-1.1", precision="bf16", device="cuda")
    result = pipe.generate("a red circle on the left", width=512, height=256, seed=7)
    result.to_pil()[0].save("out.png")

The public API is what this module exports (`__all__`). The pipeline's names load on first
use, so `import nextstep_core` and the CLI's argument checks stay quick (no transformers or
diffusers import until a model is needed). The layout, for those who read further:
engine/ (the model and its files), sampling/ (samplers, guidance, token loops), memory/
(block swap, the memory planner), pipeline.py (generate), demo/ (the demo model's world);
docs/architecture.md draws it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NextStepError
from .sampling.settings import (
    CFG_SCHEDULES,
    CONTRACT_SAMPLERS,
    FEW_STEP_SAMPLERS,
    RECOMMENDED_STEPS,
    SAMPLERS,
    SamplerSettings,
)

if TYPE_CHECKING:
    from .engine.latents import LatentImage
    from .pipeline import GenerationInterrupted, GenerationResult, NextStepPipeline, ProgressCallback
    from .request import Given, Guidance, Output, Request, Sampling, resolve

# The small demo model shipped inside the package (the CLI's default model).
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"

# name -> module that defines it, imported on first access (PEP 562)
LAZY_NAMES = {name: "pipeline" for name in
              ("NextStepPipeline", "GenerationResult", "GenerationInterrupted", "ProgressCallback")}
LAZY_NAMES["LatentImage"] = "engine.latents"  # light: torch only, no transformers
LAZY_NAMES.update({name: "request" for name in ("Request", "Sampling", "Guidance", "Given", "Output", "resolve")})

__all__ = [
    "CFG_SCHEDULES",
    "CONTRACT_SAMPLERS",
    "DEMO_MODEL",
    "FEW_STEP_SAMPLERS",
    "RECOMMENDED_STEPS",
    "SAMPLERS",
    "GenerationInterrupted",
    "GenerationResult",
    "Given",
    "Guidance",
    "LatentImage",
    "NextStepError",
    "NextStepPipeline",
    "Output",
    "ProgressCallback",
    "Request",
    "SamplerSettings",
    "Sampling",
    "resolve",
]


def __getattr__(name: str):
    if name in LAZY_NAMES:
        value = getattr(importlib.import_module(f".{LAZY_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
