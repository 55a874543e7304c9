"""engine.vae_files: saving and loading the image tokenizer's files, and refusing bad ones."""

import json

import pytest
import torch
from vae_helpers import (
    TINY,
    one_thread,  # noqa: F401 - autouse: one thread for these tiny networks
    pixels_like,
    tiny_config,
)

from nextstep_core.engine.vae import (
    ImageTokenizer,
    load_image_tokenizer,
    random_flux_state_dict,
)
from nextstep_core.engine.vae_files import (
    flux_keys_to_diffusers,
    save_image_tokenizer,
)
from nextstep_core.errors import NextStepError

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
