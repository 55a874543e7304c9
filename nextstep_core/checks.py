"""Checks of what a user hands the engine, shared by the Python API, the CLI and the nodes.

Each failure is a one-line NextStepError that names the setting and what to do: a size that is
not a whole number of tokens, a number that is NaN, infinite or out of range, a count below
one, a device this machine does not have, an input image that cannot be read, an output path
that is a folder, a region mask or reference of the wrong size, keep_rows outside the image.
They run before any model is loaded or run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import NextStepError

IMAGE_MARKER = "<image>"  # where an edit prompt puts the input image


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


def read_image(path: str | Path, what: str = "input image") -> Image.Image:
    """An input image file as 8-bit RGB. RGBA, greyscale, palette and 16-bit images are converted
    (16-bit values scaled to 8 bits, alpha dropped as ComfyUI's Load Image does); a missing,
    empty, truncated or non-image file, or a folder, is refused with its name (`what` names
    the file's role in the message: input image, reference image, region mask)."""
    path = Path(path)
    if path.is_dir():
        raise NextStepError(f"{what} {path} is a folder, not an image file")
    if not path.is_file():
        raise NextStepError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise NextStepError(f"{what} {path} is empty")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                image = image.convert("I").point(lambda value: value / 257).convert("L")
            elif image.mode == "P":  # a palette's transparency goes through RGBA; alpha is dropped, as ComfyUI does
                image = image.convert("RGBA")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise NextStepError(f"{what} {path} cannot be read as an image ({exc})") from exc


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


def image_to_pixels(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image, or float tensor (H, W, 3) / (1, H, W, 3) in [0, 1] -> pixels (1, 3, H, W) in [-1, 1]."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image[None]
        if x.dim() != 4 or x.shape[0] != 1 or x.shape[-1] != 3:
            raise NextStepError(
                f"input image tensor has shape {tuple(image.shape)}; expected (H, W, 3) or (1, H, W, 3)")
        return x.permute(0, 3, 1, 2).float() * 2 - 1
    raise NextStepError(f"input image of type {type(image).__name__} is not a PIL image, an image tensor "
                        "or a LatentImage")


# ----- given tokens: continuation (keep_rows) and regions -----


def region_pixels(region) -> torch.Tensor:
    """A region mask -> bool (H, W), True where the image is to be redrawn (value > 0).

    region: a torch tensor or numpy array (H, W) or (1, H, W) (ComfyUI's MASK: float 0..1), or a
    PIL image (converted to greyscale "L")."""
    if isinstance(region, Image.Image):
        array = np.asarray(region.convert("L"))
        return torch.from_numpy(array > 0)
    if isinstance(region, np.ndarray):
        region = torch.from_numpy(np.ascontiguousarray(region))
    if not isinstance(region, torch.Tensor):
        raise NextStepError(f"region of type {type(region).__name__} is not a mask tensor, numpy array or PIL image")
    if region.dim() == 3 and region.shape[0] == 1:
        region = region[0]
    if region.dim() != 2:
        raise NextStepError(f"region mask has shape {tuple(region.shape)}; expected (H, W) or (1, H, W)")
    if region.dtype == torch.bool:
        return region.cpu()
    if region.is_complex():
        raise NextStepError("region mask must be real numbers (0 keeps, > 0 redraws)")
    return (region.detach().cpu() > 0)


def check_region(region, width: int, height: int) -> torch.Tensor:
    """region_pixels(region), which must be the output's size and mark something to redraw."""
    mask = region_pixels(region)
    h, w = mask.shape
    if (w, h) != (width, height):
        raise NextStepError(f"the region mask is {w}x{h} but the output is {width}x{height} (width x height): "
                            "give a mask of the output's size")
    if not bool(mask.any()):
        raise NextStepError("the region mask is all zero: nothing to redraw (mark the area to redraw with "
                            "values > 0, white in a mask image)")
    return mask


def check_keep_rows(keep_rows, rows: int) -> int:
    """keep_rows: a whole number of token rows (16 pixels each) from 0 to the image's `rows`."""
    if isinstance(keep_rows, bool) or not isinstance(keep_rows, (int, float)) or not math.isfinite(keep_rows) \
            or int(keep_rows) != keep_rows or not 0 <= keep_rows <= rows:
        raise NextStepError(f"keep_rows {keep_rows} must be a whole number from 0 to {rows} (the output's "
                            "token rows, 16 pixels each)")
    return int(keep_rows)


def check_same_size(what: str, size: tuple[int, int], output: tuple[int, int]) -> None:
    """`what` ("the reference") of size (width, height) must be the output's (width, height)."""
    if tuple(size) != tuple(output):
        raise NextStepError(f"{what} is {size[0]}x{size[1]} but the output is {output[0]}x{output[1]} "
                            "(width x height): they must be the same size")
