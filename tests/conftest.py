"""Shared fixtures: tiny checkpoints in both released layouts, written once per session."""

import pytest
import torch

from nextstep_core.demo.tiny import write_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_root_1_0(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny10")
    write_tiny_model(root, version="1.0", seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_model_1_0(tiny_root_1_0):
    return tiny_root_1_0 / "tiny-nextstep-1.0"


@pytest.fixture(scope="session")
def tiny_model_1_1(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny11"), version="1.1", seed=2)


@pytest.fixture(scope="session")
def pipe_1_0(tiny_model_1_0):
    from nextstep_core.pipeline import NextStepPipeline

    return NextStepPipeline.from_folder(tiny_model_1_0)


@pytest.fixture(scope="session")
def pipe_1_1(tiny_model_1_1):
    from nextstep_core.pipeline import NextStepPipeline

    return NextStepPipeline.from_folder(tiny_model_1_1)
