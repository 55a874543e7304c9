"""The image tokenizer: Flux key conversion, latent normalisation, scale/shift, files and refusals."""

import json

import pytest
import torch
from bounds import assert_float64_agree, assert_layer_normalised, in_float64

from nextstep_core.engine.vae import (
    ImageTokenizer,
    build_autoencoder,
    load_image_tokenizer,
    normalize_latent_positions,
    random_flux_state_dict,
)
from nextstep_core.engine.vae_files import (
    VaeConfig,
    diffusers_keys_to_flux,
    flux_keys_to_diffusers,
    save_image_tokenizer,
)
from nextstep_core.errors import NextStepError

TINY = dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=16)


def tiny_config(**extra) -> VaeConfig:
    return VaeConfig.from_dict({**TINY, **extra}, nextstep_1_1_defaults=False)


def test_flux_names_convert_to_exactly_the_diffusers_names():
    config = VaeConfig.from_dict({**TINY, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2}, nextstep_1_1_defaults=True)
    flux = random_flux_state_dict(config, seed=0)
    assert "encoder.down.1.block.0.nin_shortcut.weight" in flux  # channel change 32 -> 64
    assert "decoder.up.3.upsample.conv.weight" in flux and "decoder.up.0.block.2.conv1.weight" in flux
    assert "encoder.mid.attn_1.q.weight" in flux and flux["encoder.mid.attn_1.q.weight"].dim() == 4
    assert "encoder.norm_out.weight" in flux and "decoder.mid.block_2.conv2.bias" in flux
    converted = flux_keys_to_diffusers(flux, levels=4)
    reference = build_autoencoder(config).state_dict()
    assert set(converted) == set(reference)
    for name, tensor in converted.items():
        assert tensor.shape == reference[name].shape, name
    # decoder up.i is diffusers up_blocks.(n-1-i)
    assert torch.equal(converted["decoder.up_blocks.0.upsamplers.0.conv.weight"],
                       flux["decoder.up.3.upsample.conv.weight"])  # renamed, not computed: the same numbers
    back = diffusers_keys_to_flux(converted, levels=4)
    assert set(back) == set(flux)
    assert all(torch.equal(back[k], flux[k]) for k in flux)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_save_load_round_trip_non_square(tmp_path, fmt):
    config = tiny_config(scaling_factor=0.5, shift_factor=0.1)
    flux = random_flux_state_dict(config, seed=1)
    folder = save_image_tokenizer(tmp_path / fmt, config, flux, fmt=fmt)
    loaded = load_image_tokenizer(folder, nextstep_1_1_defaults=False)
    direct = ImageTokenizer(config)
    direct.autoencoder.load_state_dict(flux_keys_to_diffusers(flux))
    pixels = torch.rand(1, 3, 48, 80) * 2 - 1
    with torch.no_grad():
        latent = loaded.encode(pixels)
        assert latent.shape == (1, 16, 6, 10)
        # exact: the same weights (read back bit for bit) run through the same operations in the same order
        assert torch.equal(loaded.decode(latent), direct.decode(latent))
        assert loaded.decode(latent).shape == (1, 3, 48, 80)


def test_encoder_normalisation_per_position_and_per_patch():
    """Each position's 16 channels, or each 2x2 patch's 64 numbers, have mean 0 and variance 1
    within the float32 rounding of a layer norm of those numbers (bounds.py: ~1e-5 / ~3e-5)."""
    mean = torch.randn(2, 16, 4, 6) * 3 + 1
    per_position = normalize_latent_positions(mean, psz=1)
    assert_layer_normalised(per_position, mean, dim=1)
    per_patch = normalize_latent_positions(mean, psz=2)

    def patches_of(latent):
        return latent.reshape(2, 16, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 2, 3, 64)

    assert_layer_normalised(patches_of(per_patch), patches_of(mean), dim=-1)
    assert (per_patch.var(1, unbiased=False) - 1).abs().max() > 0.05  # single positions are not normalised


def test_encode_applies_norm_noise_scale_and_shift_as_specified():
    """The encodings are checked bit for bit (torch.equal): each expected value is the encoder's own operations
    in the same order on the same numbers (the encoder is deterministic on a CPU for a given input). The decode
    round trip is not: (z - 0.25) * 2 / 2 + 0.25 rounds back to z only within float32 rounding, so it runs in
    float64, where it is z up to ~1e-16 and both decoders agree to float64 rounding (assert_float64_agree)."""
    torch.manual_seed(0)
    sampled = ImageTokenizer(tiny_config(encoder_norm=True, psz=2, scaling_factor=2.0, shift_factor=0.25))
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    noise = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        mean, logvar = sampled.posterior(pixels)
        raw_mean = sampled.autoencoder.encoder(pixels).chunk(2, dim=1)[0]
        assert torch.equal(mean, normalize_latent_positions(raw_mean, 2))
        expected = (mean + torch.exp(logvar / 2) * noise - 0.25) * 2.0
        assert torch.equal(sampled.encode(pixels, noise=noise), expected)
        sampled.config.deterministic = True
        assert torch.equal(sampled.encode(pixels, noise=noise), (mean - 0.25) * 2.0)
        # decode inverts the scaling: z = latent / scale + shift
        z = torch.randn(1, 16, 4, 4, dtype=torch.float64)
        with in_float64(sampled.autoencoder):
            assert_float64_agree(sampled.decode((z - 0.25) * 2.0), sampled.autoencoder.decoder(z))


def test_logvar_is_clamped():
    tokenizer = ImageTokenizer(tiny_config())
    with torch.no_grad():
        tokenizer.autoencoder.encoder.conv_out.bias[16:] = 1000.0
        _, logvar = tokenizer.posterior(torch.zeros(1, 3, 16, 16))
        assert logvar.max().item() == 20.0
        tokenizer.autoencoder.encoder.conv_out.bias[16:] = -1000.0
        _, logvar = tokenizer.posterior(torch.zeros(1, 3, 16, 16))
        assert logvar.min().item() == -30.0


def test_1_1_defaults_when_the_config_is_silent():
    c = VaeConfig.from_dict(TINY, nextstep_1_1_defaults=True)
    assert (c.scaling_factor, c.shift_factor, c.deterministic, c.encoder_norm, c.psz) == (1.0, 0.0, True, True, 1)
    assert c.downsample == 8


class Exploit:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    marker = tmp_path / "pwned"
    torch.save({"encoder.conv_in.weight": Exploit(str(marker))}, folder / "checkpoint.pt")
    with pytest.raises(NextStepError, match="is not a plain tensor state dict and was refused"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)
    assert not marker.exists()


def test_file_errors(tmp_path):
    with pytest.raises(NextStepError, match="folder .*nothing does not exist"):
        load_image_tokenizer(tmp_path / "nothing", nextstep_1_1_defaults=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NextStepError, match="has no config.json"):
        load_image_tokenizer(empty, nextstep_1_1_defaults=True)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(NextStepError, match="is not valid JSON"):
        load_image_tokenizer(empty, nextstep_1_1_defaults=True)
    (empty / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(NextStepError, match="has no checkpoint.pt or .safetensors weights"):
        load_image_tokenizer(empty, nextstep_1_1_defaults=True)


def test_truncated_and_mismatched_checkpoints(tmp_path):
    config = tiny_config()
    folder = save_image_tokenizer(tmp_path / "v", config, random_flux_state_dict(config, seed=0))
    data = (folder / "checkpoint.pt").read_bytes()
    (folder / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(NextStepError, match="cannot be read \\(truncated or corrupt\\?\\)"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=False)
    wide = VaeConfig.from_dict({**TINY, "z_channels": 8}, nextstep_1_1_defaults=False)
    folder = save_image_tokenizer(tmp_path / "w", wide, random_flux_state_dict(wide, seed=0))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(NextStepError, match=r"tensor .* has shape .*config.json \(ch, ch_mult, z_channels\) needs"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=False)
    flux = random_flux_state_dict(config, seed=0)
    flux.pop("decoder.conv_out.weight")
    folder = save_image_tokenizer(tmp_path / "m", config, flux)
    with pytest.raises(NextStepError, match=r"is missing 1 tensors the config needs \(decoder.conv_out.weight\)"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=False)
