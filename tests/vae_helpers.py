"""Small image tokenizers for the tests of engine/vae.py and engine/vae_files.py."""

import pytest
import torch

from nextstep_core.engine.vae import ImageTokenizer, random_flux_state_dict
from nextstep_core.engine.vae_files import VaeConfig, flux_keys_to_diffusers

# ch_mult with a channel change at level 1 gives both encoder and decoder a shortcut conv.
TINY = {"ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "z_channels": 16}


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: one thread is faster, and far faster when other processes load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**fields) -> VaeConfig:
    return VaeConfig.from_dict({**TINY, **fields}, nextstep_1_1_defaults=False)


def tiny_tokenizer(seed: int = 0, **fields) -> ImageTokenizer:
    config = tiny_config(**fields)
    tokenizer = ImageTokenizer(config)
    tokenizer.autoencoder.load_state_dict(flux_keys_to_diffusers(random_flux_state_dict(config, seed)))
    return tokenizer.eval()


def pixels_like(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def diffusers_kwargs(config: VaeConfig) -> dict:
    n = len(config.ch_mult)
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[config.ch * m for m in config.ch_mult],
                layers_per_block=config.num_res_blocks, latent_channels=config.z_channels, norm_num_groups=32,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)


