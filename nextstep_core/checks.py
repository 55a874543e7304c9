"""Checks of what a user hands the engine, shared by the Python API, the CLI and the nodes.

Each failure is a one-line NextStepError that names the setting and what to do: a size that is
not a whole number of tokens, a number that is NaN, infinite or out of range, a count below
one, a device this machine does not have, an input image that cannot be read, an output path
that is a folder. They run before any model is loaded or run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .errors import NextStepError


def check_number(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
                 hint: str = "") -> float:
    """A finite real number within [minimum, maximum]; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NextStepError(f"{name} {value!r} is not a number")
    if not math.isfinite(value):
        raise NextStepError(f"{name} {value} must be a finite number{hint}")
    if minimum is not None and value < minimum:
        raise NextStepError(f"{name} {value} must be >= {minimum}{hint}")
    if maximum is not None and value > maximum:
        raise NextStepError(f"{name} {value} must be <= {maximum}{hint}")
    return float(value)


def check_count(name: str, value, minimum: int = 1) -> int:
    """A whole number >= minimum (an int, or a float with no fraction)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value or value < minimum:
        raise NextStepError(f"{name} {value} must be a whole number >= {minimum}")
    return int(value)


def check_image_size(width, height, multiple: int) -> tuple[int, int]:
    """The token grid (rows, cols) for an image size, or a NextStepError naming the bad side."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value or value <= 0:
            raise NextStepError(f"{name} {value} must be a positive whole number of pixels")
        if value % multiple:
            raise NextStepError(f"{name} {value} is not a multiple of {multiple}")
    return int(height) // multiple, int(width) // multiple


def check_device(device: str | torch.device) -> torch.device:
    """A device this machine has: cpu, cuda[:N] with a CUDA GPU N present, mps where available."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise NextStepError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, mps)") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU was found"
            raise NextStepError(f"device {device} is not available: {build}; use --device cpu or a CUDA build of torch")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise NextStepError(f"device {device} does not exist: this machine has {count} CUDA GPU(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise NextStepError(f"device {device} is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise NextStepError(f"device {device} is not supported: use cpu, cuda or mps")
    return parsed


def read_image(path: str | Path) -> Image.Image:
    """An input image file as 8-bit RGB. RGBA, greyscale, palette and 16-bit images are converted
    (16-bit values scaled to 8 bits, alpha dropped as ComfyUI's Load Image does); a missing,
    empty, truncated or non-image file, or a folder, is refused with its name."""
    path = Path(path)
    if path.is_dir():
        raise NextStepError(f"input image {path} is a folder, not an image file")
    if not path.is_file():
        raise NextStepError(f"input image {path} does not exist")
    if path.stat().st_size == 0:
        raise NextStepError(f"input image {path} is empty")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                image = image.convert("I").point(lambda value: value / 257).convert("L")
            elif image.mode == "P":  # a palette's transparency goes through RGBA; alpha is dropped, as ComfyUI does
                image = image.convert("RGBA")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise NextStepError(f"input image {path} cannot be read as an image ({exc})") from exc


def check_output_path(path: str | Path) -> Path:
    """Where an output image may be written: not an existing folder, inside a folder that exists
    or can be made."""
    path = Path(path)
    if path.is_dir():
        raise NextStepError(f"output {path} is a folder: give a file name such as {path / 'out.png'}")
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NextStepError(f"output {path} cannot be written: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise NextStepError(f"output {path} cannot be written: no write permission in {parent}")
            break
    return path
