"""Generation on tiny checkpoints: sizes, seeds, batches, editing, the KV cache, progress, errors."""

import pytest
import torch
from bounds import assert_float64_agree, assert_layer_normalised, float64_rotary_tables, in_float64
from PIL import Image

import nextstep_core.sampling.token_step as token_step
from nextstep_core.errors import NextStepError
from nextstep_core.pipeline import GenerationInterrupted
from nextstep_core.sampling.samplers import normalize_token

FAST = dict(steps=3)


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
def test_non_square_sizes(pipe_name, request):
    pipe = request.getfixturevalue(pipe_name)
    result = pipe.generate("a red circle on the left", width=48, height=32, **FAST)
    assert result.token_grid == (2, 3)
    assert result.tokens.shape == (1, 6, 64)
    assert result.latents.shape == (1, 16, 4, 6)
    assert result.images.shape == (1, 32, 48, 3)
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert result.to_pil()[0].size == (48, 32)


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
def test_seed_reproduces_and_different_seed_differs(pipe_name, request):
    pipe = request.getfixturevalue(pipe_name)
    a = pipe.generate("a blue square", width=32, height=32, seed=5, **FAST).images
    b = pipe.generate("a blue square", width=32, height=32, seed=5, **FAST).images
    c = pipe.generate("a blue square", width=32, height=32, seed=6, **FAST).images
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_generation_leaves_the_global_rng_alone(pipe_1_1):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    pipe_1_1.generate("a circle", width=32, height=32, **FAST)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_1_0_use_norm_tokens_are_normalised(pipe_1_0, monkeypatch):
    """Each token has mean 0 and variance 1 within the float32 rounding of a layer norm of the
    sampled (raw) token's 64 numbers (bounds.layer_norm_statistics_bounds), recorded on the way."""
    sampled = []
    monkeypatch.setattr(token_step, "normalize_token", lambda token: sampled.append(token) or normalize_token(token))
    tokens = pipe_1_0.generate("a circle", width=32, height=32, **FAST).tokens[0]
    monkeypatch.undo()
    assert len(sampled) == 4
    assert_layer_normalised(tokens, torch.cat(sampled), dim=-1)
    raw = pipe_1_0.generate("a circle", width=32, height=32, use_norm=False, **FAST).tokens[0]
    assert (raw.var(-1, unbiased=False) - 1).abs().max() > 1e-2


def test_1_0_batch_rows_equal_single_prompt_runs(pipe_1_0):
    prompts = ["a red circle", "a small green triangle at the top right of the image"]
    # Left padding shifts the padded row's positions; RoPE is relative and padded keys add exact
    # zeros, so only the rounding differs: in float64 (rotary tables included) the tokens agree to
    # bounds.FLOAT64_AGREEMENT (1e-9 of their size), while an absolute position or an unmasked pad
    # moves them by O(0.1).
    with in_float64(pipe_1_0.model), float64_rotary_tables(pipe_1_0.model):
        batch = pipe_1_0.generate(prompts, width=32, height=32, num_images=2, seed=3, **FAST)
        singles = [pipe_1_0.generate(prompt, width=32, height=32, num_images=2, seed=3, **FAST) for prompt in prompts]
    assert batch.images.shape[0] == 4
    for p, single in enumerate(singles):
        assert_float64_agree(batch.tokens[2 * p: 2 * p + 2], single.tokens)
    # 1.0 shares each image index's noise across prompts, but the images of one prompt differ
    assert (batch.tokens[0] - batch.tokens[1]).abs().max() > 1e-3


def test_1_1_draws_one_noise_row_per_image(pipe_1_1):
    # 1.1 draws (images, 64) per draw, no sharing across prompts: the same prompt twice in one
    # batch gives two different images, and the batch's first image starts from the single
    # run's initial noise (the first 64 numbers of the stream) but not its later draws.
    # In float64 the first token of the batch and of the single run differ only in rounding
    # (batch size 2 vs 1): bounds.FLOAT64_AGREEMENT.
    with in_float64(pipe_1_1.model):
        kw = dict(width=32, height=32, seed=3, sampler="ode", **FAST)
        batch = pipe_1_1.generate(["a red circle", "a red circle"], **kw)
        single = pipe_1_1.generate("a red circle", **kw)
    assert (batch.tokens[0] - batch.tokens[1]).abs().max() > 1e-3
    assert_float64_agree(batch.tokens[0, 0], single.tokens[0, 0])
    assert (batch.tokens[0, 1] - single.tokens[0, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
def test_kv_cached_loop_matches_a_full_forward(pipe_name, request, monkeypatch):
    """The conditions used for each token equal a cache-free forward over the whole sequence.
    Both in float64: the same formulas in another order (the cache's one query row against all
    of them), so they agree to bounds.FLOAT64_AGREEMENT; a wrong cache slot or position, O(0.1)."""
    pipe = request.getfixturevalue(pipe_name)
    pipe.model.double()
    request.addfinalizer(pipe.model.float)
    seen = []
    original = pipe.model.head_condition

    def recording(hidden, k):
        seen.append(hidden.clone())
        return original(hidden, k)

    monkeypatch.setattr(pipe.model, "head_condition", recording)
    result = pipe.generate(["a red circle", "two blue squares"], width=32, height=32, cfg=3.0, **FAST)
    monkeypatch.undo()

    from nextstep_core.engine.prompt import build_prompt_rows

    rows = build_prompt_rows(pipe.tokenizer, ["a red circle", "two blue squares"], token_grid=(2, 2), cfg=3.0,
                             prepend_bos=pipe.version.prepend_bos)
    embeds = pipe.model.backbone.embed_tokens(rows.input_ids)
    image_embeds = pipe.model.image_in_projector(result.tokens).repeat(2, 1, 1)  # both branches
    sequence = torch.cat([embeds, image_embeds[:, :-1]], dim=1)
    mask = torch.cat([rows.attention_mask, torch.ones(4, 3, dtype=torch.long)], dim=1)
    positions = torch.arange(sequence.shape[1]).expand(4, -1)
    with torch.no_grad():
        full = pipe.model.backbone(inputs_embeds=sequence, attention_mask=mask,
                                   position_ids=positions).last_hidden_state
    length = rows.input_ids.shape[1]
    for k, hidden in enumerate(seen):
        assert_float64_agree(hidden, full[:, length - 1 + k])


def test_editing_three_branches_and_dependence_on_the_image(pipe_1_0):
    red = Image.new("RGB", (48, 32), (220, 30, 30))
    blue = Image.new("RGB", (48, 32), (30, 30, 220))
    a = pipe_1_0.generate("<image> make it green", image=red, seed=1, **FAST)
    assert a.images.shape == (1, 32, 48, 3)  # the output takes the input's size
    b = pipe_1_0.generate("<image> make it green", image=blue, seed=1, **FAST)
    assert (a.tokens - b.tokens).abs().max() > 1e-4
    again = pipe_1_0.generate("<image> make it green", image=red, seed=1, **FAST)
    assert torch.equal(a.images, again.images)
    resized = pipe_1_0.generate("<image> make it green", image=red, width=32, height=32, seed=1, **FAST)
    assert resized.images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("cfg,cfg_img", [(3.0, 2.0), (3.0, 1.0), (1.0, 2.0), (1.0, 1.0)])
def test_editing_guidance_variants_run(pipe_1_1, cfg, cfg_img):
    image = Image.new("RGB", (32, 32), (10, 200, 10))
    result = pipe_1_1.generate("<image> add a circle", image=image, cfg=cfg, cfg_img=cfg_img, **FAST)
    assert result.images.shape == (1, 32, 32, 3)


def test_progress_callback_once_per_token_and_stop(pipe_1_1):
    calls = []
    pipe_1_1.generate("a circle", width=48, height=32,
                      callback=lambda d, t, tok: calls.append((d, t, tok.shape)), **FAST)
    assert calls == [(k, 6, (1, k, 64)) for k in range(1, 7)]
    with pytest.raises(GenerationInterrupted, match="stopped after 2 of 6 tokens"):
        pipe_1_1.generate("a circle", width=48, height=32, callback=lambda d, t, tok: d < 2, **FAST)


def test_samplers_all_run(pipe_1_1):
    outs = {}
    for sampler in ("euler_maruyama", "sde", "cps", "ode"):
        outs[sampler] = pipe_1_1.generate("a circle", width=32, height=32, sampler=sampler, seed=2, **FAST).tokens
    assert len({tuple(t.flatten().tolist()[:4]) for t in outs.values()}) == 4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(width=1000, height=256), "width 1000 is not a multiple of 16"),
        (dict(width=256, height=250), "height 250 is not a multiple of 16"),
        (dict(width=0, height=256), "width 0 must be a positive whole number of pixels"),
        (dict(width=-32, height=256), "width -32 must be a positive whole number of pixels"),
        (dict(width=32, height=32, cfg=0.5), "cfg 0.5 must be >= 1"),
        (dict(width=32, height=32, cfg_img=0.0), "cfg_img 0.0 must be >= 1"),
        (dict(width=32, height=32, steps=0), "steps 0 must be a whole number >= 1"),
        (dict(width=32, height=32, num_images=0), "number of images 0 must be a whole number >= 1"),
        (dict(width=32, height=32, sampler="rk4"), "sampler 'rk4' is not one of"),
        (dict(width=32, height=32, cfg_schedule="cosine"), "cfg schedule 'cosine' is not one of constant, linear"),
    ],
)
def test_bad_settings(pipe_1_1, kwargs, message):
    with pytest.raises(NextStepError, match=message):
        pipe_1_1.generate("a circle", **kwargs)


def test_too_many_tokens(pipe_1_0, pipe_1_1):
    with pytest.raises(NextStepError,
                       match="image size 528x528 needs 1089 image tokens; this model's position table covers 1024"):
        pipe_1_0.generate("a circle", width=528, height=528)
    # the tiny 1.1 model allows 2048 positions
    with pytest.raises(NextStepError,
                       match="image size 1024x768 needs 3072 image tokens plus .* the model's positions allow 2048"):
        pipe_1_1.generate("a circle", width=1024, height=768)


def test_edit_marker_errors(pipe_1_0):
    image = Image.new("RGB", (32, 32))
    with pytest.raises(NextStepError, match="an input image was given but the edit prompt has no `<image>` marker"):
        pipe_1_0.generate("make it green", image=image)
    with pytest.raises(NextStepError, match="the edit prompt has 2 `<image>` markers; use exactly one"):
        pipe_1_0.generate("<image> and <image>", image=image)
    with pytest.raises(NextStepError, match="the prompt has an `<image>` marker but no input image was given"):
        pipe_1_0.generate("<image> make it green", width=32, height=32)
    with pytest.raises(NextStepError, match="width 40 is not a multiple of 16"):
        pipe_1_0.generate("<image> make it green", image=Image.new("RGB", (40, 32)))
