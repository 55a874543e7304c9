"""Find and check the files of a NextStep model folder, read its config, tell 1.0 from 1.1.

A model folder as published on the hub holds `config.json`, safetensors weights (one file, or
shards with `model.safetensors.index.json`) and the tokenizer files. NextStep-1.1 also carries
its image tokenizer in `vae/`; NextStep-1.0 takes the tokenizer folder
(`NextStep-1-f8ch16-Tokenizer`) separately.

Nothing here loads tensors: it reads JSON and safetensors headers, so every problem a user can
fix is reported before any heavy work starts.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import NextStepError

WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VAE_WEIGHT_NAMES = ("checkpoint.pt", "checkpoint.safetensors", "diffusion_pytorch_model.safetensors")


@dataclass(frozen=True)
class VersionSettings:
    """What differs between NextStep-1.0 and NextStep-1.1, kept as data.

    Attributes:
        name: "1.0" or "1.1".
        sampler: the authors' default token sampler ("euler_maruyama" for 1.0, "sde" for 1.1).
        steps, shift, cfg, use_norm: the authors' text-to-image defaults.
        edit_steps, edit_shift, edit_cfg_img: the authors' editing defaults.
        prepend_bos: 1.1 prepends the tokenizer's BOS string to every caption.
        rising_linear_schedule: 1.1's `linear` cfg schedule rises; 1.0's falls.
        shared_noise_across_prompts: 1.0 draws one (images_per_prompt, 64) noise block and
            repeats it for every prompt; 1.1 draws one row per image.
        noise_in_float32: 1.0 samples tokens in float32; 1.1 in the condition's dtype.
        posterior_draw_on_seeded_stream: 1.0 draws the VAE posterior noise from the seeded
            stream before the tokens; 1.1 encodes before seeding.
    """

    name: str
    sampler: str
    steps: int
    shift: float
    cfg: float
    use_norm: bool
    edit_steps: int
    edit_shift: float
    edit_cfg_img: float
    prepend_bos: bool
    rising_linear_schedule: bool
    shared_noise_across_prompts: bool
    noise_in_float32: bool
    posterior_draw_on_seeded_stream: bool


NEXTSTEP_1_0 = VersionSettings(
    name="1.0", sampler="euler_maruyama", steps=50, shift=1.0, cfg=7.5, use_norm=True,
    edit_steps=50, edit_shift=3.2, edit_cfg_img=2.0, prepend_bos=False,
    rising_linear_schedule=False, shared_noise_across_prompts=True, noise_in_float32=True,
    posterior_draw_on_seeded_stream=True,
)
NEXTSTEP_1_1 = VersionSettings(
    name="1.1", sampler="sde", steps=28, shift=1.0, cfg=7.5, use_norm=False,
    edit_steps=28, edit_shift=3.2, edit_cfg_img=2.0, prepend_bos=True,
    rising_linear_schedule=True, shared_noise_across_prompts=False, noise_in_float32=False,
    posterior_draw_on_seeded_stream=False,
)
VERSIONS = {"1.0": NEXTSTEP_1_0, "1.1": NEXTSTEP_1_1}


@dataclass
class NextStepConfig:
    """The fields of a NextStep `config.json` that the engine uses.

    Decoder fields build a transformers `Qwen2Config`; the rest describe image tokens.
    `raw` keeps the whole file for anything else (training-only keys, `genloss_*`).
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    attention_bias: bool = True
    o_attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    latent_channels: int = 16
    latent_patch_size: int = 2
    use_gen_pos_embed: bool = False
    boi: int | None = None
    eoi: int | None = None
    image_placeholder_id: int | None = None
    vae_name_or_path: str | None = None
    model_type: str = "nextstep"
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def token_dim(self) -> int:
        """Numbers in one image token: channels x patch x patch (16 * 2 * 2 = 64)."""
        return self.latent_channels * self.latent_patch_size**2

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config.json") -> NextStepConfig:
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
        missing = [k for k in required if k not in raw]
        if missing:
            raise NextStepError(f"{source} lacks the decoder fields {', '.join(missing)}; "
                                "is this a NextStep model folder?")
        known = {f for f in cls.__dataclass_fields__ if f != "raw"}
        values = {k: raw[k] for k in known if k in raw and raw[k] is not None}
        values.setdefault("num_key_value_heads", raw["num_attention_heads"])
        if "o_attention_bias" not in raw:
            # The contract: when absent it equals attention_bias. Qwen2.5 checkpoints set
            # attention_bias only for q/k/v, so an absent key with no o_proj tensor is fine too.
            values["o_attention_bias"] = False
        return cls(**values, raw=raw)


@dataclass
class ModelFiles:
    """Where the pieces of a model folder are, and which version it is."""

    folder: Path
    config: NextStepConfig
    weight_files: list[Path]
    tensor_shapes: dict[str, tuple[int, ...]]  # every tensor name in the weights -> shape
    tensor_file: dict[str, Path]  # every tensor name -> the file holding it
    tokenizer_folder: Path
    vae_folder: Path | None
    version: VersionSettings
    version_reasons: list[str]


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NextStepError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header, checking the file is complete.

    A truncated download is the most common broken checkpoint; safetensors only notices it
    when a tensor is read, so the sizes are checked here, up front.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise NextStepError(f"weights file {path} is truncated or empty ({size} bytes)")
        header_len = struct.unpack("<Q", head)[0]
        opens_json = f.read(1) == b"{"  # a safetensors header is a JSON object of at most 100 MB
        if not opens_json or header_len > 100 << 20:
            raise NextStepError(f"weights file {path} is not a safetensors file (no safetensors header at its "
                                "start): download it again")
        if header_len > size - 8:
            raise NextStepError(f"weights file {path} is truncated: its header alone needs {header_len} bytes")
        f.seek(8)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise NextStepError(f"weights file {path} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise NextStepError(
            f"weights file {path} is truncated: it has {size} bytes, its header promises {8 + header_len + data_end}; "
            "download it again"
        )
    return {name: tuple(info["shape"]) for name, info in header.items()}


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: those named by the shard index, else the lone file(s)."""
    index_path = folder / WEIGHTS_INDEX
    if index_path.is_file():
        index = read_json(index_path, "shard index")
        if "weight_map" not in index:
            raise NextStepError(f"shard index {index_path} has no weight_map")
        names = sorted(set(index["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise NextStepError(
                f"shard index {index_path} names {len(missing)} file(s) missing from {folder}: {', '.join(missing[:3])}"
            )
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise NextStepError(f"folder {folder} has no weights (*.safetensors or {WEIGHTS_INDEX})")
    return files


def detect_version(folder: Path, config: dict, tensor_names: set[str]) -> tuple[VersionSettings, list[str]]:
    """Guess 1.0 or 1.1 from the signals in the files; returns the settings and the reasons."""
    votes_11, votes_10 = [], []
    if (folder / "vae").is_dir():
        votes_11.append("a vae/ folder inside the model folder")
    if any(k.startswith("genloss_") for k in config) or "base_image_grid_size" in config:
        votes_11.append("genloss_*/base_image_grid_size keys in config.json")
    if config.get("model_type") == "stepx_llama":
        votes_11.append('model_type "stepx_llama"')
    if "gen_pos_embed" in tensor_names:
        votes_10.append("a gen_pos_embed tensor in the weights")
    if "use_gen_pos_embed" in config:
        votes_10.append("a use_gen_pos_embed key in config.json")
    if config.get("model_type") == "nextstep":
        votes_10.append('model_type "nextstep"')
    if len(votes_11) > len(votes_10) or (votes_11 and (folder / "vae").is_dir()):
        return NEXTSTEP_1_1, votes_11
    return NEXTSTEP_1_0, votes_10 or ["no 1.1 signal found"]


SAMPLING_DEFAULT_KEYS = ("sampler", "steps", "shift", "cfg", "use_norm", "edit_steps", "edit_shift", "edit_cfg_img")


def apply_sampling_defaults(settings: VersionSettings, reasons: list[str], raw: dict, source: Path):
    """A model may recommend its own sampling defaults in config.json under `sampling_defaults`
    (our extension; the released checkpoints have none and keep their version's defaults)."""
    wanted = raw.get("sampling_defaults")
    if not wanted:
        return settings, reasons
    unknown = sorted(set(wanted) - set(SAMPLING_DEFAULT_KEYS))
    if unknown:
        raise NextStepError(f"{source}: sampling_defaults has unknown keys {', '.join(unknown)}")
    return replace(settings, **wanted), reasons + [f"sampling defaults from config.json: {wanted}"]


def resolve_vae_folder(folder: Path, config: NextStepConfig, vae_folder: str | Path | None) -> Path | None:
    """The image tokenizer folder: given explicitly, `vae/` inside the model, or a sibling named in the config."""
    if vae_folder is not None:
        return Path(vae_folder)
    if (folder / "vae").is_dir():
        return folder / "vae"
    if config.vae_name_or_path:
        sibling = folder.parent / Path(config.vae_name_or_path).name
        if sibling.is_dir():
            return sibling
    return None


def check_vae_folder(vae_folder: Path) -> None:
    if not vae_folder.is_dir():
        raise NextStepError(f"image tokenizer (VAE) folder {vae_folder} does not exist")
    if not (vae_folder / "config.json").is_file():
        raise NextStepError(f"image tokenizer (VAE) folder {vae_folder} has no config.json")
    if not any((vae_folder / n).is_file() for n in VAE_WEIGHT_NAMES) and not list(vae_folder.glob("*.safetensors")):
        raise NextStepError(f"image tokenizer (VAE) folder {vae_folder} has no checkpoint.pt or .safetensors weights")


def inspect_model_folder(
    folder: str | Path, *, vae_folder: str | Path | None = None, version: str = "auto", need_vae: bool = True
) -> ModelFiles:
    """Check a model folder and describe its files without loading any tensor.

    Args:
        folder: the model folder (config.json, safetensors, tokenizer files).
        vae_folder: the image tokenizer folder; default `vae/` inside the model (1.1), or a
            sibling folder named after the config's `vae_name_or_path` (1.0).
        version: "auto" (detect), "1.0" or "1.1".
        need_vae: raise when no image tokenizer folder can be found.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise NextStepError(f"model folder {folder} does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise NextStepError(f"model folder {folder} has no config.json")
    raw = read_json(config_path, "model config")
    config = NextStepConfig.from_dict(raw, source=str(config_path))

    weight_files = find_weight_files(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    owner: dict[str, Path] = {}
    for path in weight_files:
        for name, shape in read_safetensors_header(path).items():
            shapes[name] = shape
            owner[name] = path

    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise NextStepError(f"model folder {folder} has no tokenizer (tokenizer.json / tokenizer_config.json)")

    if version == "auto":
        settings, reasons = detect_version(folder, raw, set(shapes))
    elif version in VERSIONS:
        settings, reasons = VERSIONS[version], [f"version {version} chosen by the user"]
    else:
        raise NextStepError(f"version {version!r} is not one of auto, 1.0, 1.1")

    settings, reasons = apply_sampling_defaults(settings, reasons, raw, config_path)
    vae = resolve_vae_folder(folder, config, vae_folder)
    if vae is None and need_vae:
        hint = f" (config names {config.vae_name_or_path})" if config.vae_name_or_path else ""
        raise NextStepError(
            f"model folder {folder} has no vae/ folder; pass the image tokenizer folder "
            f"(NextStep-1-f8ch16-Tokenizer) as the VAE folder{hint}"
        )
    if vae is not None:
        check_vae_folder(vae)
    return ModelFiles(folder, config, weight_files, shapes, owner, folder, vae, settings, reasons)

def save_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Write tensors as `model-0000i-of-0000n.safetensors` + index (or one model.safetensors)."""
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per_shard:(i + 1) * per_shard]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_converted(model: torch.nn.Module, folder, *, shard_bytes: int = 4 << 30) -> None:
    """Write a loaded model's weights (fp8 ones as F8_E4M3 + `.weight_scale`) as safetensors shards
    under their released names, with an index. Copy config.json, the tokenizer files and vae/ beside
    them to make a model folder `from_folder` loads as it is (no conversion on load). It holds what was
    loaded: a model loaded for generation has no lm_head (load with load_lm_head=True to keep it)."""
    tensors = {}
    for name, t in model.state_dict().items():
        if "rotary_emb" in name or name in tensors:
            continue
        tensors[name.removeprefix("backbone.")] = t.detach().to("cpu").contiguous()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    save_sharded(folder, tensors, max(1, -(-total // shard_bytes)))
