"""Shared fixtures: tiny checkpoints in both released layouts, written once per session."""

import os

import pytest
import torch

import nextstep_core.engine.precision as precision
from nextstep_core.demo.tiny import write_tiny_model

torch.set_num_threads(int(os.environ.get("NEXTSTEP_TEST_THREADS", "2")))  # 1 to check one-thread rounding

# NEXTSTEP_TEST_CPU=avx2: run as on a CPU without native bfloat16 (AVX2 only, as many AMD EPYC
# and older Intel CPUs). With ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 set as well,
# torch's own kernels are such a CPU's too:
#   NEXTSTEP_TEST_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 bash scripts/test.sh
if os.environ.get("NEXTSTEP_TEST_CPU") == "avx2":
    precision.native_bf16_cpu = lambda: False


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
