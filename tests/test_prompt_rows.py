"""The token rows of text-to-image and edit prompts, pinned id by id.

Expected sequences are assembled here from the ids of separately tokenised pieces and the
special-token ids, following the reference's section 6, not by calling build_prompt_rows.
"""

import pytest
import torch

from nextstep_core.demo.tiny_tokenizer import write_tiny_tokenizer
from nextstep_core.engine.prompt import SpecialIds, build_prompt_rows, load_tokenizer
from nextstep_core.errors import NextStepError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok_bos(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tokbos"), with_bos=True))


def ids(tokenizer, text):
    """Plain ids of a text piece, no special tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids


def left_pad(rows, pad):
    width = max(len(r) for r in rows)
    return [[pad] * (width - len(r)) + r for r in rows], [[0] * (width - len(r)) + [1] * len(r) for r in rows]


def test_special_tokens_are_single_ids(tok):
    sp = SpecialIds.from_tokenizer(tok)
    assert len({sp.pad, sp.image_area, sp.boi, sp.eoi, sp.placeholder}) == 5
    assert ids(tok, "<|image_placeholder|>" * 6) == [sp.placeholder] * 6
    assert tok.bos_token is None


def test_text_to_image_rows_with_guidance_padding_and_positive(tok):
    sp = SpecialIds.from_tokenizer(tok)
    captions = ["a red circle", "a small blue square at the top right"]
    rows = build_prompt_rows(tok, captions, token_grid=(3, 5), positive="green", negative=None,
                             images_per_prompt=2, cfg=7.5)
    prefix = [sp.image_area] + ids(tok, "3*5") + [sp.boi]
    texts = ([ids(tok, "a red circle green")] * 2 + [ids(tok, "a small blue square at the top right green")] * 2
             + [[]] * 4)
    expected_ids, expected_mask = left_pad(texts, sp.pad)
    expected_ids = [r + prefix for r in expected_ids]
    expected_mask = [m + [1] * len(prefix) for m in expected_mask]
    assert rows.input_ids.tolist() == expected_ids
    assert rows.attention_mask.tolist() == expected_mask
    assert rows.branches == ["cond", "uncond_text"]
    assert rows.image_rows.tolist() == [False] * 8
    assert rows.input_ids.shape == (8, len(expected_ids[0]))
    # the positive suffix joins with one space, and every row ends with boi
    assert (rows.input_ids[:, -1] == sp.boi).all()


def test_no_guidance_gives_one_branch_and_negative_text_is_used(tok):
    sp = SpecialIds.from_tokenizer(tok)
    one = build_prompt_rows(tok, ["a red circle"], token_grid=(2, 2), cfg=1.0)
    assert one.branches == ["cond"] and one.input_ids.shape[0] == 1
    two = build_prompt_rows(tok, ["a red circle"], token_grid=(2, 2), cfg=3.0, negative="blurry")
    neg = two.input_ids[1][two.attention_mask[1].bool()].tolist()
    assert neg == ids(tok, "blurry") + [sp.image_area] + ids(tok, "2*2") + [sp.boi]


def test_bos_tokenizer_drops_the_prefix_first_id_and_1_1_prepends_bos(tok_bos):
    sp = SpecialIds.from_tokenizer(tok_bos)
    bos = tok_bos.convert_tokens_to_ids(tok_bos.bos_token)
    # the prefix "<|image_area|>2*3" tokenised with special tokens is [bos, image_area, ...]: bos dropped
    rows = build_prompt_rows(tok_bos, ["a red circle"], token_grid=(2, 3), cfg=1.0)
    assert rows.input_ids[0].tolist() == ([bos] + ids(tok_bos, "a red circle") + [sp.image_area]
                                          + ids(tok_bos, "2*3") + [sp.boi])
    # 1.1: the BOS string is prepended and the tokenizer adds its own: two BOS ids
    rows11 = build_prompt_rows(tok_bos, ["a red circle"], token_grid=(2, 3), cfg=1.0, prepend_bos=True)
    assert rows11.input_ids[0].tolist()[:2] == [bos, bos]
    assert rows11.input_ids[0].tolist()[2:] == rows.input_ids[0].tolist()[1:]


def test_bos_defined_but_not_inserted_drops_the_image_area_id(tok, tmp_path):
    """The reference drops the first prefix id whenever a BOS token is DEFINED, inserted or not."""
    import copy

    sp = SpecialIds.from_tokenizer(tok)
    quirky = copy.deepcopy(tok)
    quirky.bos_token = "<|endoftext|>"  # defined, but the post-processor inserts nothing
    rows = build_prompt_rows(quirky, ["a red circle"], token_grid=(2, 3), cfg=1.0)
    assert rows.input_ids[0].tolist() == ids(tok, "a red circle") + ids(tok, "2*3") + [sp.boi]


def test_edit_rows_three_branches(tok):
    sp = SpecialIds.from_tokenizer(tok)
    rows = build_prompt_rows(tok, ["<image> make the circle green"], token_grid=(2, 3), edit_grid=(2, 2),
                             cfg=7.5, cfg_img=2.0, negative="blurry")
    image = [sp.image_area] + ids(tok, "2*2") + [sp.boi] + [sp.placeholder] * 4 + [sp.eoi]
    prefix = [sp.image_area] + ids(tok, "2*3") + [sp.boi]
    texts = [image + ids(tok, " make the circle green"), image + ids(tok, "blurry"), ids(tok, "blurry")]
    expected_ids, expected_mask = left_pad(texts, sp.pad)
    assert rows.input_ids.tolist() == [r + prefix for r in expected_ids]
    assert rows.attention_mask.tolist() == [m + [1] * len(prefix) for m in expected_mask]
    assert rows.branches == ["cond", "uncond_text", "uncond_image"]
    assert rows.image_rows.tolist() == [True, True, False]
    assert (rows.input_ids == sp.placeholder).sum(dim=1).tolist() == [4, 4, 0]
    eoi_at = (rows.input_ids[0] == sp.eoi).nonzero().item()
    assert rows.input_ids[0, eoi_at - 4: eoi_at].tolist() == [sp.placeholder] * 4


@pytest.mark.parametrize("cfg,cfg_img,branches,image_rows", [
    (7.5, 1.0, ["cond", "uncond_text"], [True, True]),
    (1.0, 2.0, ["cond", "uncond_image"], [True, False]),
    (1.0, 1.0, ["cond"], [True]),
])
def test_edit_two_and_one_branch_variants(tok, cfg, cfg_img, branches, image_rows):
    rows = build_prompt_rows(tok, ["<image> add a square"], token_grid=(2, 2), edit_grid=(2, 2), cfg=cfg,
                             cfg_img=cfg_img)
    assert rows.branches == branches
    assert rows.image_rows.tolist() == image_rows


def test_prompt_errors(tok):
    with pytest.raises(NextStepError, match="an input image was given but the edit prompt has no `<image>` marker"):
        build_prompt_rows(tok, ["make it green"], token_grid=(2, 2), edit_grid=(2, 2))
    with pytest.raises(NextStepError, match="the edit prompt has 2 `<image>` markers; use exactly one"):
        build_prompt_rows(tok, ["<image><image>"], token_grid=(2, 2), edit_grid=(2, 2))
    with pytest.raises(NextStepError, match="the prompt has an `<image>` marker but no input image was given"):
        build_prompt_rows(tok, ["<image> hi"], token_grid=(2, 2))
    with pytest.raises(NextStepError, match="no prompt given"):
        build_prompt_rows(tok, [], token_grid=(2, 2))
    with pytest.raises(NextStepError, match="number of images 0 must be a whole number >= 1"):
        build_prompt_rows(tok, ["x"], token_grid=(2, 2), images_per_prompt=0)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(NextStepError, match="has no tokenizer"):
        load_tokenizer(tmp_path)
    import json

    folder = write_tiny_tokenizer(tmp_path / "t")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|image_placeholder|>"]
    data["model"]["vocab"].pop("<|image_placeholder|>", None)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                      if v["content"] != "<|image_placeholder|>"}
    config["additional_special_tokens"] = [t for t in config["additional_special_tokens"]
                                           if t != "<|image_placeholder|>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").unlink()
    with pytest.raises(NextStepError, match=r"lacks NextStep's special tokens <\|image_placeholder\|>"):
        load_tokenizer(folder)


def test_batch_padding_is_left(tok):
    rows = build_prompt_rows(tok, ["a", "a red circle on the left"], token_grid=(1, 1), cfg=1.0)
    assert rows.attention_mask[0, 0] == 0 and rows.attention_mask[1, 0] == 1
    assert torch.equal(rows.attention_mask[:, -3:], torch.ones(2, 3, dtype=rows.attention_mask.dtype))
