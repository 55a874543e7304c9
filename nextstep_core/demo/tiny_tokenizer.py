"""A small Qwen2-style byte-level BPE tokenizer with NextStep's special tokens, for tests and demos.

`write_tiny_tokenizer(folder)` trains it in-process on a fixed built-in corpus of captions about
coloured shapes and saves the standard Hugging Face files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), so `transformers.AutoTokenizer.from_pretrained(folder)` loads it as a
fast `Qwen2Tokenizer`, the way it loads the released NextStep tokenizers.

Its pipeline is Qwen2's: NFC normaliser, Qwen2's split pattern (every digit its own piece, so
"16*16" reads as 1 6 * 1 6) then byte-level bytes-to-unicode, byte-level decoder.
transformers' Qwen2Tokenizer rebuilds exactly this pipeline on load, whatever tokenizer.json says,
so training with it keeps the saved file and the loaded tokenizer in agreement.

Ids: `<|endoftext|>` (eos) is 0, then `<|begin_of_text|>` (bos, only with_bos=True), then
NextStep's special tokens in the order of `NEXTSTEP_SPECIAL_TOKENS`, then the 256 bytes, then merges.
Training is deterministic: the same arguments write byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..errors import NextStepError

EOS = "<|endoftext|>"
BOS = "<|begin_of_text|>"
PAD = "[PAD]"
NEXTSTEP_SPECIAL_TOKENS = [
    PAD,
    "<|image_area|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image_placeholder|>",
    "<|begin_of_prompt_refinement|>",
    "<|end_of_prompt_refinement|>",
    "<|begin_of_thinking|>",
    "<|end_of_thinking|>",
]
# Qwen2's published pre-tokenizer pattern (the Split regex of Qwen2's tokenizer.json).
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
MODEL_MAX_LENGTH = 131072

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "black", "purple", "orange", "gray", "pink")
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = ("small", "large")
PLACES = ("at the top left", "at the top", "at the top right", "on the left", "in the center", "on the right",
          "at the bottom left", "at the bottom", "at the bottom right")
GRID_LINES = ("0 1 2 3 4 5 6 7 8 9", "1*1 2*2 3*5 4*8 8*4 16*16 32*32 64*64", "a photo, blurry, low quality, text")


def caption_corpus() -> list[str]:
    """The fixed training corpus: captions and edit instructions about coloured shapes, fixed order."""
    lines = list(GRID_LINES)
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            other = COLOURS[(c + 3) % len(COLOURS)]
            place = PLACES[(c + s) % len(PLACES)]
            size = SIZES[(c + s) % len(SIZES)]
            next_shape = SHAPES[(s + 1) % len(SHAPES)]
            lines += [
                f"a {size} {colour} {shape} {place} and a {other} {next_shape}",
                f"make the {colour} {shape} {other}; move the {shape} {place}",
                f"add a {size} {other} {shape} {place}, on a {colour} background",
                f"remove the {colour} {shape}; a background that is {colour} at the top and {other} at the bottom",
            ]
    return lines


def special_tokens(with_bos: bool) -> list[str]:
    """All special tokens in id order: eos, bos (optional), NextStep's."""
    return [EOS] + ([BOS] if with_bos else []) + NEXTSTEP_SPECIAL_TOKENS


def qwen2_pipeline(tokenizer: Tokenizer) -> None:
    """Give `tokenizer` Qwen2's normaliser, pre-tokenizer and decoder (in place)."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()


def post_processor(tokenizer: Tokenizer, with_bos: bool):
    """BOS inserted before every sequence when with_bos; otherwise Qwen2's (adds nothing)."""
    if not with_bos:
        return processors.ByteLevel(trim_offsets=False)
    bos = (BOS, tokenizer.token_to_id(BOS))
    return processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[bos])


def build_tokenizer(vocab_size: int, with_bos: bool) -> Tokenizer:
    """Train the byte-level BPE on `caption_corpus()`; `vocab_size` counts specials and bytes."""
    tokenizer = Tokenizer(models.BPE())
    qwen2_pipeline(tokenizer)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens(with_bos),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(caption_corpus(), trainer=trainer)
    tokenizer.post_processor = post_processor(tokenizer, with_bos)
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer, with_bos: bool) -> dict:
    """tokenizer_config.json in the layout of the released (Qwen2-based) NextStep folders."""
    added = {
        str(tokenizer.token_to_id(token)): {"content": token, "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False, "special": True}
        for token in special_tokens(with_bos)
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": NEXTSTEP_SPECIAL_TOKENS[1:],
        "bos_token": BOS if with_bos else None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
    }


def special_tokens_map(with_bos: bool) -> dict:
    """special_tokens_map.json: the named special tokens."""
    names = {"eos_token": EOS, "pad_token": PAD, "additional_special_tokens": NEXTSTEP_SPECIAL_TOKENS[1:]}
    if with_bos:
        names["bos_token"] = BOS
    return names


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_tokenizer(folder: str | Path, *, with_bos: bool = False, vocab_size: int = 320) -> Path:
    """Train and save the tiny tokenizer into `folder` (created if needed); returns the folder.

    with_bos: define `<|begin_of_text|>` as BOS and insert it before every tokenised text (when
    special tokens are added). vocab_size: total ids, specials and the 256 bytes included.
    """
    if vocab_size < 256 + len(special_tokens(with_bos)):
        raise NextStepError(f"vocab_size {vocab_size} is too small: the bytes and special tokens need "
                            f"{256 + len(special_tokens(with_bos))}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size, with_bos)
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", tokenizer_config(tokenizer, with_bos))
    write_json(folder / "special_tokens_map.json", special_tokens_map(with_bos))
    return folder


def special_token_ids(folder: str | Path) -> dict[str, int]:
    """{token: id} for every special token of the tokenizer saved in `folder`."""
    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    return {token: tokenizer.token_to_id(token) for token in [EOS, BOS] + NEXTSTEP_SPECIAL_TOKENS
            if tokenizer.token_to_id(token) is not None}
