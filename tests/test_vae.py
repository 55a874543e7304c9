"""engine.vae: config, Flux <-> diffusers names, the Flux forward, latent maths."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bounds import assert_float64_agree, assert_layer_normalised, in_float64
from diffusers import AutoencoderKL
from PIL import Image
from vae_helpers import (
    diffusers_kwargs,
    one_thread,  # noqa: F401 - autouse: one thread for these tiny networks
    pixels_like,
    tiny_config,
    tiny_tokenizer,
)

from nextstep_core.checks import image_to_pixels
from nextstep_core.engine.vae import (
    ImageTokenizer,
    normalize_latent_positions,
    random_flux_state_dict,
)
from nextstep_core.engine.vae_files import (
    VaeConfig,
    diffusers_keys_to_flux,
    flux_keys_to_diffusers,
)
from nextstep_core.errors import NextStepError

# ----- config -----


def test_config_defaults_for_silent_fields():
    c11 = VaeConfig.from_dict({}, nextstep_1_1_defaults=True)
    assert (c11.scaling_factor, c11.shift_factor, c11.deterministic, c11.encoder_norm, c11.psz) == \
        (1.0, 0.0, True, True, 1)
    c10 = VaeConfig.from_dict({}, nextstep_1_1_defaults=False)
    assert (c10.scaling_factor, c10.shift_factor, c10.deterministic, c10.encoder_norm, c10.psz) == \
        (1.0, 0.0, False, False, None)
    assert (c10.ch, c10.ch_mult, c10.num_res_blocks, c10.z_channels, c10.downsample) == (128, [1, 2, 4, 4], 2, 16, 8)
    stated = VaeConfig.from_dict({"deterministic": False, "encoder_norm": True, "psz": 2, "scaling_factor": 2,
                                  "_class_name": "ignored", "psz_note": None}, nextstep_1_1_defaults=True)
    assert (stated.deterministic, stated.encoder_norm, stated.psz, stated.scaling_factor) == (False, True, 2, 2.0)
    assert VaeConfig.from_dict(stated.to_dict(), nextstep_1_1_defaults=False) == stated
    assert VaeConfig.from_dict({"ch_mult": [1, 2, 4]}, nextstep_1_1_defaults=True).downsample == 4


def test_norm_groups_are_fluxs_32_unless_the_channels_forbid_it():
    assert VaeConfig().norm_groups == 32
    assert tiny_config().norm_groups == 32
    small = tiny_config(ch=24, ch_mult=[1, 2, 2, 2])
    assert small.norm_groups == 24
    tokenizer = ImageTokenizer(small)
    assert tokenizer.encode(pixels_like(1, 3, 16, 16)).shape == (1, 16, 2, 2)


@pytest.mark.parametrize("field, value, expected", [
    ("ch_mult", [], "a non-empty list of positive integers"),
    ("ch_mult", [1, "2"], "a non-empty list of positive integers"),
    ("z_channels", 0, "a positive integer"),
    ("num_res_blocks", 1.5, "a positive integer"),
    ("deterministic", "yes", "true or false"),
    ("scaling_factor", 0, "non-zero"),
    ("shift_factor", "0.1", "a finite number"),
    ("psz", -1, "a non-negative integer"),
])
def test_bad_config_fields_are_named(field, value, expected):
    with pytest.raises(NextStepError, match=rf"my.json: field '{field}' must be {expected}"):
        VaeConfig.from_dict({field: value}, nextstep_1_1_defaults=True, source="my.json")


# ----- key names -----


def test_flux_names_convert_to_exactly_the_diffusers_names_and_back():
    config = tiny_config()
    flux = random_flux_state_dict(config, seed=0)
    for name in ("encoder.down.1.block.0.nin_shortcut.weight", "decoder.up.0.block.0.nin_shortcut.weight",
                 "decoder.up.0.block.1.conv2.bias", "decoder.up.3.upsample.conv.weight",
                 "encoder.down.2.downsample.conv.bias", "encoder.mid.block_2.norm1.weight",
                 "decoder.mid.attn_1.proj_out.bias", "encoder.norm_out.weight", "decoder.conv_in.weight"):
        assert name in flux
    assert "decoder.up.0.upsample.conv.weight" not in flux and "encoder.down.3.downsample.conv.weight" not in flux
    assert flux["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)

    converted = flux_keys_to_diffusers(flux)  # levels inferred from the decoder's up.{i}
    reference = AutoencoderKL(**diffusers_kwargs(config)).state_dict()
    assert sorted(converted) == sorted(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)
    # decoder levels are numbered in reverse; mid blocks from 0; attention convs become linear.
    assert torch.equal(converted["decoder.up_blocks.0.upsamplers.0.conv.weight"],
                       flux["decoder.up.3.upsample.conv.weight"])
    assert torch.equal(converted["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"],
                       flux["decoder.up.0.block.0.nin_shortcut.weight"])
    assert torch.equal(converted["encoder.mid_block.resnets.1.norm1.weight"], flux["encoder.mid.block_2.norm1.weight"])
    assert torch.equal(converted["decoder.mid_block.attentions.0.to_out.0.weight"],
                       flux["decoder.mid.attn_1.proj_out.weight"][:, :, 0, 0])
    assert torch.equal(converted["encoder.mid_block.attentions.0.group_norm.bias"],
                       flux["encoder.mid.attn_1.norm.bias"])
    assert torch.equal(converted["encoder.conv_norm_out.weight"], flux["encoder.norm_out.weight"])

    back = diffusers_keys_to_flux(converted)
    assert sorted(back) == sorted(flux)
    assert all(torch.equal(back[k], flux[k]) and back[k].shape == flux[k].shape for k in flux)
    # diffusers names (and unknown names) pass through the Flux -> diffusers conversion untouched.
    passed = flux_keys_to_diffusers({**converted, "extra.thing": torch.zeros(1)})
    assert sorted(passed) == sorted([*reference, "extra.thing"])


def test_random_flux_state_dict_is_seeded_and_leaves_the_global_rng_alone():
    config = tiny_config()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = random_flux_state_dict(config, 5), random_flux_state_dict(config, 5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = random_flux_state_dict(config, 6)
    assert not torch.equal(a["decoder.conv_out.weight"], c["decoder.conv_out.weight"])


# ----- the network equals a from-scratch Flux autoencoder on the Flux-named weights -----


def flux_group_norm(x, p, name, groups):
    return F.group_norm(x, groups, p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-6)


def flux_conv(x, p, name, **kw):
    return F.conv2d(x, p[f"{name}.weight"], p[f"{name}.bias"], **kw)


def flux_resnet(x, p, name, groups):
    h = flux_conv(F.silu(flux_group_norm(x, p, f"{name}.norm1", groups)), p, f"{name}.conv1", padding=1)
    h = flux_conv(F.silu(flux_group_norm(h, p, f"{name}.norm2", groups)), p, f"{name}.conv2", padding=1)
    shortcut = flux_conv(x, p, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in p else x
    return shortcut + h


def flux_attention(x, p, name, groups):
    b, c, h, w = x.shape
    normed = flux_group_norm(x, p, f"{name}.norm", groups)
    q, k, v = (flux_conv(normed, p, f"{name}.{n}").reshape(b, c, h * w) for n in "qkv")
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (b, hw, hw)
    out = (v @ weights.transpose(1, 2)).reshape(b, c, h, w)
    return x + flux_conv(out, p, f"{name}.proj_out")


def flux_middle(x, p, side, groups):
    x = flux_resnet(x, p, f"{side}.mid.block_1", groups)
    x = flux_attention(x, p, f"{side}.mid.attn_1", groups)
    return flux_resnet(x, p, f"{side}.mid.block_2", groups)


def flux_encoder(x, p, config):
    g, n = config.norm_groups, len(config.ch_mult)
    x = flux_conv(x, p, "encoder.conv_in", padding=1)
    for i in range(n):
        for j in range(config.num_res_blocks):
            x = flux_resnet(x, p, f"encoder.down.{i}.block.{j}", g)
        if i != n - 1:
            x = flux_conv(F.pad(x, (0, 1, 0, 1)), p, f"encoder.down.{i}.downsample.conv", stride=2)
    x = flux_middle(x, p, "encoder", g)
    return flux_conv(F.silu(flux_group_norm(x, p, "encoder.norm_out", g)), p, "encoder.conv_out", padding=1)


def flux_decoder(z, p, config):
    g, n = config.norm_groups, len(config.ch_mult)
    x = flux_middle(flux_conv(z, p, "decoder.conv_in", padding=1), p, "decoder", g)
    for i in reversed(range(n)):
        for j in range(config.num_res_blocks + 1):
            x = flux_resnet(x, p, f"decoder.up.{i}.block.{j}", g)
        if i != 0:
            x = flux_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), p, f"decoder.up.{i}.upsample.conv",
                          padding=1)
    return flux_conv(F.silu(flux_group_norm(x, p, "decoder.norm_out", g)), p, "decoder.conv_out", padding=1)


def test_tokenizer_computes_what_a_flux_autoencoder_computes_with_the_same_weights():
    """Both sides in float64: the tokenizer (diffusers layout) and the hand-written Flux forward
    compute the same formulas through different kernels and summation orders, so they agree to
    bounds.FLOAT64_AGREEMENT (1e-9 of the outputs' size; float64 rounding through this ~30-layer
    net is ~1e-14). A wrong group count, padding, shortcut or attention scale moves them by O(0.1)."""
    config = tiny_config()
    flux = {key: value.double() for key, value in random_flux_state_dict(config, seed=3).items()}
    tokenizer = ImageTokenizer(config)
    tokenizer.autoencoder.load_state_dict(flux_keys_to_diffusers(flux))
    tokenizer.double()
    pixels = pixels_like(1, 3, 16, 24).double()
    with torch.no_grad():
        mean, logvar = tokenizer.posterior(pixels)
        moments = flux_encoder(pixels, flux, config)
        assert_float64_agree(torch.cat([mean, logvar], 1), moments)
        z = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        assert_float64_agree(tokenizer.decode(z), flux_decoder(z, flux, config))


# ----- latent maths -----


def test_encoder_normalisation_per_position_and_per_patch():
    """Mean 0 and variance 1 per position (16 channels) or per 2x2 patch (64 numbers) within the
    float32 rounding of a layer norm of those numbers (bounds.layer_norm_statistics_bounds)."""
    mean = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1
    for psz in (None, 0, 1):
        assert_layer_normalised(normalize_latent_positions(mean, psz), mean, dim=1)
    per_patch = normalize_latent_positions(mean, 2)

    def patches_of(latent):
        return latent.reshape(2, 16, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 2, 3, 64)

    assert_layer_normalised(patches_of(per_patch), patches_of(mean), dim=-1)
    assert (per_patch.var(1, unbiased=False) - 1).abs().max() > 0.05  # single positions are not normalised
    assert (per_patch.mean(1)).abs().max() > 0.05
    half = normalize_latent_positions(mean.half(), 1)
    assert half.dtype == torch.float16
    with pytest.raises(NextStepError, match=r"latent grid 4x6 cannot be cut into 4x4 patches \(VAE config field 'psz'"):
        normalize_latent_positions(mean, 4)


def test_posterior_mean_is_normalised_when_encoder_norm():
    """The encoder's raw mean (the same pixels without encoder_norm) normalised per position:
    mean 0 and variance 1 within the float32 rounding of a layer norm of its 16 channels."""
    tokenizer = tiny_tokenizer(encoder_norm=True, psz=1)
    with torch.no_grad():
        mean, _ = tokenizer.posterior(pixels_like(2, 3, 16, 24))
    assert mean.shape == (2, 16, 2, 3)
    tokenizer.config.encoder_norm = False
    with torch.no_grad():
        raw, _ = tokenizer.posterior(pixels_like(2, 3, 16, 24))
    assert_layer_normalised(mean, raw, dim=1)
    assert (raw.var(1, unbiased=False) - 1).abs().max() > 0.05
    assert torch.equal(mean, normalize_latent_positions(raw, 1))  # the same layer norm of the same numbers


def test_encode_and_decode_apply_scale_shift_and_noise_as_specified():
    tokenizer = tiny_tokenizer(encoder_norm=True, psz=2, scaling_factor=1.5, shift_factor=0.25)
    pixels = pixels_like(1, 3, 32, 16)
    noise = torch.randn(1, 16, 4, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mean, logvar = tokenizer.posterior(pixels)
        sampled = tokenizer.encode(pixels, noise=noise)
        # bit for bit: the expected values are encode's own operations in its order on the same numbers
        assert torch.equal(sampled, (mean + torch.exp(logvar / 2) * noise - 0.25) * 1.5)
        assert torch.equal(tokenizer.encode(pixels), (mean - 0.25) * 1.5)  # no noise: the mean
        tokenizer.config.deterministic = True
        # noise accepted, ignored
        assert torch.equal(tokenizer.encode(pixels, noise=noise), (mean - 0.25) * 1.5)
        z = torch.randn(1, 16, 4, 2, generator=torch.Generator().manual_seed(3))
        # (z - 0.25) * 1.5 / 1.5 + 0.25 is z only up to rounding: in float64 that is ~1e-16, and the two decoders
        # agree to float64 rounding
        with in_float64(tokenizer.autoencoder):
            z64 = z.double()
            assert_float64_agree(tokenizer.decode((z64 - 0.25) * 1.5), tokenizer.autoencoder.decoder(z64))
        assert tokenizer.decode(sampled).shape == (1, 3, 32, 16)
    with pytest.raises(ValueError, match=r"posterior noise has shape \(1, 16, 2, 4\), expected \(1, 16, 4, 2\)"):
        tokenizer.encode(pixels, noise=torch.zeros(1, 16, 2, 4))


def test_logvar_is_clamped_to_minus_30_and_20():
    tokenizer = tiny_tokenizer()
    pixels = pixels_like(1, 3, 16, 16)
    with torch.no_grad():
        bias = tokenizer.autoencoder.encoder.conv_out.bias
        for value, bound in ((1000.0, 20.0), (-1000.0, -30.0)):
            bias[16:] = value
            mean, logvar = tokenizer.posterior(pixels)
            assert torch.all(logvar == bound)
            assert mean.abs().max() < 100  # only the log-variance half is clamped
        bias[16:] = 0.0
        _, logvar = tokenizer.posterior(pixels)
        assert -30 < logvar.min() and logvar.max() < 20


def test_pixel_and_image_conversions():
    pil = Image.fromarray(np.array([[[0, 255, 51], [102, 204, 153]]], dtype=np.uint8))  # 1 x 2 RGB
    pixels = image_to_pixels(pil)
    assert pixels.shape == (1, 3, 1, 2) and pixels.dtype == torch.float32
    expected = torch.tensor([[0, 102], [255, 204], [51, 153]], dtype=torch.float32)[None, :, None] / 127.5 - 1
    # bit for bit here and below: the same float32 operations in the same order on the same numbers
    assert torch.equal(pixels, expected.reshape(1, 3, 1, 2))
    images = torch.rand(2, 8, 16, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image_to_pixels(images), images.permute(0, 3, 1, 2) * 2 - 1)
    assert torch.equal(ImageTokenizer.image_to_pixels(images), image_to_pixels(images))

    tokenizer = tiny_tokenizer()
    latent = torch.randn(2, 16, 1, 2, generator=torch.Generator().manual_seed(1)) * 5
    with torch.no_grad():
        image = tokenizer.latent_to_image(latent)
        pixels = tokenizer.decode(latent)
    assert image.shape == (2, 8, 16, 3) and image.min() >= 0 and image.max() <= 1
    assert torch.equal(image, ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))


def test_encode_refuses_sizes_that_are_not_multiples_of_8():
    tokenizer = tiny_tokenizer()
    with pytest.raises(NextStepError, match=r"image size 20x16 \(width x height\) is not a multiple of 8"):
        tokenizer.encode(pixels_like(1, 3, 16, 20))
    with pytest.raises(NextStepError, match=r"takes pixels shaped \(batch, 3, height, width\), got \(3, 16, 16\)"):
        tokenizer.encode(pixels_like(3, 16, 16))
