"""Turn captions into the token rows NextStep reads: one row per guidance branch and image.

Row text (reference section 6):
- the caption, plus " " + positive when a positive suffix is given; negative rows use the
  negative prompt ("" when none);
- editing: the caption's single `<image>` marker becomes
  `<|image_area|>{h}*{w}<|begin_of_image|>` + h*w `<|image_placeholder|>` + `<|end_of_image|>`;
- NextStep-1.1 prepends the tokenizer's BOS string (if it has one) to every row's text.
All rows are tokenised together (special tokens added, no EOS) with LEFT padding, then every
row gets the image prefix: `<|image_area|>{rows}*{cols}` tokenised with special tokens, its
first id dropped whenever the tokenizer defines a BOS token (the reference assumes one was
inserted even when it was not: reproduced on purpose), then the boi id.

Guidance branches, in row order (BRANCH-major: row = branch * images + prompt * images_per_prompt + i):
- text-to-image: ["cond"] or, with cfg > 1, ["cond", "uncond_text"] (the negative prompt);
- editing: "cond" (caption with image), "uncond_text" (image + negative prompt, when cfg > 1),
  "uncond_image" (negative prompt alone, when cfg_img > 1).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as transformers_logging

from .errors import NextStepError
from .sampling import COND, UNCOND_IMAGE, UNCOND_TEXT

IMAGE_MARKER = "<image>"
IMAGE_AREA = "<|image_area|>"
BOI = "<|begin_of_image|>"
EOI = "<|end_of_image|>"
PLACEHOLDER = "<|image_placeholder|>"
PAD = "[PAD]"


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    image_area: int
    boi: int
    eoi: int
    placeholder: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        vocab = tokenizer.get_vocab()
        names = dict(pad=PAD, image_area=IMAGE_AREA, boi=BOI, eoi=EOI, placeholder=PLACEHOLDER)
        missing = [token for token in names.values() if token not in vocab]
        if missing:
            raise NextStepError(f"the tokenizer lacks NextStep's special tokens {', '.join(missing)}; "
                                "is this a NextStep model folder?")
        return cls(**{field: vocab[token] for field, token in names.items()})


@dataclass
class PromptRows:
    """input_ids / attention_mask (rows, L), left padded; image_rows (rows,) marks rows with
    the input image's placeholders; branches names the guidance branch of each row block."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    branches: list[str]
    image_rows: torch.Tensor

    @property
    def num_branches(self) -> int:
        return len(self.branches)


def load_tokenizer(folder: str | Path):
    """The model folder's fast tokenizer, left padding, checked for NextStep's special tokens."""
    folder = Path(folder)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise NextStepError(f"model folder {folder} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    try:
        with quiet_transformers():  # it reads config.json too and warns about the unknown model type
            tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise NextStepError(f"the tokenizer files in {folder} cannot be read: {exc}") from None
    tokenizer.padding_side = "left"
    SpecialIds.from_tokenizer(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
    return tokenizer


@contextmanager
def quiet_transformers():
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        transformers_logging.set_verbosity(level)


def guidance_branches(editing: bool, cfg: float, cfg_img: float) -> list[str]:
    branches = [COND]
    if cfg > 1:
        branches.append(UNCOND_TEXT)
    if editing and cfg_img > 1:
        branches.append(UNCOND_IMAGE)
    return branches


def image_string(edit_grid: tuple[int, int]) -> str:
    rows, cols = edit_grid
    return f"{IMAGE_AREA}{rows}*{cols}{BOI}" + PLACEHOLDER * (rows * cols) + EOI


def check_grid(grid: tuple[int, int], what: str) -> None:
    if len(grid) != 2 or min(grid) < 1:
        raise NextStepError(f"{what} {grid} must have two sides >= 1")


def branch_texts(captions: list[str], branch: str, negative: str, positive: str | None,
                 edit_grid: tuple[int, int] | None) -> list[str]:
    """The text of one guidance branch for every caption."""
    if branch == UNCOND_IMAGE:
        return [negative] * len(captions)
    if branch == UNCOND_TEXT:
        prefix = image_string(edit_grid) if edit_grid else ""
        return [prefix + negative] * len(captions)
    texts = []
    for caption in captions:
        if positive:
            caption = f"{caption} {positive}"
        if edit_grid is not None:
            caption = caption.replace(IMAGE_MARKER, image_string(edit_grid), 1)
        texts.append(caption)
    return texts


def check_markers(captions: list[str], editing: bool) -> None:
    for caption in captions:
        count = caption.count(IMAGE_MARKER)
        if not editing and count:
            raise NextStepError("the prompt has an `<image>` marker but no input image was given")
        if editing and count == 0:
            raise NextStepError("no `<image>` marker in the edit prompt")
        if editing and count > 1:
            raise NextStepError(f"the edit prompt has {count} `<image>` markers; use exactly one")


def image_prefix_ids(tokenizer, token_grid: tuple[int, int], boi: int) -> list[int]:
    ids = tokenizer(f"{IMAGE_AREA}{token_grid[0]}*{token_grid[1]}", add_special_tokens=True).input_ids
    if tokenizer.bos_token is not None:
        ids = ids[1:]  # the reference drops the first id whenever a BOS token is defined
    return list(ids) + [boi]


def build_prompt_rows(tokenizer, captions: list[str], *, token_grid: tuple[int, int], negative: str | None = None,
                      positive: str | None = None, images_per_prompt: int = 1,
                      edit_grid: tuple[int, int] | None = None, cfg: float = 7.5, cfg_img: float = 1.0,
                      prepend_bos: bool = False) -> PromptRows:
    """Token rows for all guidance branches, prompts and images (see the module docstring)."""
    if not captions:
        raise NextStepError("no prompt given")
    if images_per_prompt < 1:
        raise NextStepError(f"number of images {images_per_prompt} must be >= 1")
    check_grid(token_grid, "token grid")
    editing = edit_grid is not None
    if editing:
        check_grid(edit_grid, "input image token grid")
    check_markers(captions, editing)
    special = SpecialIds.from_tokenizer(tokenizer)
    branches = guidance_branches(editing, cfg, cfg_img)
    repeated = [c for c in captions for _ in range(images_per_prompt)]
    texts, image_rows = [], []
    for branch in branches:
        block = branch_texts(repeated, branch, negative or "", positive, edit_grid)
        texts += block
        image_rows += [editing and branch != UNCOND_IMAGE] * len(block)
    if prepend_bos and tokenizer.bos_token is not None:
        texts = [tokenizer.bos_token + t for t in texts]

    encoded = tokenizer(texts, add_special_tokens=True, padding="longest", return_tensors="pt")
    prefix = torch.tensor(image_prefix_ids(tokenizer, token_grid, special.boi)).expand(len(texts), -1)
    input_ids = torch.cat([encoded.input_ids, prefix], dim=1)
    attention_mask = torch.cat([encoded.attention_mask, torch.ones_like(prefix)], dim=1)
    image_rows = torch.tensor(image_rows, dtype=torch.bool)
    if editing:
        placeholders = (input_ids == special.placeholder).sum(dim=1)
        expected = edit_grid[0] * edit_grid[1]
        if not torch.all(placeholders[image_rows] == expected):
            raise NextStepError("the tokenizer merged the image placeholder tokens; is it NextStep's tokenizer?")
    return PromptRows(input_ids, attention_mask, branches, image_rows)
