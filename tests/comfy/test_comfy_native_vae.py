"""A NextStep LATENT is a raw Flux-layout latent: ComfyUI's own VAELoader + VAEDecode, given the
NextStep image tokenizer saved as safetensors in the original Flux names, decodes it to the same
pixels as NextStep VAE Decode. The tokenizer here is random, full-size (ComfyUI's loader expects
Flux's ch 128, ch_mult [1, 2, 4, 4]), with non-trivial scaling_factor and shift_factor so that a
wrong latent conversion would show."""

import shutil

import numpy as np
import pytest
from comfy_harness import EXAMPLE_IMAGE, needs_comfyui, output_images

pytestmark = needs_comfyui

TOKENIZER = "NextStep-f8ch16-fullsize-random"
NATIVE_FILE = "nextstep_f8ch16_random.safetensors"


@pytest.fixture(scope="module")
def full_size_tokenizer(comfy):
    from nextstep_core.engine.vae import random_flux_state_dict
    from nextstep_core.engine.vae_files import VaeConfig, save_image_tokenizer

    config = VaeConfig(scaling_factor=0.6, shift_factor=0.2, deterministic=True, encoder_norm=True, psz=1)
    folder = save_image_tokenizer(comfy.base / "models" / "nextstep" / TOKENIZER, config,
                                  random_flux_state_dict(config, seed=5), fmt="safetensors")
    native = comfy.base / "models" / "vae"
    native.mkdir(parents=True, exist_ok=True)
    (native / NATIVE_FILE).symlink_to(folder / "checkpoint.safetensors")
    yield TOKENIZER
    (native / NATIVE_FILE).unlink()
    shutil.rmtree(folder)  # 330 MB: not worth keeping in pytest's temp folders


def test_native_vae_decode_reads_nextstep_latents(comfy, full_size_tokenizer):
    prompt = {
        "1": {"class_type": "NextStepModelLoader", "inputs": {"model_name": "NextStep-1.1", "dtype": "float32",
                                                             "tokenizer": full_size_tokenizer, "version": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}},
        "3": {"class_type": "NextStepVAEEncode", "inputs": {"vae": ["1", 1], "pixels": ["2", 0]}},
        "4": {"class_type": "NextStepVAEDecode", "inputs": {"vae": ["1", 1], "samples": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "nextstep_decode"}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": NATIVE_FILE}},
        "7": {"class_type": "VAEDecode", "inputs": {"vae": ["6", 0], "samples": ["3", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "native_decode"}},
    }
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    ours, native = (np.asarray(comfy.image(output_images(entry)[n][0]), dtype=np.int16) for n in ("5", "8"))
    assert ours.shape == native.shape
    assert ours.std() > 1, "the random decoder gives a flat image: the comparison would prove nothing"
    assert np.abs(ours - native).max() <= 2  # 8-bit rounding of two float32 implementations


def test_nextstep_latent_is_the_normalised_posterior_mean(comfy, full_size_tokenizer):
    """NextStep VAE Encode's LATENT = the tokenizer's raw z: the posterior mean, layer-normalised per
    position (encoder_norm), NOT (z - shift) * scale. ComfyUI's own VAEEncode gives the mean without
    that normalisation."""
    import torch
    from safetensors.torch import load_file

    prompt = {
        "1": {"class_type": "NextStepModelLoader", "inputs": {"model_name": "NextStep-1.1", "dtype": "float32",
                                                             "tokenizer": full_size_tokenizer, "version": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}},
        "3": {"class_type": "NextStepVAEEncode", "inputs": {"vae": ["1", 1], "pixels": ["2", 0]}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "latents/nextstep"}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": NATIVE_FILE}},
        "6": {"class_type": "VAEEncode", "inputs": {"vae": ["5", 0], "pixels": ["2", 0]}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/native"}},
    }
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]

    def saved(node):
        info = entry["outputs"][node]["latents"][0]
        return load_file(str(comfy.base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]

    ours, native = saved("4"), saved("7")
    assert ours.shape == native.shape == (1, 16, 4, 6)
    normalised = torch.nn.functional.layer_norm(native.permute(0, 2, 3, 1), (16,), eps=1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(ours, normalised, atol=1e-3)
    assert not torch.allclose(ours, (normalised - 0.2) * 0.6, atol=1e-2)
