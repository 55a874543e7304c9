"""Broken copies of a tiny model folder, one per way a download or an edit can go wrong, with
the start of the message each must give (tests/test_bad_input.py through the CLI,
tests/comfy/test_comfy_bad_input.py through the loader node)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


class PlantedCode:
    """Unpickling this object creates `marker`: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.__class__.touch, (self.marker,))


def copy_of(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def truncate_first_shard(folder: Path) -> None:
    shard = sorted(folder.glob("model*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])


def garbage_first_shard(folder: Path) -> None:
    shard = sorted(folder.glob("model*.safetensors"))[0]
    shard.write_bytes(bytes(range(256)) * 64)


def missing_shard(folder: Path) -> None:
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()


def mismatched_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))


def without_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def without_image_tokenizer(folder: Path) -> None:
    shutil.rmtree(folder / "vae")


def pickled_image_tokenizer(folder: Path) -> None:
    """vae/checkpoint.pt replaced by a pickle that would create `code-ran` beside the folder if loaded."""
    vae = folder / "vae"
    for old in vae.glob("checkpoint.*"):
        old.unlink()
    torch.save({"encoder.conv_in.weight": PlantedCode(folder.parent / f"{folder.name}-code-ran")},
               vae / "checkpoint.pt")


BREAKAGES = {  # name -> (how, the message's start)
    "empty": (None, "has no config.json"),
    "truncated": (truncate_first_shard, "is truncated"),
    "garbage": (garbage_first_shard, "is not a safetensors file (no safetensors header at its start)"),
    "missing-shard": (missing_shard, "file(s) missing from"),
    "mismatched-config": (mismatched_config, "does config.json belong to these weights?"),
    "no-tokenizer": (without_tokenizer, "has no tokenizer (tokenizer.json / tokenizer_config.json)"),
    "no-image-tokenizer": (without_image_tokenizer, "has no vae/ folder; pass the image tokenizer folder"),
    "pickle": (pickled_image_tokenizer, "is not a plain tensor state dict and was refused"),
}


def write_broken_models(source: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """One broken copy of the NextStep-1.1-layout model `source` per BREAKAGES entry, under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (how, message) in BREAKAGES.items():
        folder = root / f"broken-{name}"
        if how is None:
            folder.mkdir()
        else:
            how(copy_of(source, folder))
        out[name] = (folder, message)
    return out
