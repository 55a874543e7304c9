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


def check_image_markers(prompts: list[str], editing: bool, negative: str | None = None,
                        positive: str | None = None) -> None:
    """Each prompt holds exactly one `<image>` marker when editing and none otherwise; the
    negative and positive texts hold none."""
    markers = [p.count(IMAGE_MARKER) for p in prompts]
    if not editing:
        if any(markers):
            raise NextStepError(f"the prompt has an `{IMAGE_MARKER}` marker but no input image was given")
    elif not all(markers):
        raise NextStepError(f"an input image was given but the edit prompt has no `{IMAGE_MARKER}` marker")
    elif any(m > 1 for m in markers):
        raise NextStepError(f"the edit prompt has {max(markers)} `{IMAGE_MARKER}` markers; use exactly one")
    for what, text in (("negative", negative), ("positive", positive)):
        if text and IMAGE_MARKER in text:
            raise NextStepError(f"the {what} prompt has an `{IMAGE_MARKER}` marker; only the prompt itself may "
                                "hold one")


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
    """A PIL image -> pixels (1, 3, H, W) float32 (its 8-bit RGB values x / 127.5 - 1); an image
    tensor (H, W, 3) or (B, H, W, 3) in [0, 1] -> pixels (B, 3, H, W) in [-1, 1], in its dtype."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)[None] / 127.5 - 1
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image[None]
        if x.dim() != 4 or x.shape[-1] != 3:
            raise NextStepError(
                f"input image tensor has shape {tuple(image.shape)}; expected (H, W, 3) or (1, H, W, 3)")
        return x.permute(0, 3, 1, 2) * 2 - 1
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


EMPTY_REGION_HINT = " (mark the area to redraw with values > 0, white in a mask image)"


def check_region(region, width: int, height: int, empty_hint: str = EMPTY_REGION_HINT) -> torch.Tensor:
    """region_pixels(region), which must be the output's size and mark something to redraw
    (`empty_hint` ends the message of an empty one: where to paint it)."""
    mask = region_pixels(region)
    h, w = mask.shape
    if (w, h) != (width, height):
        raise NextStepError(f"the region mask is {w}x{h} but the output is {width}x{height} (width x height): "
                            "give a mask of the output's size (it is not resized)")
    if not bool(mask.any()):
        raise NextStepError(f"the region mask is all zero: nothing to redraw{empty_hint}")
    return mask


def check_keep_rows(keep_rows, rows: int, pixels_per_token: int) -> int:
    """keep_rows: a whole number of token rows from 0 to rows - 1 (at least one row is drawn)."""
    if isinstance(keep_rows, bool) or not isinstance(keep_rows, (int, float)) or not math.isfinite(keep_rows) \
            or int(keep_rows) != keep_rows or not 0 <= keep_rows < rows:
        raise NextStepError(f"keep_rows {keep_rows} must be a whole number from 0 to {rows - 1} (the output has "
                            f"{rows} token rows of {pixels_per_token} pixels; at least one is drawn)")
    return int(keep_rows)


def check_same_size(what: str, size: tuple[int, int], output: tuple[int, int]) -> None:
    """`what` ("the reference") of size (width, height) must be the output's (width, height)."""
    if tuple(size) != tuple(output):
        raise NextStepError(f"{what} is {size[0]}x{size[1]} but the output is {output[0]}x{output[1]} "
                            "(width x height): they must be the same size")
