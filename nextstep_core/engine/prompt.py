"""Turn captions into the token rows NextStep reads: one row per guidance branch, prompt and image.

The contract is the reference's section 6 (and section 8 for NextStep-1.1's BOS).

Row text:
- "cond": the caption, plus " " + positive when a non-empty positive suffix is given; when
  editing, the caption's single `<image>` marker becomes the image string
  `<|image_area|>{h}*{w}<|begin_of_image|>` + h*w `<|image_placeholder|>` + `<|end_of_image|>`,
  (h, w) being the input image's token grid;
- "uncond_text" (cfg > 1): the negative prompt ("" when none), preceded by the image string
  when editing;
- "uncond_image" (editing with cfg_img > 1): the negative prompt alone.
- NextStep-1.1 (prepend_bos=True) prepends the tokenizer's BOS string, if it defines one, to
  every row's text; a tokenizer that inserts BOS itself then yields two BOS ids.

All row texts are tokenised together with special tokens (BOS where the tokenizer's
post-processor inserts one), no EOS, and LEFT padded to the longest row with the pad id
(attention mask 0 there). Every row then ends with the same image prefix: the string
`<|image_area|>{h}*{w}` of the image to generate, tokenised with special tokens, with its FIRST
id dropped whenever the tokenizer defines a BOS token, then the boi id. The authors assume the
tokenizer inserted a BOS there; when it did not, the dropped id is `<|image_area|>` itself. That
quirk is reproduced on purpose: the released checkpoints were trained with it.

Row order is BRANCH-major, each prompt's row repeated images_per_prompt times:
    row = branch * (num_prompts * images_per_prompt) + prompt * images_per_prompt + image_index
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from ..checks import IMAGE_MARKER, check_count, check_image_markers
from ..errors import NextStepError
from .checkpoint import TOKENIZER_FILES

# Guidance branches, in row order: the conditional row first.
COND, UNCOND_TEXT, UNCOND_IMAGE = "cond", "uncond_text", "uncond_image"

SPECIAL = dict(pad="[PAD]", image_area="<|image_area|>", boi="<|begin_of_image|>", eoi="<|end_of_image|>",
               placeholder="<|image_placeholder|>")
PAD, IMAGE_AREA, BOI, EOI, PLACEHOLDER = (SPECIAL[k] for k in ("pad", "image_area", "boi", "eoi", "placeholder"))


@dataclass(frozen=True)
class SpecialIds:
    """The ids of NextStep's special tokens in one tokenizer."""

    pad: int
    image_area: int
    boi: int
    eoi: int
    placeholder: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
        missing = missing_special_tokens(tokenizer)
        if missing:
            raise NextStepError(f"the tokenizer lacks NextStep's special tokens {', '.join(missing)}; "
                                "is this a NextStep model folder?")
        vocab = tokenizer.get_vocab()
        return cls(**{name: vocab[token] for name, token in SPECIAL.items()})


@dataclass
class PromptRows:
    """The prompt rows of one generation call.

    input_ids (rows, L) long: left padded, every row ending with boi.
    attention_mask (rows, L) long: 0 on padding.
    num_branches: guidance branches; rows = num_branches * num_prompts * images_per_prompt.
    image_rows (rows,) bool: rows whose text carries the input image's placeholders (editing).
    branches: the branch names in row-block order (see `guidance_branches`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    num_branches: int
    image_rows: torch.Tensor
    branches: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.branches and len(self.branches) != self.num_branches:
            raise ValueError(f"{len(self.branches)} branch names for {self.num_branches} branches")


def missing_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """NextStep's special tokens (SPECIAL) that `tokenizer` lacks, in SPECIAL's order."""
    vocab = tokenizer.get_vocab()
    return [token for token in SPECIAL.values() if token not in vocab]


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The model folder's tokenizer (local files only, no remote code), left padding, checked for
    NextStep's special tokens; pad token `[PAD]` when the files name none."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise NextStepError(f"model folder {folder} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    try:
        with quiet_transformers():  # it also reads config.json and warns about the unknown model type
            tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left", local_files_only=True,
                                                      trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise NextStepError(f"the tokenizer files in model folder {folder} cannot be read: {exc}") from None
    missing = missing_special_tokens(tokenizer)
    if missing:
        raise NextStepError(f"the tokenizer in model folder {folder} lacks NextStep's special tokens "
                            f"{', '.join(missing)}; is this a NextStep model folder?")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
    return tokenizer


@contextmanager
def quiet_transformers():
    """Silence transformers' warnings (not errors) inside the block."""
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        transformers_logging.set_verbosity(level)


def guidance_branches(editing: bool, cfg: float, cfg_img: float) -> list[str]:
    """Branch names in row-block order.

    text-to-image: ["cond"], plus "uncond_text" (negative prompt) when cfg > 1 (cfg_img ignored);
    editing: ["cond"] (caption with image), plus "uncond_text" (image + negative prompt) when
    cfg > 1, plus "uncond_image" (negative prompt alone) when cfg_img > 1.
    """
    branches = [COND]
    if cfg > 1:
        branches.append(UNCOND_TEXT)
    if editing and cfg_img > 1:
        branches.append(UNCOND_IMAGE)
    return branches


def check_grid(grid: tuple[int, int], what: str) -> None:
    """A (rows, cols) token grid with both sides >= 1."""
    if len(grid) != 2 or any(int(side) != side or side < 1 for side in grid):
        raise NextStepError(f"{what} {tuple(grid)} must be two whole numbers >= 1 (rows, cols)")


def grid_string(grid: tuple[int, int]) -> str:
    """`<|image_area|>{h}*{w}`: the image-area announcement of an (h, w) token grid."""
    rows, cols = grid
    return f"{IMAGE_AREA}{int(rows)}*{int(cols)}"


def image_string(edit_grid: tuple[int, int]) -> str:
    """The text standing for the input image: area, boi, h*w placeholders, eoi."""
    rows, cols = edit_grid
    return grid_string(edit_grid) + BOI + PLACEHOLDER * (int(rows) * int(cols)) + EOI


def cond_text(caption: str, positive: str | None, edit_grid: tuple[int, int] | None) -> str:
    """The conditional row's text: marker replaced by the image string, positive suffix appended."""
    if edit_grid is not None:
        caption = caption.replace(IMAGE_MARKER, image_string(edit_grid), 1)
    return f"{caption} {positive}" if positive else caption


def branch_text(branch: str, caption: str, negative: str, positive: str | None,
                edit_grid: tuple[int, int] | None) -> str:
    """The text of one row of `branch` for `caption`."""
    if branch == COND:
        return cond_text(caption, positive, edit_grid)
    if branch == UNCOND_TEXT and edit_grid is not None:
        return image_string(edit_grid) + negative
    return negative


def row_texts(captions: list[str], branches: list[str], negative: str, positive: str | None,
              edit_grid: tuple[int, int] | None, images_per_prompt: int) -> tuple[list[str], list[bool]]:
    """Texts of all rows in branch-major order, and whether each carries the input image."""
    texts, carries_image = [], []
    for branch in branches:
        for caption in captions:
            text = branch_text(branch, caption, negative, positive, edit_grid)
            texts += [text] * images_per_prompt
            carries_image += [edit_grid is not None and branch != UNCOND_IMAGE] * images_per_prompt
    return texts, carries_image


def pad_id(tokenizer: PreTrainedTokenizerBase, special: SpecialIds) -> int:
    """The tokenizer's own pad id (what its padding would use), `[PAD]` when it has none."""
    return special.pad if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)


def tokenize_left_padded(tokenizer: PreTrainedTokenizerBase, texts: list[str], pad: int):
    """texts -> input_ids, attention_mask (rows, L) long: special tokens added, left padded with `pad`."""
    encoded = tokenizer(texts, add_special_tokens=True, padding=False, truncation=False).input_ids
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in encoded], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], dtype=torch.long)
    return input_ids.reshape(len(texts), width), attention_mask.reshape(len(texts), width)


def image_prefix_ids(tokenizer: PreTrainedTokenizerBase, token_grid: tuple[int, int], boi: int) -> list[int]:
    """The ids every row ends with: `<|image_area|>{h}*{w}` with special tokens, first id dropped
    whenever the tokenizer defines a BOS token (inserted or not: the authors' quirk), then boi."""
    ids = list(tokenizer(grid_string(token_grid), add_special_tokens=True).input_ids)
    if tokenizer.bos_token is not None:
        ids = ids[1:]
    return ids + [boi]


def check_placeholders(input_ids: torch.Tensor, image_rows: torch.Tensor, placeholder: int,
                       edit_grid: tuple[int, int] | None) -> None:
    """Image rows must hold exactly h*w placeholder ids, other rows none (the tokenizer must not
    merge or split `<|image_placeholder|>`)."""
    expected = 0 if edit_grid is None else int(edit_grid[0]) * int(edit_grid[1])
    counts = (input_ids == placeholder).sum(dim=1)
    wanted = torch.where(image_rows, expected, 0)
    if not torch.equal(counts, wanted):
        raise NextStepError(f"the tokenizer turned the input image's {expected} `<|image_placeholder|>` tokens into "
                            f"{counts.tolist()} per row; is it NextStep's tokenizer?")


def check_request(captions: list[str], negative: str | None, positive: str | None, token_grid: tuple[int, int],
                  edit_grid: tuple[int, int] | None, images_per_prompt: int) -> None:
    """Raise NextStepError for anything the caller can fix, before tokenising."""
    if not captions:
        raise NextStepError("no prompt given")
    check_count("number of images", images_per_prompt)
    check_grid(token_grid, "token grid of the image to generate")
    if edit_grid is not None:
        check_grid(edit_grid, "token grid of the input image")
    check_image_markers(captions, edit_grid is not None, negative, positive)


def build_prompt_rows(tokenizer: PreTrainedTokenizerBase, captions: list[str], *, token_grid: tuple[int, int],
                      negative: str | None = None, positive: str | None = None, images_per_prompt: int = 1,
                      edit_grid: tuple[int, int] | None = None, cfg: float = 7.5, cfg_img: float = 1.0,
                      prepend_bos: bool = False) -> PromptRows:
    """Token rows for every guidance branch, prompt and image (see the module docstring).

    captions: one per prompt (a single string counts as one prompt). token_grid: (rows, cols) of
    the image to generate, pixels // 16. edit_grid: (rows, cols) of the input image when editing.
    prepend_bos: NextStep-1.1's BOS string before every row (1.0 passes False).
    Returns PromptRows with num_branches * len(captions) * images_per_prompt rows.
    """
    captions = [captions] if isinstance(captions, str) else list(captions)
    check_request(captions, negative, positive, token_grid, edit_grid, images_per_prompt)
    special = SpecialIds.from_tokenizer(tokenizer)
    branches = guidance_branches(edit_grid is not None, cfg, cfg_img)
    texts, carries_image = row_texts(captions, branches, negative or "", positive, edit_grid, images_per_prompt)
    if prepend_bos and tokenizer.bos_token is not None:
        texts = [tokenizer.bos_token + text for text in texts]

    text_ids, text_mask = tokenize_left_padded(tokenizer, texts, pad_id(tokenizer, special))
    prefix = torch.tensor(image_prefix_ids(tokenizer, token_grid, special.boi), dtype=torch.long)
    prefix = prefix.expand(len(texts), -1)
    input_ids = torch.cat([text_ids, prefix], dim=1)
    attention_mask = torch.cat([text_mask, torch.ones_like(prefix)], dim=1)
    image_rows = torch.tensor(carries_image, dtype=torch.bool)
    check_placeholders(input_ids, image_rows, special.placeholder, edit_grid)
    return PromptRows(input_ids, attention_mask, len(branches), image_rows, branches)
