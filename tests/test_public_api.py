"""The public API in nextstep_core/__init__.py: every exported name resolves, the pipeline's
names load on first use, and importing the package alone stays light."""

import subprocess
import sys
from pathlib import Path

import pytest

import nextstep_core

ROOT = Path(__file__).resolve().parents[1]


def test_every_exported_name_resolves():
    for name in nextstep_core.__all__:
        assert getattr(nextstep_core, name) is not None, name
    from nextstep_core import GenerationResult, LatentImage, NextStepError, NextStepPipeline, SamplerSettings
    from nextstep_core.engine.latents import LatentImage as defined_latent
    from nextstep_core.errors import NextStepError as defined_error
    from nextstep_core.pipeline import GenerationResult as defined_result
    from nextstep_core.pipeline import NextStepPipeline as defined_pipeline
    from nextstep_core.sampling.settings import SamplerSettings as defined_settings

    assert (NextStepPipeline, GenerationResult, NextStepError, SamplerSettings, LatentImage) == (
        defined_pipeline, defined_result, defined_error, defined_settings, defined_latent)
    assert (nextstep_core.DEMO_MODEL / "config.json").is_file()


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'Pipeline'"):
        nextstep_core.Pipeline  # noqa: B018


def test_importing_the_package_loads_no_model_libraries():
    code = ("import sys, nextstep_core; "
            "print(sorted(m for m in ('transformers', 'diffusers') if m in sys.modules)); "
            "nextstep_core.LatentImage; print(sorted(m for m in ('transformers', 'diffusers') if m in sys.modules)); "
            "nextstep_core.NextStepPipeline; print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["[]", "[]", "True"]
