"""One text-to-image run of the authors' NextStep-1.0 pipeline, as its own process (the other half
of benchmarks/authors_compare.py; it imports nothing of this project).

    python benchmarks/authors_pipeline.py --code DIR --model MODEL --vae VAE --out out.png \
        --size 512 --steps 50 --cfg 7.5 --seed 0

`--code` is a folder holding the authors' `nextstep/` package (authors_compare.py extracts it from a
git mirror of stepfun-ai/NextStep-1 at run time; none of it is copied into this repository). Their
`NextStepPipeline.generate_image` does the work, called as their example.py calls it for
text-to-image (use_norm on, constant cfg, shift 1.0), on the CPU in float32.

The glue below is ours, and only loads files and bridges library versions; no arithmetic of the
generation is replaced:
- loading: their `NextStep(config)` is built from the folder's config.json (their NextStepConfig)
  and filled from the safetensors shards (strict: every tensor present, none left over), instead of
  their `from_pretrained`; their VAE `AutoencoderKL(AutoEncoderParams(...))` is filled from
  checkpoint.pt with `torch.load(weights_only=True)` (their `from_pretrained` unpickles freely).
  Attention is their SDPA class, the one transformers 4.49 (their pin) picks for them.
- transformers 5 bridges: the "default" RoPE entry (inverse frequencies theta^(-2i/d), scaling 1,
  as transformers 4.x computed them) that transformers 5 no longer lists, and
  `StaticCache.get_max_cache_shape` (renamed `get_max_length`).
- stand-ins, only for modules that are not installed (named in the output JSON): their logging
  module (loguru + pendulum), their import_utils on a CPU-only torch (it builds an xformers install
  hint from torch.version.cuda, which is None there; set_seed only asks it whether torch is
  available), webdataset and megfile (imported, unused here), torchvision's
  transforms (used for editing inputs only), omegaconf's `OmegaConf.create` (an attribute dict),
  tabulate (a parameter table), einops' `rearrange` (the two patterns of their VAE attention,
  as exact reshapes/permutes). A stand-in imports faster than the package, which can only make
  the authors' process quicker.
- `ENABLE_TORCH_COMPILE`: their code torch.compiles the backbone step, the head and the sampler
  when it is "true" (their default, read at import); this script sets it to "false" unless
  --compile is given (their `compile_disabled()` paths are the eager ones).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import time
import types
from pathlib import Path

STARTED = time.perf_counter()


def missing(name: str) -> bool:
    return importlib.util.find_spec(name) is None


class _Logger:
    """Stand-in for their loguru logger: the methods their modules call, on the stdlib logger."""

    def __init__(self):
        self._log = logging.getLogger("nextstep-authors")
        self._seen = set()

    def __getattr__(self, name):
        level = name.removesuffix("_once").upper()
        log = getattr(self._log, {"SUCCESS": "info", "TRACE": "debug"}.get(level, level.lower()), self._log.info)
        if not name.endswith("_once"):
            return lambda message, *a, **k: log(str(message))

        def once(message, *a, **k):
            if message not in self._seen:
                self._seen.add(message)
                log(str(message))
        return once


class _AttrDict(dict):
    """Stand-in for an OmegaConf DictConfig: keys readable and writable as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setattr__(self, name, value):
        self[name] = value


def _rearrange(x, pattern: str, **sizes):
    """Stand-in for einops.rearrange: exactly the two patterns their VAE attention uses."""
    if pattern == "b c h w -> b 1 (h w) c":
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w).permute(0, 2, 1).unsqueeze(1)
    if pattern == "b 1 (h w) c -> b c h w":
        b, _, _, c = x.shape
        return x.squeeze(1).permute(0, 2, 1).reshape(b, c, sizes["h"], sizes["w"])
    raise NotImplementedError(f"einops stand-in: pattern {pattern!r}")


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() callers need one
    sys.modules[name] = module
    return module


def install_stand_ins() -> list[str]:
    """Put stand-ins in sys.modules for the modules that are not installed; returns their names."""
    used = []
    if missing("loguru") or missing("pendulum"):
        _module("nextstep.utils.loguru", logger=_Logger())
        used.append("nextstep.utils.loguru (loguru/pendulum)")
    for name in ("webdataset", "megfile"):
        if missing(name):
            _module(name)
            used.append(name)
    import torch

    if torch.version.cuda is None and missing("xformers"):
        # their import_utils formats an xformers install hint from torch.version.cuda, None on a
        # CPU-only torch; set_seed only asks it is_torch_available()
        _module("nextstep.utils.import_utils", is_torch_available=lambda *a, **k: True)
        used.append("nextstep.utils.import_utils (fails on a CPU-only torch)")
    if missing("omegaconf"):
        _module("omegaconf", OmegaConf=types.SimpleNamespace(create=lambda d: _AttrDict(d)))
        used.append("omegaconf")
    if missing("tabulate"):
        _module("tabulate", tabulate=lambda rows, **k: "\n".join(" ".join(map(str, r)) for r in rows))
        used.append("tabulate")
    if missing("einops"):
        _module("einops", rearrange=_rearrange)
        used.append("einops")
    return used


def import_pipeline():
    """Their pipeline module. torchvision, when missing, is stood in for during that import alone
    (transformers and diffusers, imported before, must keep seeing it as absent)."""
    import diffusers  # noqa: F401
    import nextstep.models.modeling_flux_vae  # noqa: F401
    import nextstep.models.modeling_nextstep  # noqa: F401
    import transformers  # noqa: F401

    if not missing("torchvision"):
        from nextstep.models.pipeline_nextstep import NextStepPipeline
        return NextStepPipeline, []

    class _Unused:
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a, **k):
            raise NotImplementedError("torchvision stand-in: image inputs (editing) are not supported here")

    transforms = _module("torchvision.transforms", Compose=_Unused, ToTensor=_Unused, Normalize=_Unused)
    _module("torchvision", transforms=transforms)
    try:
        from nextstep.models.pipeline_nextstep import NextStepPipeline
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.transforms"]
    return NextStepPipeline, ["torchvision (during the pipeline's import)"]


def bridge_transformers() -> list[str]:
    """The transformers 4.x names their code uses that transformers 5 renamed or dropped."""
    import torch
    from transformers.cache_utils import StaticCache
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    bridged = []
    if "default" not in ROPE_INIT_FUNCTIONS:
        def default_rope(config, device=None, *args, **kwargs):
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            steps = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
            return 1.0 / (config.rope_theta ** (steps / dim)), 1.0
        ROPE_INIT_FUNCTIONS["default"] = default_rope
        bridged.append("ROPE_INIT_FUNCTIONS['default']")
    if not hasattr(StaticCache, "get_max_cache_shape"):
        StaticCache.get_max_cache_shape = lambda self: self.get_max_length()
        bridged.append("StaticCache.get_max_cache_shape")
    return bridged


def load_model(folder: Path):
    """Their NextStep model from our 1.0 folder: their config class, our safetensors, strict."""
    import torch
    from nextstep.models.configuration_nextstep import NextStepConfig
    from nextstep.models.modeling_nextstep import NextStep
    from safetensors.torch import load_file

    fields = json.loads((folder / "config.json").read_text())
    config = NextStepConfig(**fields)
    if getattr(config, "rope_theta", None) is None:  # transformers 5 may keep it in rope_parameters alone
        config.rope_theta = fields["rope_theta"]
    config._attn_implementation = "sdpa"
    with torch.device("cpu"):
        model = NextStep(config)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    state = {}
    for file in files:
        state.update(load_file(str(folder / file)))
    model.load_state_dict(state, strict=True)
    return model


def load_vae(folder: Path):
    """Their Flux VAE from a tokenizer folder: their params class, checkpoint.pt without pickle code."""
    import dataclasses

    import torch
    from nextstep.models.modeling_flux_vae import AutoencoderKL, AutoEncoderParams

    fields = json.loads((folder / "config.json").read_text())
    names = {f.name for f in dataclasses.fields(AutoEncoderParams)}
    vae = AutoencoderKL(AutoEncoderParams(**{k: v for k, v in fields.items() if k in names}))
    state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    vae.load_state_dict(state, strict=True)
    return vae


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    # as their NextStepPipeline.__init__ loads it from a model path
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=512,
                                         padding_side="left", use_fast=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", required=True, help="folder holding the authors' nextstep/ package")
    parser.add_argument("--model", required=True)
    parser.add_argument("--vae", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt", default="a red circle on the left")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="leave their torch.compile on (their default)")
    parser.add_argument("--report", help="write what was stood in or bridged here (JSON)")
    args = parser.parse_args(argv)

    os.environ["ENABLE_TORCH_COMPILE"] = "true" if args.compile else "false"
    sys.path.insert(0, str(Path(args.code).resolve()))
    stand_ins = install_stand_ins()
    bridged = bridge_transformers()

    NextStepPipeline, more = import_pipeline()
    stand_ins += more

    import torch

    tokenizer = load_tokenizer(Path(args.model))
    pipe = NextStepPipeline(tokenizer=tokenizer, model=load_model(Path(args.model)), vae=load_vae(Path(args.vae)))
    pipe = pipe.to("cpu", torch.float32)
    loaded = time.perf_counter()
    images = pipe.generate_image(
        captions=args.prompt, images=None, num_images_per_caption=1, positive_prompt=None, negative_prompt=None,
        hw=(args.size, args.size), use_norm=True, cfg=args.cfg, cfg_schedule="constant", timesteps_shift=1.0,
        num_sampling_steps=args.steps, seed=args.seed, progress=False)
    images[0].save(args.out)
    done = time.perf_counter()
    if args.report:
        Path(args.report).write_text(json.dumps({
            "stand_ins": stand_ins, "bridged": bridged, "compile": args.compile,
            "in_process_s": {"start_to_loaded": loaded - STARTED, "generate_and_save": done - loaded}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
