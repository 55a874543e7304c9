"""The tiny tokenizer and the prompt rows (reference sections 6 and 8), pinned id by id.

Every expected row is assembled here from the special-token ids and the ids of text pieces
tokenised on their own, following the reference, never by calling build_prompt_rows.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nextstep_core.checks import check_image_markers
from nextstep_core.demo.tiny_tokenizer import BOS, EOS, NEXTSTEP_SPECIAL_TOKENS, special_token_ids, write_tiny_tokenizer
from nextstep_core.engine.prompt import (
    SPECIAL,
    PromptRows,
    SpecialIds,
    build_prompt_rows,
    check_placeholders,
    guidance_branches,
    load_tokenizer,
)
from nextstep_core.errors import NextStepError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def tok_folder(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="session")
def bos_tok_folder(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok_bos"), with_bos=True)


@pytest.fixture(scope="session")
def tok(tok_folder):
    return load_tokenizer(tok_folder)


@pytest.fixture(scope="session")
def tok_bos(bos_tok_folder):
    return load_tokenizer(bos_tok_folder)


@pytest.fixture(scope="session")
def sp(tok) -> SpecialIds:
    return SpecialIds.from_tokenizer(tok)


def ids(tokenizer, *pieces: str) -> list[int]:
    """Ids of text pieces, each tokenised on its own without special tokens, concatenated."""
    return [i for piece in pieces for i in tokenizer(piece, add_special_tokens=False).input_ids]


def left_pad(texts: list[list[int]], pad: int) -> tuple[list[list[int]], list[list[int]]]:
    """Rows of ids -> (left padded ids, mask) at the longest row's length."""
    width = max(len(t) for t in texts)
    return [[pad] * (width - len(t)) + t for t in texts], [[0] * (width - len(t)) + [1] * len(t) for t in texts]


def expected_rows(texts: list[list[int]], prefix: list[int], pad: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left padded text rows, each followed by the image prefix (mask 1 there)."""
    padded, mask = left_pad(texts, pad)
    return [row + prefix for row in padded], [m + [1] * len(prefix) for m in mask]


def image_prefix(tokenizer, special: SpecialIds, rows: int, cols: int) -> list[int]:
    """`<|image_area|>{rows}*{cols}` then boi, for a tokenizer without BOS."""
    return [special.image_area] + ids(tokenizer, str(rows), "*", str(cols)) + [special.boi]


def image_text(tokenizer, special: SpecialIds, rows: int, cols: int) -> list[int]:
    """The input image's ids in an edit prompt: area, grid, boi, rows*cols placeholders, eoi."""
    return image_prefix(tokenizer, special, rows, cols) + [special.placeholder] * (rows * cols) + [special.eoi]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_loads_as_fast_qwen2_with_left_padding(tok, tok_bos):
    for tokenizer, bos in ((tok, None), (tok_bos, BOS)):
        assert tokenizer.is_fast
        assert type(tokenizer).__name__ == "Qwen2Tokenizer"
        assert tokenizer.pad_token == "[PAD]" and tokenizer.padding_side == "left"
        assert tokenizer.bos_token == bos and tokenizer.eos_token == EOS
        assert 256 < len(tokenizer) < 1000


def test_tiny_tokenizer_special_tokens_are_single_unmerged_ids(tok, tok_bos, tok_folder, bos_tok_folder):
    for tokenizer, folder in ((tok, tok_folder), (tok_bos, bos_tok_folder)):
        table = special_token_ids(folder)
        assert set(NEXTSTEP_SPECIAL_TOKENS + [EOS]) <= set(table)
        assert len(set(table.values())) == len(table)
        for token, token_id in table.items():
            assert tokenizer.convert_tokens_to_ids(token) == token_id
            assert ids(tokenizer, token * 3) == [token_id] * 3
    assert BOS not in special_token_ids(tok_folder) and BOS in special_token_ids(bos_tok_folder)


def test_tiny_tokenizer_bos_is_inserted_only_with_bos(tok, tok_bos):
    bos = tok_bos.convert_tokens_to_ids(BOS)
    assert tok("a red circle").input_ids == ids(tok, "a red circle")
    assert tok_bos("a red circle").input_ids == [bos] + ids(tok_bos, "a red circle")
    assert tok_bos("").input_ids == [bos]
    assert tok.decode(tok("a red circle at 16*16").input_ids) == "a red circle at 16*16"


def test_tiny_tokenizer_is_qwen2_style(tok, tok_folder):
    from tokenizers import Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from nextstep_core.demo.tiny_tokenizer import QWEN2_SPLIT_PATTERN

    assert QWEN2_SPLIT_PATTERN == PRETOKENIZE_REGEX
    saved = Tokenizer.from_file(str(tok_folder / "tokenizer.json"))
    text = "make the red <|image_area|>3*5 square ünïcode 128*64 green"
    assert tok(text).input_ids == saved.encode(text).ids  # the file and the loaded tokenizer agree
    assert ids(tok, "16*16") == ids(tok, "1", "6", "*", "1", "6")  # Qwen2 splits digits one by one


def test_tiny_tokenizer_is_deterministic(tmp_path, tok_folder, bos_tok_folder):
    again = write_tiny_tokenizer(tmp_path / "again")
    for name in TOKENIZER_FILES:
        assert sha256(again / name) == sha256(tok_folder / name)
    script = ("import sys; from nextstep_core.demo.tiny_tokenizer import write_tiny_tokenizer as w; "
              "w(sys.argv[1], with_bos=True)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "other")], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    for name in TOKENIZER_FILES:
        assert sha256(tmp_path / "other" / name) == sha256(bos_tok_folder / name)


def test_tiny_tokenizer_refuses_a_vocab_too_small(tmp_path):
    with pytest.raises(NextStepError, match="vocab_size 100 is too small"):
        write_tiny_tokenizer(tmp_path / "t", vocab_size=100)


# ---------------------------------------------------------------- text-to-image rows


def test_t2i_rows_with_guidance_padding_positive_and_layout(tok, sp):
    captions = ["a red circle", "a small blue square at the top right"]
    rows = build_prompt_rows(tok, captions, token_grid=(3, 5), positive="green", images_per_prompt=2, cfg=7.5)
    cond = [ids(tok, "a red circle", " green"), ids(tok, "a small blue square at the top right", " green")]
    # branch-major: cond of prompt 0 (x2 images), cond of prompt 1 (x2), then the "" negative rows
    texts = [cond[0], cond[0], cond[1], cond[1], [], [], [], []]
    prefix = [sp.image_area] + ids(tok, "3", "*", "5") + [sp.boi]  # rows first: 3*5
    expected_ids, expected_mask = expected_rows(texts, prefix, sp.pad)
    assert rows.input_ids.tolist() == expected_ids
    assert rows.attention_mask.tolist() == expected_mask
    assert rows.input_ids.dtype == torch.long and rows.attention_mask.dtype == torch.long
    assert rows.num_branches == 2 and rows.branches == ["cond", "uncond_text"]
    assert rows.image_rows.tolist() == [False] * 8 and rows.image_rows.dtype == torch.bool
    assert rows.attention_mask[:4, 0].tolist() == [0, 0, 1, 1]  # the shorter caption is left padded
    assert (rows.input_ids[:, -1] == sp.boi).all()


def test_t2i_without_guidance_and_with_a_negative_prompt(tok, sp):
    one = build_prompt_rows(tok, "a red circle", token_grid=(2, 2), cfg=1.0, positive="")
    assert one.input_ids.tolist() == [ids(tok, "a red circle") + image_prefix(tok, sp, 2, 2)]
    assert one.num_branches == 1 and one.branches == ["cond"]
    two = build_prompt_rows(tok, ["a red circle"], token_grid=(4, 1), cfg=3.0, negative="blurry, low quality")
    expected_ids, expected_mask = expected_rows([ids(tok, "a red circle"), ids(tok, "blurry, low quality")],
                                                image_prefix(tok, sp, 4, 1), sp.pad)
    assert two.input_ids.tolist() == expected_ids and two.attention_mask.tolist() == expected_mask


# ---------------------------------------------------------------- BOS (1.0 quirk, 1.1 prepend)


def test_bos_tokenizer_drops_the_prefix_bos_and_pads_after_it(tok_bos):
    sp = SpecialIds.from_tokenizer(tok_bos)
    bos = tok_bos.convert_tokens_to_ids(BOS)
    rows = build_prompt_rows(tok_bos, ["a red circle"], token_grid=(2, 3), cfg=7.5)
    # "<|image_area|>2*3" with special tokens is [bos, image_area, 2, *, 3]: the bos is dropped
    prefix = [sp.image_area] + ids(tok_bos, "2", "*", "3") + [sp.boi]
    expected_ids, expected_mask = expected_rows([[bos] + ids(tok_bos, "a red circle"), [bos]], prefix, sp.pad)
    assert rows.input_ids.tolist() == expected_ids and rows.attention_mask.tolist() == expected_mask


def test_1_1_prepend_bos_gives_two_bos_ids(tok_bos, tok, sp):
    bos = tok_bos.convert_tokens_to_ids(BOS)
    sp_bos = SpecialIds.from_tokenizer(tok_bos)
    rows = build_prompt_rows(tok_bos, ["a red circle"], token_grid=(2, 3), cfg=1.0, prepend_bos=True)
    prefix = [sp_bos.image_area] + ids(tok_bos, "2", "*", "3") + [sp_bos.boi]
    assert rows.input_ids.tolist() == [[bos, bos] + ids(tok_bos, "a red circle") + prefix]
    # without a BOS token, prepend_bos changes nothing
    plain = build_prompt_rows(tok, ["a red circle"], token_grid=(2, 3), cfg=1.0, prepend_bos=True)
    assert plain.input_ids.tolist() == [ids(tok, "a red circle") + image_prefix(tok, sp, 2, 3)]


def test_bos_defined_but_not_inserted_still_drops_the_first_prefix_id(tok_folder, sp):
    """The authors drop the first prefix id whenever a BOS token is DEFINED: here <|image_area|>."""
    quirky = load_tokenizer(tok_folder)
    quirky.bos_token = EOS
    assert quirky("a red circle").input_ids == ids(quirky, "a red circle")  # nothing inserted
    rows = build_prompt_rows(quirky, ["a red circle"], token_grid=(2, 3), cfg=1.0)
    assert rows.input_ids.tolist() == [ids(quirky, "a red circle", "2", "*", "3") + [sp.boi]]


# ---------------------------------------------------------------- editing


def test_edit_rows_three_branches(tok, sp):
    captions = ["<image> make the circle green", "now <image> add a star"]
    rows = build_prompt_rows(tok, captions, token_grid=(3, 5), edit_grid=(2, 3), cfg=7.5, cfg_img=2.0,
                             negative="blurry")
    image = image_text(tok, sp, 2, 3)
    cond = [image + ids(tok, " make the circle green"), ids(tok, "now ") + image + ids(tok, " add a star")]
    with_image = image + ids(tok, "blurry")
    texts = cond + [with_image, with_image] + [ids(tok, "blurry")] * 2
    expected_ids, expected_mask = expected_rows(texts, image_prefix(tok, sp, 3, 5), sp.pad)
    assert rows.input_ids.tolist() == expected_ids
    assert rows.attention_mask.tolist() == expected_mask
    assert rows.num_branches == 3 and rows.branches == ["cond", "uncond_text", "uncond_image"]
    assert rows.image_rows.tolist() == [True, True, True, True, False, False]
    assert (rows.input_ids == sp.placeholder).sum(dim=1).tolist() == [6, 6, 6, 6, 0, 0]
    for row in rows.input_ids[:4]:
        eoi_at = (row == sp.eoi).nonzero().item()
        assert row[eoi_at - 7].item() == sp.boi and row[eoi_at - 6: eoi_at].tolist() == [sp.placeholder] * 6


@pytest.mark.parametrize("cfg, cfg_img, branches, with_image", [
    (7.5, 1.0, ["cond", "uncond_text"], True),
    (1.0, 2.0, ["cond", "uncond_image"], False),
])
def test_edit_rows_two_branches(tok, sp, cfg, cfg_img, branches, with_image):
    rows = build_prompt_rows(tok, ["<image> add a square"], token_grid=(2, 2), edit_grid=(1, 2), cfg=cfg,
                             cfg_img=cfg_img, negative="dark", images_per_prompt=2)
    image = image_text(tok, sp, 1, 2)
    second = (image if with_image else []) + ids(tok, "dark")
    texts = [image + ids(tok, " add a square")] * 2 + [second] * 2
    expected_ids, expected_mask = expected_rows(texts, image_prefix(tok, sp, 2, 2), sp.pad)
    assert rows.input_ids.tolist() == expected_ids and rows.attention_mask.tolist() == expected_mask
    assert rows.branches == branches and rows.num_branches == 2
    assert rows.image_rows.tolist() == [True, True, with_image, with_image]


def test_edit_rows_one_branch_with_positive(tok, sp):
    rows = build_prompt_rows(tok, ["<image> add a square"], token_grid=(2, 2), edit_grid=(2, 2), cfg=1.0,
                             cfg_img=1.0, positive="sharp")
    expected = image_text(tok, sp, 2, 2) + ids(tok, " add a square", " sharp") + image_prefix(tok, sp, 2, 2)
    assert rows.input_ids.tolist() == [expected]
    assert rows.branches == ["cond"] and rows.image_rows.tolist() == [True]


def test_guidance_branch_names():
    assert guidance_branches(False, 7.5, 2.0) == ["cond", "uncond_text"]
    assert guidance_branches(False, 1.0, 2.0) == ["cond"]
    assert guidance_branches(True, 7.5, 2.0) == ["cond", "uncond_text", "uncond_image"]
    assert guidance_branches(True, 1.0, 1.0) == ["cond"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(captions=["make it green"], edit_grid=(2, 2)),
     "an input image was given but the edit prompt has no `<image>` marker"),
    (dict(captions=["<image> and <image>"], edit_grid=(2, 2)),
     "the edit prompt has 2 `<image>` markers; use exactly one"),
    (dict(captions=["<image> hi"]), "the prompt has an `<image>` marker but no input image was given"),
    (dict(captions=[]), "no prompt given"),
    (dict(captions=["x"], images_per_prompt=0), "number of images 0 must be a whole number >= 1"),
    (dict(captions=["x"], token_grid=(0, 4)), r"token grid of the image to generate \(0, 4\) must be"),
    (dict(captions=["x"], token_grid=(2, -1)), r"token grid of the image to generate \(2, -1\) must be"),
    (dict(captions=["<image>"], edit_grid=(3, 0)), r"token grid of the input image \(3, 0\) must be"),
    (dict(captions=["x"], negative="no <image>"), "the negative prompt has an `<image>` marker"),
    (dict(captions=["<image>"], edit_grid=(1, 1), positive="<image>"), "the positive prompt has an `<image>` marker"),
])
def test_prompt_errors(tok, kwargs, message):
    kwargs = dict(token_grid=(2, 2)) | kwargs
    with pytest.raises(NextStepError, match=message):
        build_prompt_rows(tok, kwargs.pop("captions"), **kwargs)


def test_marker_check():
    check_image_markers(["a <image> b"], editing=True)
    check_image_markers(["a b"], editing=False, negative="c", positive="d")
    with pytest.raises(NextStepError, match="has 3 `<image>` markers"):
        check_image_markers(["<image> x", "<image>" * 3], editing=True)


def test_merged_placeholders_are_refused():
    input_ids = torch.tensor([[5, 5, 5], [1, 2, 3]])
    check_placeholders(input_ids, torch.tensor([True, False]), 5, (1, 3))
    with pytest.raises(NextStepError, match="is it NextStep's tokenizer"):
        check_placeholders(input_ids, torch.tensor([True, False]), 5, (2, 2))


def test_load_tokenizer_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    message = r"model folder .* has no tokenizer \(tokenizer.json / tokenizer_config.json\)"
    with pytest.raises(NextStepError, match=message):
        load_tokenizer(tmp_path)


def test_load_tokenizer_names_missing_special_tokens(tmp_path, tok_folder):
    renamed = {SPECIAL["placeholder"]: "<|image_slot|>", SPECIAL["eoi"]: "<|image_stop|>"}
    for name in TOKENIZER_FILES:
        text = (tok_folder / name).read_text()
        for old, new in renamed.items():
            text = text.replace(old, new)
        (tmp_path / name).write_text(text)
    message = r"lacks NextStep's special tokens <\|end_of_image\|>, <\|image_placeholder\|>"
    with pytest.raises(NextStepError, match=message):
        load_tokenizer(tmp_path)


def test_prompt_rows_type():
    rows = PromptRows(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), 2,
                      torch.zeros(2, dtype=torch.bool), ["cond", "uncond_text"])
    assert rows.num_branches == 2
    with pytest.raises(ValueError):
        PromptRows(rows.input_ids, rows.attention_mask, 3, rows.image_rows, ["cond"])
