"""Loading tiny checkpoints in both released layouts through the public loader, and its errors."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import nextstep_core.engine.precision as precision
from nextstep_core.demo.tiny import VAE_FOLDER_1_0, TinySpec, write_tiny_model
from nextstep_core.engine.checkpoint import inspect_model_folder
from nextstep_core.engine.model import load_model
from nextstep_core.errors import NextStepError
from nextstep_core.pipeline import NextStepPipeline


def checkpoint_tensors(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


@pytest.mark.parametrize("fixture", ["tiny_model_1_0", "tiny_model_1_1"])
def test_every_tensor_lands_and_none_is_missing(fixture, request):
    folder = request.getfixturevalue(fixture)
    files = inspect_model_folder(folder)
    assert len(files.weight_files) == 2  # sharded, with an index
    assert (folder / "model.safetensors.index.json").is_file()
    model = load_model(files, lm_head=True)
    state = {n.removeprefix("backbone."): t for n, t in model.state_dict().items() if "rotary_emb" not in n}
    on_disk = checkpoint_tensors(folder)
    assert set(state) == set(on_disk)
    for_generation = load_model(files)  # without the text head, which generation never reads
    assert for_generation.lm_head is None and set(for_generation.state_dict()) == set(model.state_dict()) - {
        "lm_head.weight"}
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())


def test_layouts_and_version_detection(tiny_model_1_0, tiny_model_1_1):
    files_10 = inspect_model_folder(tiny_model_1_0)
    assert files_10.version.name == "1.0"
    assert files_10.vae_folder.name == VAE_FOLDER_1_0  # found beside the model, as the config names it
    assert "a gen_pos_embed tensor in the weights" in files_10.version_reasons
    files_11 = inspect_model_folder(tiny_model_1_1)
    assert files_11.version.name == "1.1"
    assert files_11.vae_folder == tiny_model_1_1 / "vae"
    assert "a vae/ folder inside the model folder" in files_11.version_reasons
    assert inspect_model_folder(tiny_model_1_1, version="1.0").version.name == "1.0"
    with pytest.raises(NextStepError, match="version '2.0' is not one of auto, 1.0, 1.1"):
        inspect_model_folder(tiny_model_1_1, version="2.0")


def test_single_file_checkpoint_and_bf16(tmp_path):
    folder = write_tiny_model(tmp_path, version="1.1", spec=TinySpec(shards=1))
    assert (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").exists()
    pipe = NextStepPipeline.from_folder(folder, precision="bfloat16")
    compute = torch.bfloat16 if precision.native_bf16_cpu() else torch.float32  # precision.for_device
    assert pipe.model.image_head.net.input_proj.weight.dtype == compute
    result = pipe.generate("a red circle", width=32, height=32, steps=2)
    assert result.images.shape == (1, 32, 32, 3)
    assert torch.isfinite(result.images).all()


@pytest.fixture
def model_copy(tiny_model_1_1, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_model_1_1, target)
    return target


def test_missing_folder_config_weights_tokenizer(model_copy, tmp_path):
    with pytest.raises(NextStepError, match="model folder .*nowhere does not exist"):
        inspect_model_folder(tmp_path / "nowhere")
    (model_copy / "config.json").rename(model_copy / "config.json.bak")
    with pytest.raises(NextStepError, match="has no config.json"):
        inspect_model_folder(model_copy)
    (model_copy / "config.json.bak").rename(model_copy / "config.json")
    for f in model_copy.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(NextStepError, match=r"has no weights \(\*.safetensors"):
        inspect_model_folder(model_copy)


def test_missing_tokenizer_files(model_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink()
    with pytest.raises(NextStepError, match=r"has no tokenizer \(tokenizer.json / tokenizer_config.json\)"):
        inspect_model_folder(model_copy)


def test_missing_vae(model_copy, tiny_model_1_0, tmp_path):
    shutil.rmtree(model_copy / "vae")
    with pytest.raises(NextStepError, match="has no vae/ folder; pass the image tokenizer folder"):
        inspect_model_folder(model_copy, version="1.1")
    lone = tmp_path / "lone"
    shutil.copytree(tiny_model_1_0, lone / "m")
    with pytest.raises(NextStepError, match="config names stepfun-ai/NextStep-1-f8ch16-Tokenizer"):
        inspect_model_folder(lone / "m")
    with pytest.raises(NextStepError, match="image tokenizer \\(VAE\\) folder .*missing does not exist"):
        inspect_model_folder(lone / "m", vae_folder=tmp_path / "missing")


def test_shard_index_naming_a_missing_file(model_copy):
    shard = sorted(model_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(NextStepError, match=f"names 1 file\\(s\\) missing from .*: {shard.name}"):
        inspect_model_folder(model_copy)


def test_truncated_safetensors(model_copy):
    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(NextStepError, match=f"weights file .*{shard.name} is truncated.*download it again"):
        inspect_model_folder(model_copy)
    shard.write_bytes(data[:5])
    with pytest.raises(NextStepError, match="is truncated or empty"):
        inspect_model_folder(model_copy)


def test_config_not_matching_weights(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["intermediate_size"] = 96
    (model_copy / "config.json").write_text(json.dumps(config))
    expected = (r"tensor layers\.0\.mlp\.\w+_proj\.weight in model-0000\d-of-00002\.safetensors "
                r"has shape \((128, 64|64, 128)\), the config needs \((96, 64|64, 96)\)")
    with pytest.raises(NextStepError, match=expected):
        NextStepPipeline.from_folder(model_copy)


def test_extra_and_missing_tensors_are_named(model_copy):
    from safetensors.torch import save_file

    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    tensors = checkpoint_tensors_of(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["surprise.weight"] = torch.zeros(2)
    save_file(tensors, str(shard))
    index = json.loads((model_copy / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(dropped)
    index["weight_map"]["surprise.weight"] = shard.name
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(NextStepError) as info:
        NextStepPipeline.from_folder(model_copy)
    message = str(info.value)
    assert f"1 tensor(s) the config needs are missing from the weights (backbone.{dropped}" in message or \
        f"missing from the weights ({dropped}" in message
    assert "1 tensor(s) in the weights match nothing in the model (surprise.weight)" in message


def checkpoint_tensors_of(path):
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_vae_with_wrong_latent_channels(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["latent_channels"] = 8
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(NextStepError, match="makes 16-channel latents but the model expects latent_channels 8"):
        NextStepPipeline.from_folder(model_copy)


def test_bad_dtype(tiny_model_1_1):
    with pytest.raises(NextStepError, match="precision 'float64' is not one of auto, bf16, fp16, fp32, fp8_e4m3fn"):
        NextStepPipeline.from_folder(tiny_model_1_1, precision="float64")


def test_config_sampling_defaults_override_the_version_defaults(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["sampling_defaults"] = {"cfg": 3.0, "steps": 12}
    (model_copy / "config.json").write_text(json.dumps(config))
    files = inspect_model_folder(model_copy)
    version = files.version
    assert (version.name, version.cfg, version.steps, version.sampler) == ("1.1", 3.0, 12, "sde")
    config["sampling_defaults"] = {"cfgg": 3.0}
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(NextStepError, match="sampling_defaults has unknown keys cfgg"):
        inspect_model_folder(model_copy)


def test_vae_with_a_different_patch_normalisation(model_copy):
    vae_config = json.loads((model_copy / "vae" / "config.json").read_text())
    vae_config["psz"] = 4
    (model_copy / "vae" / "config.json").write_text(json.dumps(vae_config))
    with pytest.raises(NextStepError, match="normalises 4x4 patches but the model's tokens are 2x2 patches"):
        NextStepPipeline.from_folder(model_copy)


def test_a_transformers_whose_decoder_takes_no_cache_argument_is_refused(tiny_model_1_1, monkeypatch):
    """Before transformers 5.24 the Qwen2 decoder took `past_key_values=`; our `cache=` would land
    in its **kwargs unused and every step would run without its KV cache."""
    from nextstep_core.engine import model as model_module

    def forward_before_5_24(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                            inputs_embeds=None, use_cache=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(model_module.Qwen2Model, "forward", forward_before_5_24)
    with pytest.raises(NextStepError, match=r"^transformers \S+ is installed, and its Qwen2 decoder does not take "
                                            r"the KV cache as `cache=`: NextStep needs transformers 5\.24 or newer "
                                            r"\(pip install -U 'transformers>=5\.24,<6'\)$"):
        NextStepPipeline.from_folder(tiny_model_1_1)
