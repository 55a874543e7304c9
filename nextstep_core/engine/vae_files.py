"""The image tokenizer's files: its config.json, its weights files, and the two key namings.

On disk (`NextStep-1-f8ch16-Tokenizer/`, or `vae/` inside a 1.1 model folder) a tokenizer is
`config.json` with the original Flux fields (`ch`, `ch_mult`, `num_res_blocks`, `z_channels`,
`scaling_factor`, `shift_factor`, `deterministic`, `encoder_norm`, `psz`, ...) plus one weights
file: `checkpoint.pt`, a plain dict of tensors in the original Flux key names
(`encoder.down.0.block.1.norm1.weight`, ...), or a `.safetensors` file. `.pt` files are only ever
read with `torch.load(weights_only=True)`: a file that would need to run code is refused.
Checkpoints already in diffusers naming are accepted as well.

Here: VaeConfig (config.json's fields, checked), the Flux <-> diffusers parameter renaming,
reading a folder's config and weights (with the checks that name what does not fit) and saving
them. The network itself (diffusers' AutoencoderKL) is built and loaded in vae.py; this module
does not import diffusers.
"""

from __future__ import annotations

import functools
import json
import math
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import NextStepError

FLUX_NORM_GROUPS = 32
WEIGHT_FORMATS = ("pt", "safetensors")
KNOWN_PREFIXES = ("autoencoder.", "vae.", "first_stage_model.", "module.", "model.")


# ----- configuration -----


@dataclass
class VaeConfig:
    """The tokenizer's `config.json` (original Flux autoencoder fields plus NextStep's latent settings).

    psz: patch size of the encoder normalisation; None or 0 means each latent position on its own
    (the same as 1).
    """

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    deterministic: bool = False
    encoder_norm: bool = False
    psz: int | None = None

    @classmethod
    def from_dict(cls, d: dict, *, nextstep_1_1_defaults: bool, source: str = "VAE config") -> VaeConfig:
        """Build from config.json's dict; unknown keys are ignored, a null value counts as silent.

        Silent fields take the dataclass defaults, except that with `nextstep_1_1_defaults` (the
        1.1 release's code) the posterior is deterministic and encoder_norm is on with psz 1.
        The 1.0 defaults (scale 1, shift 0, sampled posterior, no normalisation) are this
        module's choice: they leave the encoder's output as it is.
        Raises NextStepError naming `source` and the field when a value has the wrong type.
        """
        if not isinstance(d, dict):
            raise NextStepError(f"{source} must be a JSON object with the tokenizer's fields, got {type(d).__name__}")
        values = dict(deterministic=True, encoder_norm=True, psz=1) if nextstep_1_1_defaults else {}
        for name in cls.__dataclass_fields__:
            if d.get(name) is not None:
                values[name] = check_field(name, d[name], source)
        return cls(**values)

    @property
    def downsample(self) -> int:
        """Pixels per latent position along each side: 2 ** (len(ch_mult) - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def block_channels(self) -> list[int]:
        """Channels of each encoder level: [ch * m for m in ch_mult]."""
        return [self.ch * m for m in self.ch_mult]

    @property
    def norm_groups(self) -> int:
        """GroupNorm groups: Flux's 32 when the channels allow, else the largest divisor of all of them below 32."""
        common = math.gcd(*self.block_channels)
        return max(g for g in range(1, FLUX_NORM_GROUPS + 1) if common % g == 0)

    def to_dict(self) -> dict:
        """The fields as config.json stores them."""
        return asdict(self)


POSITIVE_INTS = ("in_channels", "ch", "out_ch", "num_res_blocks", "z_channels")


def check_field(name: str, value, source: str):
    """Validate one config.json field; returns the value in the dataclass's type."""
    def fail(expected: str):
        raise NextStepError(f"{source}: field '{name}' must be {expected}, got {value!r}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if name in POSITIVE_INTS and not (is_int(value) and value > 0):
        fail("a positive integer")
    if name in ("resolution", "psz") and not (is_int(value) and value >= 0):
        fail("a non-negative integer")
    if name == "ch_mult":
        if not (isinstance(value, list) and value and all(is_int(m) and m > 0 for m in value)):
            fail("a non-empty list of positive integers")
        return list(value)
    if name in ("deterministic", "encoder_norm") and not isinstance(value, bool):
        fail("true or false")
    if name in ("scaling_factor", "shift_factor"):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            fail("a finite number")
        if name == "scaling_factor" and value == 0:
            fail("non-zero (decoding divides by it)")
        return float(value)
    return value

# ----- key names: original Flux autoencoder <-> diffusers -----
#
# One table serves both directions. A rule is a pair of name templates whose {fields} are
# translated field by field; names no rule matches (conv_in, conv_out, unknown names) are kept.

RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")

NAME_RULES = (
    ("{side}.down.{i}.block.{j}.{res}.{leaf}", "{side}.down_blocks.{i}.resnets.{j}.{res}.{leaf}"),
    ("{side}.down.{i}.downsample.conv.{leaf}", "{side}.down_blocks.{i}.downsamplers.0.conv.{leaf}"),
    ("{side}.up.{up}.block.{j}.{res}.{leaf}", "{side}.up_blocks.{up}.resnets.{j}.{res}.{leaf}"),
    ("{side}.up.{up}.upsample.conv.{leaf}", "{side}.up_blocks.{up}.upsamplers.0.conv.{leaf}"),
    ("{side}.mid.block_{mid}.{res}.{leaf}", "{side}.mid_block.resnets.{mid}.{res}.{leaf}"),
    ("{side}.mid.attn_1.{attn}.{leaf}", "{side}.mid_block.attentions.0.{attn}.{leaf}"),
    ("{side}.norm_out.{leaf}", "{side}.conv_norm_out.{leaf}"),
)


def field_patterns(to_diffusers: bool) -> dict[str, str]:
    """Regex of each template field on the side being read."""
    def choice(parts: dict) -> str:
        names = parts.values() if not to_diffusers else parts.keys()
        return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))

    return {"side": "encoder|decoder", "i": r"\d+", "j": r"\d+", "up": r"\d+", "mid": r"\d+",
            "res": choice(RESNET_PARTS), "attn": choice(ATTENTION_PARTS), "leaf": "weight|bias"}


def field_translators(to_diffusers: bool, levels: int) -> dict[str, Callable[[str], str]]:
    """How each field's value changes: decoder levels are numbered in reverse, mid blocks from 1 in Flux."""
    def renamer(parts: dict) -> Callable[[str], str]:
        table = parts if to_diffusers else {v: k for k, v in parts.items()}
        return table.__getitem__

    step = -1 if to_diffusers else 1
    return {"up": lambda s: str(levels - 1 - int(s)), "mid": lambda s: str(int(s) + step),
            "res": renamer(RESNET_PARTS), "attn": renamer(ATTENTION_PARTS)}


def compile_template(template: str, patterns: dict[str, str]) -> re.Pattern:
    """'{side}.norm_out.{leaf}' -> a regex with one named group per field."""
    pieces = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{patterns[p]})" for k, p in enumerate(pieces))
    return re.compile(regex)


@functools.cache
def compiled_rules(to_diffusers: bool) -> tuple[tuple[re.Pattern, str], ...]:
    """(regex of the naming being read, template of the naming being written) for each rule."""
    patterns = field_patterns(to_diffusers)
    ordered = (rule if to_diffusers else rule[::-1] for rule in NAME_RULES)
    return tuple((compile_template(source, patterns), target) for source, target in ordered)


def rename(name: str, *, to_diffusers: bool, levels: int) -> str:
    """One parameter name in the other naming; names that no rule matches come back unchanged."""
    translate = field_translators(to_diffusers, levels)
    for source, target in compiled_rules(to_diffusers):
        match = source.fullmatch(name)
        if match:
            fields = {k: translate.get(k, str)(v) for k, v in match.groupdict().items()}
            return target.format(**fields)
    return name


def is_attention_projection(diffusers_name: str) -> bool:
    """True for the q/k/v/out weights that Flux stores as 1x1 convs and diffusers as linear layers."""
    return any(f".mid_block.attentions.0.{p}.weight" in diffusers_name for p in ATTENTION_PROJECTIONS)


def infer_levels(names, pattern: str) -> int:
    """Number of decoder levels, from the highest up-block index among the names (0 if none)."""
    found = [int(m[1]) for n in names if (m := re.match(pattern, n))]
    return max(found) + 1 if found else 0


def flux_keys_to_diffusers(state_dict: dict, levels: int | None = None) -> dict:
    """Original Flux names -> diffusers AutoencoderKL names; attention 1x1 conv weights (o, i, 1, 1) -> (o, i).

    `levels` (len(ch_mult)) is inferred from the decoder's `up.{i}` names when not given. Names
    already in diffusers naming, and unknown names, pass through unchanged.
    """
    levels = levels if levels is not None else infer_levels(state_dict, r"decoder\.up\.(\d+)\.")
    converted = {}
    for name, tensor in state_dict.items():
        new_name = rename(name, to_diffusers=True, levels=levels)
        if is_attention_projection(new_name) and tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor.reshape(tensor.shape[:2])
        converted[new_name] = tensor
    return converted


def diffusers_keys_to_flux(state_dict: dict, levels: int | None = None) -> dict:
    """diffusers AutoencoderKL names -> original Flux names; attention linear weights (o, i) -> (o, i, 1, 1)."""
    levels = levels if levels is not None else infer_levels(state_dict, r"decoder\.up_blocks\.(\d+)\.")
    converted = {}
    for name, tensor in state_dict.items():
        if is_attention_projection(name) and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        converted[rename(name, to_diffusers=False, levels=levels)] = tensor
    return converted


# ----- writing -----


def save_image_tokenizer(folder, config: VaeConfig, flux_state_dict: dict, *, fmt: str = "pt") -> Path:
    """Write config.json and checkpoint.pt (a plain dict of tensors) or checkpoint.safetensors; returns the folder.

    A checkpoint of the other format left in the folder is removed so the folder stays unambiguous.
    """
    if fmt not in WEIGHT_FORMATS:
        raise NextStepError(f"VAE checkpoint format {fmt!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tensors = {name: t.detach().cpu().contiguous() for name, t in flux_state_dict.items()}
    for other in WEIGHT_FORMATS:
        if other != fmt:
            (folder / f"checkpoint.{other}").unlink(missing_ok=True)
    if fmt == "safetensors":
        save_file(tensors, str(folder / "checkpoint.safetensors"))
    else:
        torch.save(tensors, folder / "checkpoint.pt")
    return folder


# ----- reading -----


def read_config(folder: Path, nextstep_1_1_defaults: bool) -> VaeConfig:
    """The VaeConfig in folder/config.json."""
    if not folder.exists():
        raise NextStepError(f"image tokenizer (VAE) folder {folder} does not exist")
    if not folder.is_dir():
        raise NextStepError(f"image tokenizer (VAE) folder {folder} is a file, not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise NextStepError(f"image tokenizer (VAE) folder {folder} has no config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NextStepError(f"VAE config {path} is not valid JSON ({exc})") from None
    return VaeConfig.from_dict(raw, nextstep_1_1_defaults=nextstep_1_1_defaults, source=f"VAE config {path}")


def find_weights(folder: Path) -> Path:
    """checkpoint.safetensors, else checkpoint.pt, else the folder's only .safetensors / .pt / .pth file."""
    for name in ("checkpoint.safetensors", "checkpoint.pt", "diffusion_pytorch_model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    for pattern in ("*.safetensors", "*.pt", "*.pth"):
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise NextStepError(f"image tokenizer (VAE) folder {folder} has several weights files ({names}); "
                                f"keep one, or name it checkpoint.pt / checkpoint.safetensors")
        if found:
            return found[0]
    raise NextStepError(f"image tokenizer (VAE) folder {folder} has no checkpoint.pt or .safetensors weights")


def read_pt(path: Path):
    """torch.load with weights_only=True only; a file that would run code while unpickling is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if wanted:
            raise NextStepError(
                f"VAE checkpoint {path} is not a plain tensor state dict and was refused: unpickling it would call "
                f"Python object {wanted[1]}, and it is only read with torch.load(weights_only=True), which never "
                f"runs code from a file. Convert it to a plain dict of tensors (or .safetensors)") from None
        raise corrupt(path, exc) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise corrupt(path, exc) from None


def corrupt(path: Path, exc: Exception) -> NextStepError:
    """The error for a weights file that cannot be parsed."""
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return NextStepError(f"VAE checkpoint {path} cannot be read (truncated or corrupt?): {detail}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from {'state_dict': ...} and a shared 'vae.'-like prefix."""
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise corrupt(path, exc) from None
    else:
        state = read_pt(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NextStepError(f"VAE checkpoint {path} does not hold a plain dict of tensors (name -> tensor)")
    return strip_shared_prefix(state)


def strip_shared_prefix(state: dict) -> dict:
    """Drop a wrapper prefix ('autoencoder.', 'vae.', ...) that every name starts with."""
    for prefix in KNOWN_PREFIXES:
        if all(name.startswith(prefix) for name in state):
            return {name[len(prefix):]: t for name, t in state.items()}
    return state


def check_weights(state: dict, expected: dict, original_names: dict, config: VaeConfig, path: Path) -> None:
    """Refuse weights whose names or shapes do not match the autoencoder `config` describes.

    state: converted (diffusers) name -> tensor; expected: the model's name -> tensor (shapes);
    original_names: converted name -> the name in the file (for messages).
    """
    check_latent_channels(state, config, path)
    check_names(state, expected, original_names, config, path)
    for name, tensor in sorted(state.items()):
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise NextStepError(f"VAE checkpoint {path}: tensor {original_names[name]} has shape "
                                f"{tuple(tensor.shape)}, config.json (ch, ch_mult, z_channels) needs "
                                f"{tuple(expected[name].shape)}")


def check_names(state: dict, expected: dict, original_names: dict, config: VaeConfig, path: Path) -> None:
    """Missing or unexpected tensors, listed (first three) in the naming the file uses."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(original_names[n] for n in set(state) - set(expected))
    if not missing and not unexpected:
        return
    if any(original_names[n] != n for n in state):  # the file uses Flux names: show the missing ones that way
        missing = sorted(diffusers_keys_to_flux({n: expected[n] for n in missing}, len(config.ch_mult)))
    problems = []
    if missing:
        problems.append(f"is missing {len(missing)} tensors the config needs ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"has {len(unexpected)} tensors the config does not describe ({', '.join(unexpected[:3])})")
    raise NextStepError(f"VAE checkpoint {path} " + " and ".join(problems) + "; is this a Flux-style f8ch16 "
                        "tokenizer, and does its config.json (ch, ch_mult, num_res_blocks) belong to it?")


def check_latent_channels(state: dict, config: VaeConfig, path: Path) -> None:
    """The decoder's input channels and the encoder's output channels must equal z_channels (2x for the encoder)."""
    for name, dim, factor in (("decoder.conv_in.weight", 1, 1), ("encoder.conv_out.weight", 0, 2)):
        tensor = state.get(name)
        if tensor is None or tensor.dim() != 4 or tensor.shape[dim] == factor * config.z_channels:
            continue
        found = tensor.shape[dim] // factor
        needed = list(tensor.shape)
        needed[dim] = factor * config.z_channels
        raise NextStepError(
            f"VAE checkpoint {path}: tensor {name} has shape {tuple(tensor.shape)}, config.json (ch, ch_mult, "
            f"z_channels) needs {tuple(needed)}: the weights make {found}-channel latents but config.json field "
            f"z_channels is {config.z_channels}")
