"""A small Qwen2-style byte-level BPE tokenizer with NextStep's special tokens, for tests and demos.

`write_tiny_tokenizer(folder)` trains it in-process on a fixed caption corpus (deterministic)
and saves the standard Hugging Face files, so `AutoTokenizer.from_pretrained(folder)` loads it
the way it loads the released tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import scenes
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
BOS = "<|begin_of_text|>"
NEXTSTEP_SPECIAL_TOKENS = [
    "[PAD]",
    "<|image_area|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image_placeholder|>",
    "<|begin_of_prompt_refinement|>",
    "<|end_of_prompt_refinement|>",
    "<|begin_of_thinking|>",
    "<|end_of_thinking|>",
]

COLORS = list(scenes.COLORS) + ["purple", "orange", "gray", "pink"]
SHAPES = list(scenes.SHAPES) + ["diamond", "star", "shape"]
PLACES = list(scenes.PLACE_PHRASES.values())


def caption_corpus() -> list[str]:
    """A fixed corpus of captions and edit instructions (ordering fixed: training is deterministic)."""
    lines = []
    for i, color in enumerate(COLORS):
        for j, shape in enumerate(SHAPES):
            place = PLACES[(i + j) % len(PLACES)]
            other = COLORS[(i + 3) % len(COLORS)]
            lines.append(f"a {color} {shape} {place} and a small {other} {SHAPES[(j + 1) % len(SHAPES)]}")
            lines.append(f"make the {color} {shape} {other}; move the {shape} {place}; remove the {color} {shape}")
            lines.append(f"add a large {other} {shape} {place}, on a {color} background")
            lines.append(f"a background that is {color} at the top and {other} at the bottom")
            lines.append(f"move the {color} {shape} to the {scenes.POSITIONS[(i + j) % len(scenes.POSITIONS)]}")
    lines += ["0 1 2 3 4 5 6 7 8 9 * 10*10 16*16 32*32 4*8 8*4", "a photo of a cat, blurry, low quality, text"]
    return lines


def build_tokenizer(vocab_size: int, with_bos: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    special = [EOS] + ([BOS] if with_bos else []) + NEXTSTEP_SPECIAL_TOKENS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(caption_corpus(), trainer=trainer)
    if with_bos:
        bos_id = tokenizer.token_to_id(BOS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def write_tiny_tokenizer(folder: str | Path, *, with_bos: bool = False, vocab_size: int = 320) -> Path:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size, with_bos)
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                              "normalized": False, "single_word": False}
             for t in [EOS] + ([BOS] if with_bos else []) + NEXTSTEP_SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 131072,
        "padding_side": "left",
        "pad_token": "[PAD]",
        "eos_token": EOS,
        "bos_token": BOS if with_bos else None,
        "unk_token": None,
        "add_bos_token": with_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": NEXTSTEP_SPECIAL_TOKENS[1:],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"pad_token": "[PAD]", "eos_token": EOS, "additional_special_tokens": NEXTSTEP_SPECIAL_TOKENS[1:]}
    if with_bos:
        special_map["bos_token"] = BOS
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return folder
