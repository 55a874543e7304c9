"""engine.vae and engine.vae_files: config, Flux <-> diffusers names, the Flux forward, latent maths, files."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from nextstep_core.engine.vae import (
    ImageTokenizer,
    image_to_pixels,
    load_image_tokenizer,
    normalize_latent_positions,
    pil_to_pixels,
    random_flux_state_dict,
)
from nextstep_core.engine.vae_files import (
    VaeConfig,
    diffusers_keys_to_flux,
    flux_keys_to_diffusers,
    save_image_tokenizer,
)
from nextstep_core.errors import NextStepError

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
    config = tiny_config()
    flux = random_flux_state_dict(config, seed=3)
    tokenizer = ImageTokenizer(config)
    tokenizer.autoencoder.load_state_dict(flux_keys_to_diffusers(flux))
    pixels = pixels_like(1, 3, 16, 24)
    with torch.no_grad():
        mean, logvar = tokenizer.posterior(pixels)
        moments = flux_encoder(pixels, flux, config)
        torch.testing.assert_close(torch.cat([mean, logvar], 1), moments, atol=1e-4, rtol=1e-4)
        z = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(tokenizer.decode(z), flux_decoder(z, flux, config), atol=1e-4, rtol=1e-4)


# ----- latent maths -----


def test_encoder_normalisation_per_position_and_per_patch():
    mean = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1
    for psz in (None, 0, 1):
        normed = normalize_latent_positions(mean, psz)
        torch.testing.assert_close(normed.mean(1), torch.zeros(2, 4, 6), atol=1e-5, rtol=0)
        torch.testing.assert_close(normed.var(1, unbiased=False), torch.ones(2, 4, 6), atol=1e-4, rtol=0)
    per_patch = normalize_latent_positions(mean, 2)
    patches = per_patch.reshape(2, 16, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 2, 3, 64)
    torch.testing.assert_close(patches.mean(-1), torch.zeros(2, 2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(patches.var(-1, unbiased=False), torch.ones(2, 2, 3), atol=1e-4, rtol=0)
    assert (per_patch.var(1, unbiased=False) - 1).abs().max() > 0.05  # single positions are not normalised
    assert (per_patch.mean(1)).abs().max() > 0.05
    half = normalize_latent_positions(mean.half(), 1)
    assert half.dtype == torch.float16
    with pytest.raises(NextStepError, match=r"latent grid 4x6 cannot be cut into 4x4 patches \(VAE config field 'psz'"):
        normalize_latent_positions(mean, 4)


def test_posterior_mean_is_normalised_when_encoder_norm():
    tokenizer = tiny_tokenizer(encoder_norm=True, psz=1)
    with torch.no_grad():
        mean, _ = tokenizer.posterior(pixels_like(2, 3, 16, 24))
    assert mean.shape == (2, 16, 2, 3)
    torch.testing.assert_close(mean.mean(1), torch.zeros(2, 2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(mean.var(1, unbiased=False), torch.ones(2, 2, 3), atol=1e-4, rtol=0)
    tokenizer.config.encoder_norm = False
    with torch.no_grad():
        raw, _ = tokenizer.posterior(pixels_like(2, 3, 16, 24))
    assert (raw.var(1, unbiased=False) - 1).abs().max() > 0.05
    torch.testing.assert_close(mean, normalize_latent_positions(raw, 1))


def test_encode_and_decode_apply_scale_shift_and_noise_as_specified():
    tokenizer = tiny_tokenizer(encoder_norm=True, psz=2, scaling_factor=1.5, shift_factor=0.25)
    pixels = pixels_like(1, 3, 32, 16)
    noise = torch.randn(1, 16, 4, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mean, logvar = tokenizer.posterior(pixels)
        sampled = tokenizer.encode(pixels, noise=noise)
        torch.testing.assert_close(sampled, (mean + torch.exp(logvar / 2) * noise - 0.25) * 1.5)
        torch.testing.assert_close(tokenizer.encode(pixels), (mean - 0.25) * 1.5)  # no noise: the mean
        tokenizer.config.deterministic = True
        # noise accepted, ignored
        torch.testing.assert_close(tokenizer.encode(pixels, noise=noise), (mean - 0.25) * 1.5)
        z = torch.randn(1, 16, 4, 2, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(tokenizer.decode((z - 0.25) * 1.5), tokenizer.autoencoder.decoder(z))
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
    pixels = pil_to_pixels(pil)
    assert pixels.shape == (1, 3, 1, 2) and pixels.dtype == torch.float32
    expected = torch.tensor([[0, 102], [255, 204], [51, 153]], dtype=torch.float32)[None, :, None] / 127.5 - 1
    torch.testing.assert_close(pixels, expected.reshape(1, 3, 1, 2))
    images = torch.rand(2, 8, 16, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(image_to_pixels(images), images.permute(0, 3, 1, 2) * 2 - 1)
    torch.testing.assert_close(ImageTokenizer.image_to_pixels(images), image_to_pixels(images))

    tokenizer = tiny_tokenizer()
    latent = torch.randn(2, 16, 1, 2, generator=torch.Generator().manual_seed(1)) * 5
    with torch.no_grad():
        image = tokenizer.latent_to_image(latent)
        pixels = tokenizer.decode(latent)
    assert image.shape == (2, 8, 16, 3) and image.min() >= 0 and image.max() <= 1
    torch.testing.assert_close(image, ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))


def test_encode_refuses_sizes_that_are_not_multiples_of_8():
    tokenizer = tiny_tokenizer()
    with pytest.raises(NextStepError, match=r"image size 20x16 \(width x height\) is not a multiple of 8"):
        tokenizer.encode(pixels_like(1, 3, 16, 20))
    with pytest.raises(NextStepError, match=r"takes pixels shaped \(batch, 3, height, width\), got \(3, 16, 16\)"):
        tokenizer.encode(pixels_like(3, 16, 16))


# ----- files -----


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_save_then_load_gives_the_same_tokenizer(tmp_path, fmt):
    config = tiny_config(scaling_factor=0.5, shift_factor=0.1, encoder_norm=True, psz=2)
    flux = random_flux_state_dict(config, seed=1)
    folder = save_image_tokenizer(tmp_path / "vae", config, flux, fmt=fmt)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", f"checkpoint.{fmt}"])
    assert json.loads((folder / "config.json").read_text()) == config.to_dict()
    loaded = load_image_tokenizer(folder, nextstep_1_1_defaults=True)
    assert loaded.config == config and not loaded.training
    direct = ImageTokenizer(config)
    direct.autoencoder.load_state_dict(flux_keys_to_diffusers(flux))
    direct.eval()  # (training mode picks another CPU attention kernel: same maths, different rounding)
    pixels = pixels_like(2, 3, 48, 80)
    with torch.no_grad():
        latent = loaded.encode(pixels)
        assert latent.shape == (2, 16, 6, 10)
        assert torch.equal(latent, direct.encode(pixels))
        decoded = loaded.decode(latent)
        assert decoded.shape == (2, 3, 48, 80)
        assert torch.equal(decoded, direct.decode(latent))


def test_saving_the_other_format_replaces_the_old_checkpoint(tmp_path):
    config = tiny_config()
    save_image_tokenizer(tmp_path, config, random_flux_state_dict(config, 0), fmt="pt")
    save_image_tokenizer(tmp_path, config, random_flux_state_dict(config, 1), fmt="safetensors")
    assert not (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(NextStepError, match="VAE checkpoint format 'ckpt' is not one of pt, safetensors"):
        save_image_tokenizer(tmp_path, config, {}, fmt="ckpt")


def test_load_accepts_diffusers_names_a_state_dict_wrapper_a_prefix_and_a_dtype(tmp_path):
    config = tiny_config()
    flux = random_flux_state_dict(config, seed=4)
    reference = load_image_tokenizer(save_image_tokenizer(tmp_path / "flux", config, flux), nextstep_1_1_defaults=False)
    diffusers_named = {f"vae.{k}": v for k, v in flux_keys_to_diffusers(flux).items()}
    folder = save_image_tokenizer(tmp_path / "diffusers", config, {})
    torch.save({"state_dict": diffusers_named, "step": 7}, folder / "checkpoint.pt")
    loaded = load_image_tokenizer(folder, nextstep_1_1_defaults=False, dtype=torch.bfloat16)
    assert loaded.autoencoder.dtype == torch.bfloat16
    for name, tensor in reference.autoencoder.state_dict().items():
        assert torch.equal(loaded.autoencoder.state_dict()[name], tensor.bfloat16()), name
    with torch.no_grad():
        assert loaded.encode(pixels_like(1, 3, 16, 16)).dtype == torch.bfloat16


def test_folder_config_and_weights_errors(tmp_path):
    with pytest.raises(NextStepError, match=r"image tokenizer \(VAE\) folder .*nowhere does not exist"):
        load_image_tokenizer(tmp_path / "nowhere", nextstep_1_1_defaults=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NextStepError, match=r"folder .*file is a file, not a folder"):
        load_image_tokenizer(tmp_path / "file", nextstep_1_1_defaults=True)
    folder = tmp_path / "vae"
    folder.mkdir()
    with pytest.raises(NextStepError, match=r"folder .*vae has no config.json"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)
    (folder / "config.json").write_text('{"ch": 32,')
    with pytest.raises(NextStepError, match=r"VAE config .*vae/config.json is not valid JSON"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(NextStepError, match=r"VAE config .*config.json must be a JSON object"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)
    (folder / "config.json").write_text(json.dumps({**TINY, "z_channels": "16"}))
    with pytest.raises(NextStepError, match=r"VAE config .*config.json: field 'z_channels' must be a positive integer"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)
    (folder / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(NextStepError, match=r"folder .*vae has no checkpoint.pt or .safetensors weights"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)
    (folder / "a.safetensors").write_bytes(b"")
    (folder / "b.safetensors").write_bytes(b"")
    with pytest.raises(NextStepError, match=r"has several weights files \(a.safetensors, b.safetensors\)"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)


class PlantedCode:
    """Unpickling this object creates `marker`: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.__class__.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path):
    config = tiny_config()
    folder = save_image_tokenizer(tmp_path / "evil", config, {})
    marker = tmp_path / "code-ran"
    weights = random_flux_state_dict(config, 0)
    torch.save({**weights, "encoder.conv_in.weight": PlantedCode(marker)}, folder / "checkpoint.pt")
    with pytest.raises(NextStepError, match=r"VAE checkpoint .*evil/checkpoint.pt is not a plain tensor state dict "
                                            r"and was refused: .*weights_only=True"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)
    assert not marker.exists()
    # The planted object is live: plain unpickling (which the loader never does) runs it.
    torch.load(folder / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_truncated_and_corrupt_checkpoints_are_named(tmp_path):
    config = tiny_config()
    for fmt in ("pt", "safetensors"):
        folder = save_image_tokenizer(tmp_path / fmt, config, random_flux_state_dict(config, 0), fmt=fmt)
        path = folder / f"checkpoint.{fmt}"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(NextStepError, match=rf"VAE checkpoint .*{fmt}/checkpoint.{fmt} cannot be read "
                                                r"\(truncated or corrupt\?\)"):
            load_image_tokenizer(folder, nextstep_1_1_defaults=True)
    (tmp_path / "pt" / "checkpoint.pt").write_bytes(b"not a checkpoint at all" * 4)
    with pytest.raises(NextStepError, match=r"checkpoint.pt cannot be read \(truncated or corrupt\?\)"):
        load_image_tokenizer(tmp_path / "pt", nextstep_1_1_defaults=True)
    torch.save({"weights": [1, 2, 3]}, tmp_path / "pt" / "checkpoint.pt")
    with pytest.raises(NextStepError, match=r"checkpoint.pt does not hold a plain dict of tensors"):
        load_image_tokenizer(tmp_path / "pt", nextstep_1_1_defaults=True)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    config = tiny_config()
    eight = tiny_config(z_channels=8)
    folder = save_image_tokenizer(tmp_path / "z8", eight, random_flux_state_dict(eight, 0))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(NextStepError,
                       match=r"the weights make 8-channel latents but config.json field z_channels is 16"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)

    flux = random_flux_state_dict(config, 0)
    for name in ("decoder.conv_out.weight", "decoder.up.0.block.1.norm2.bias", "encoder.mid.attn_1.q.weight"):
        flux.pop(name)
    folder = save_image_tokenizer(tmp_path / "missing", config, flux)
    with pytest.raises(NextStepError, match=r"is missing 3 tensors the config needs \(decoder.conv_out.weight, "
                                            r"decoder.up.0.block.1.norm2.bias, encoder.mid.attn_1.q.weight\); "
                                            r"is this a Flux-style f8ch16 tokenizer"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)

    deeper = tiny_config(num_res_blocks=2)
    folder = save_image_tokenizer(tmp_path / "deeper", deeper, random_flux_state_dict(deeper, 0))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(NextStepError, match=r"has 64 tensors the config does not describe \(decoder.up.0.block.2"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)

    wider = tiny_config(ch=64)
    folder = save_image_tokenizer(tmp_path / "wider", wider, random_flux_state_dict(wider, 0))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(NextStepError, match=r"tensor decoder.conv_in.bias has shape \(128,\), config.json "
                                            r"\(ch, ch_mult, z_channels\) needs \(64,\)"):
        load_image_tokenizer(folder, nextstep_1_1_defaults=True)
