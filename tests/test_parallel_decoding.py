"""Next-set decoding and annealed head steps (sampling/parallel.py, parallel_schedule.py).

- parallel_window 0 (head_steps_floor None) never enters the new code: the sequential loop as it was;
- w >= W is one query per pass in raster order, so the tokens are the sequential static-cache
  loop's bit for bit (no head is batched across rows at all), 1.0 and 1.1, text-to-image and
  edit, with guidance; against the default growing-cache loop within float64 rounding;
- w < W against an independent oracle that recomputes every token from scratch with a full
  decoder forward over exactly the context the schedule defines (float64, 1e-9 of the tokens'
  size: what separates batched from one-at-a-time arithmetic there is summation order, ~1e-16
  per operation; a wrong mask column, slot, position or head row moves tokens by O(0.1));
- the masks against the closed form, the forward-pass formula on square and non-square grids,
  given tokens, the RNG order, progress/interrupt, the recorded replay, the annealed schedule.
"""

import copy

import pytest
import torch
from bounds import assert_float64_agree, in_float64
from PIL import Image

import nextstep_core.sampling.parallel as parallel
import nextstep_core.sampling.token_loop as token_loop
from nextstep_core.engine.prompt import build_prompt_rows
from nextstep_core.errors import NextStepError
from nextstep_core.pipeline import GenerationInterrupted
from nextstep_core.sampling.graphs import RecordedGraph
from nextstep_core.sampling.guidance import guidance_scales
from nextstep_core.sampling.parallel_schedule import (
    annealed_steps,
    decision_step,
    effective_window,
    pass_visibility,
    plan_passes,
    predicted_forward_passes,
)
from nextstep_core.sampling.reference_loop import sample_token
from nextstep_core.sampling.samplers import normalize_token, prepare_sampler
from nextstep_core.sampling.settings import SamplerSettings
from nextstep_core.sampling.token_step import count_noise_draws

PROMPTS = ["a red circle", "two blue squares at the top"]
SOURCE = Image.new("RGB", (64, 48), (200, 40, 40))
T2I = dict(width=64, height=48, num_images=2, steps=3, seed=5, cfg=4.0, cfg_schedule="linear", decode=False)
EDIT = dict(image=SOURCE, steps=3, seed=3, cfg=5.0, cfg_img=2.0, num_images=2, decode=False)
CASES = [("t2i", PROMPTS, T2I), ("edit", "<image> make it blue", EDIT)]  # both on a 3 x 4 token grid


def test_window_zero_never_enters_next_set_decoding(pipe_1_1, monkeypatch):
    plain = pipe_1_1.generate(PROMPTS, **T2I)
    monkeypatch.setattr(token_loop, "decode_tokens_parallel", lambda *a, **k: pytest.fail("parallel path used"))
    zero = pipe_1_1.generate(PROMPTS, parallel_window=0, head_steps_floor=None, **T2I)
    assert torch.equal(plain.tokens, zero.tokens)
    assert (zero.forward_passes, zero.head_evaluations) == (11, 12 * 3)


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
@pytest.mark.parametrize("name,prompt,kw", CASES)
def test_full_window_gives_the_sequential_tokens_bit_for_bit(pipe_name, name, prompt, kw, request):
    """w >= W (4 here): one query per pass in raster order, the same slots, mask columns, noise
    blocks and head shapes as the sequential loop's static-cache step, hence its very bits."""
    pipe = request.getfixturevalue(pipe_name)
    for options in (dict(exact=False), dict(graph="on")):  # the static-cache sequential paths
        sequential = pipe.generate(prompt, **options, **kw)
        for window in (4, 9):
            result = pipe.generate(prompt, parallel_window=window, **options, **kw)
            assert torch.equal(result.tokens, sequential.tokens), (options, window)
            assert result.forward_passes == sequential.forward_passes == 11
            assert result.head_evaluations == sequential.head_evaluations == 12 * 3


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
@pytest.mark.parametrize("name,prompt,kw", CASES)
def test_full_window_equals_the_default_loop_in_float64(pipe_name, name, prompt, kw, request):
    """Against the default loop (growing cache): the slot cache attends over every slot with the
    unwritten ones masked, which adds exact zeros, so only summation order differs."""
    pipe = request.getfixturevalue(pipe_name)
    with in_float64(pipe.model, pipe.image_tokenizer):
        sequential = pipe.generate(prompt, **kw).tokens
        full = pipe.generate(prompt, parallel_window=4, **kw).tokens
    assert_float64_agree(full, sequential)


def context(slot: int, cols: int, window: int) -> set[int]:
    """The closed form: token `slot` is sampled seeing the earlier slots decided at earlier steps."""
    return {s for s in range(slot) if decision_step(s, cols, window) < decision_step(slot, cols, window)}


@pytest.mark.parametrize("grid", [(3, 4), (4, 3), (2, 5), (5, 1), (1, 4), (6, 6)])
@pytest.mark.parametrize("row_start", ["copy", "above", "masked"])
def test_masks_passes_and_feeds_follow_the_closed_form(grid, row_start):
    rows, cols = grid
    n = rows * cols
    for window in range(0, cols + 2):
        w = effective_window(window, cols)
        passes = plan_passes(grid, window, [False] * n, row_start)
        assert len(passes) == predicted_forward_passes(grid, window) == (rows - 1) * w + cols - 1
        filled = torch.zeros(n, dtype=torch.bool)
        sampled, fed = [0], []
        for plan in passes:
            after, visible = pass_visibility(filled, plan.queries, row_start)
            for query, seen in zip(plan.queries, visible):
                if query.sample is not None:
                    want = context(query.sample, cols, w) | ({query.slot} if query.placeholder and
                                                             row_start != "masked" else set())
                    assert set(seen.nonzero().flatten().tolist()) == want, (window, plan.step, query)
                    assert query.slot == query.sample - 1
                if not query.placeholder:
                    fed.append(query.slot)
            assert sorted(plan.sampled) == list(plan.decided)
            sampled += plan.sampled
            filled = after
        assert sorted(sampled) == list(range(n))  # every token sampled once
        assert sorted(fed) == list(range(n - 1))  # every token but the last written once, for real
        assert not any(q.placeholder for p in passes for q in p.queries) or w < cols


def test_forward_passes_on_square_and_non_square_grids(pipe_1_1):
    for width, height in ((64, 48), (32, 64), (64, 64)):
        cols, rows = width // 16, height // 16
        for window in (1, 2, 3):
            result = pipe_1_1.generate("a red circle", width=width, height=height, steps=2, parallel_window=window,
                                       decode=False)
            assert result.forward_passes == (rows - 1) * min(window, cols) + cols - 1
            assert result.head_evaluations == rows * cols * 2


def oracle_tokens(pipe, prompts, kw, window, row_start, floor=None):
    """Every token from scratch: for slot s, one decoder forward (over the prefill's cache, copied)
    of every earlier token at its raster position, each seeing the earlier slots decided no
    later than itself, and then s's query (the real token s - 1, or at a row start before the
    row above is done the placeholder: a copy of the row above's newest token or of the token
    right above seeing itself, or a zero input that does not), seeing the slots decided before
    step t(s). With a floor (annealed head steps), s takes the steps of the latest slot decided
    at its step, using the first of the noise blocks drawn, in raster order, for its own steps."""
    model, version = pipe.model, pipe.version
    cols, rows = kw["width"] // 16, kw["height"] // 16
    n, w = rows * cols, effective_window(window, cols)
    step = [decision_step(s, cols, w) for s in range(n)]
    prompt_rows = build_prompt_rows(pipe.tokenizer, prompts, token_grid=(rows, cols),
                                    images_per_prompt=kw["num_images"], cfg=kw["cfg"], prepend_bos=version.prepend_bos)
    hidden, cache, prompt_mask = pipe.prefill(prompt_rows, None)
    branches, length = prompt_rows.branches, prompt_mask.shape[1]
    images = len(prompts) * kw["num_images"]
    settings = pipe.sampler_settings(steps=kw["steps"])
    generator = torch.Generator().manual_seed(kw["seed"])
    shared = version.shared_noise_across_prompts
    state_dtype = torch.float32 if version.noise_in_float32 else pipe.dtype

    def sampler_of(steps):
        return prepare_sampler(SamplerSettings(settings.name, steps, settings.shift, settings.noise_level))

    def draw():
        block = torch.randn((kw["num_images"] if shared else images, 64), generator=generator, dtype=state_dtype)
        return block.repeat(len(prompts), 1) if shared else block

    own = [annealed_steps(s, n, kw["steps"], floor) for s in range(n)]
    taken = [min(own[t] for t in range(n) if step[t] == step[s]) for s in range(n)]  # the pass's latest slot
    blocks = [[draw() for _ in range(count_noise_draws(sampler_of(own[s])))] for s in range(n)]

    tokens = torch.zeros(images, n, 64, dtype=pipe.dtype)
    for s in range(n):
        if s:
            placeholder = s % cols == 0 and step[s - 1] >= step[s]
            inputs = [tokens[:, k] for k in range(s - 1)]
            if placeholder:
                newest = (s // cols - 1) * cols + step[s] - 1 - (s // cols - 1) * w
                source = {"copy": newest, "above": s - cols, "masked": None}[row_start]
                inputs.append(torch.zeros_like(tokens[:, 0]) if source is None else tokens[:, source])
            else:
                inputs.append(tokens[:, s - 1])
            q = len(inputs)
            embed = torch.stack([model.image_in_projector(x) for x in inputs], 1).repeat(len(branches), 1, 1)
            mask = torch.zeros(prompt_mask.shape[0], 1, q, length + q, dtype=torch.bool)
            mask[:, 0, :, :length] = prompt_mask.bool()[:, None]
            for i in range(q):
                for j in range(q):
                    if i == q - 1 and placeholder:
                        mask[:, 0, i, length + j] = step[j] < step[s] or (j == i and row_start != "masked")
                    else:
                        mask[:, 0, i, length + j] = j <= i and step[j] <= step[i]
            positions = (length + torch.arange(q)).expand(prompt_mask.shape[0], -1)
            out = model.backbone(inputs_embeds=embed, attention_mask={"full_attention": mask}, position_ids=positions,
                                 cache=copy.deepcopy(cache), use_cache=True)
            hidden = out.last_hidden_state[:, -1]
        cfg, _ = guidance_scales(s, n, kw["cfg"], 1.0, kw["cfg_schedule"], version.rising_linear_schedule)
        drawn = iter(blocks[s])
        token = sample_token(model.image_head.net, model.head_condition(hidden, s), branches=branches, cfg=cfg,
                             cfg_img=1.0, sampler=sampler_of(taken[s]), noise=drawn.__next__,
                             state_dtype=state_dtype)
        tokens[:, s] = normalize_token(token) if pipe.version.use_norm else token
    return tokens


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("row_start", ["copy", "above", "masked"])
def test_rows_in_parallel_equal_the_from_scratch_oracle_in_float64(pipe_name, window, row_start, request,
                                                                   monkeypatch):
    pipe = request.getfixturevalue(pipe_name)
    monkeypatch.setattr(parallel, "ROW_START", row_start)
    with in_float64(pipe.model):
        fast = pipe.generate(PROMPTS, parallel_window=window, **T2I).tokens
        oracle = oracle_tokens(pipe, PROMPTS, T2I, window, row_start)
        sequential = pipe.generate(PROMPTS, **T2I).tokens
    assert_float64_agree(fast, oracle)
    assert (fast - sequential).abs().max() > 1e-3 * sequential.abs().max()  # the window does change the image


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
@pytest.mark.parametrize("window", [1, 2])
def test_annealed_rows_in_parallel_equal_the_oracle_one_head_batch_per_pass(pipe_name, window, request,
                                                                            monkeypatch):
    """Annealed head steps with several rows per pass: every token of a pass takes the step count
    of the pass's latest slot, in one head batch, with the first of its own noise blocks."""
    pipe = request.getfixturevalue(pipe_name)
    kw = {**T2I, "steps": 6}
    batches = []  # (head steps, tokens) of every head batch sampled
    original = parallel.ParallelDecoder.sample
    monkeypatch.setattr(parallel.ParallelDecoder, "sample", lambda self, hidden, buffers: batches.append(
        (buffers.steps, buffers.count)) or original(self, hidden, buffers))
    with in_float64(pipe.model):
        fast = pipe.generate(PROMPTS, parallel_window=window, head_steps_floor=2, **kw)
        first, *passes = batches  # this generation's: token 0 (after the prefill), then the passes
        oracle = oracle_tokens(pipe, PROMPTS, kw, window, "copy", floor=2)
        per_token = pipe.generate(PROMPTS, parallel_window=window, **kw).tokens
    assert_float64_agree(fast.tokens, oracle)
    assert first == (6, 1) and len(passes) == fast.forward_passes  # one head batch per pass
    assert any(count > 1 for _, count in passes) and sum(count for _, count in passes) == 11
    steps_taken = [steps for steps, _ in passes]
    assert steps_taken == sorted(steps_taken, reverse=True) and steps_taken[-1] == 2 < steps_taken[0]
    assert (fast.tokens - per_token).abs().max() > 1e-3 * per_token.abs().max()  # fewer steps do change it


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
@pytest.mark.parametrize("given", [dict(keep_rows=1), dict(region=torch.ones(48, 64)), "cells"])
def test_given_tokens_stay_identical_and_replay_matches_eager(pipe_name, given, request, monkeypatch):
    pipe = request.getfixturevalue(pipe_name)
    if given == "cells":
        mask = torch.zeros(48, 64)
        mask[20, 5] = mask[40, 60] = mask[5, 40] = 1  # cells (1, 0), (2, 3), (0, 2) are sampled
        given = dict(region=mask)
    reference = pipe.reference_tokens(pipe.image_input(SOURCE, "the reference"))
    replays = []
    original = RecordedGraph.replay
    monkeypatch.setattr(RecordedGraph, "replay", lambda self: replays.append(1) or original(self))
    for window in (1, 2):
        eager = pipe.generate(PROMPTS, reference=SOURCE, parallel_window=window, **given, **T2I)
        replayed = pipe.generate(PROMPTS, reference=SOURCE, parallel_window=window, graph="on", **given, **T2I)
        assert torch.equal(eager.tokens, replayed.tokens)
        kept = eager.given
        assert torch.equal(eager.tokens[:, kept], reference[kept].expand(4, -1, -1))
        assert eager.head_evaluations == int((~kept).sum()) * 3
    assert replays


def test_noise_is_drawn_per_raster_position_in_the_sequential_order(pipe_1_1, monkeypatch):
    """Every window draws exactly the sequential loop's blocks, in the same order."""
    blocks = []
    draw = token_loop.NoiseStream.draw
    monkeypatch.setattr(token_loop.NoiseStream, "draw", lambda self: blocks.append(draw(self)) or blocks[-1])
    runs = []
    for window in (0, 1, 2, 3):
        blocks.clear()
        pipe_1_1.generate(PROMPTS, parallel_window=window, **T2I)
        runs.append(list(blocks))
    assert all(len(run) == len(runs[0]) == 12 * 4 for run in runs)  # sde, 3 steps: 4 draws per token
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


def test_progress_once_per_pass_and_interrupt(pipe_1_1):
    reports = []
    result = pipe_1_1.generate(PROMPTS[0], width=64, height=48, steps=2, parallel_window=2, decode=False,
                               callback=lambda done, total, tokens: reports.append((done, total, tokens.clone())))
    assert len(reports) == result.forward_passes + 1 == 2 * 2 + 4 - 1 + 1
    done = [d for d, _, _ in reports]
    assert done == sorted(done) and done[0] == 1 and done[-1] == 12 and {t for _, t, _ in reports} == {12}
    for count, _, tokens in reports:
        assert tokens.shape[1] <= count and torch.equal(tokens, result.tokens[:, :tokens.shape[1]])
    assert reports[2][0] == 4 and reports[2][2].shape[1] == 3  # row 0 at 3 tokens, row 1 started
    with pytest.raises(GenerationInterrupted, match="stopped after 4 of 12 tokens"):
        pipe_1_1.generate(PROMPTS[0], width=64, height=48, steps=2, parallel_window=2, decode=False,
                          callback=lambda done, total, tokens: done < 3)


def test_annealed_schedule_and_its_head_evaluations(pipe_1_0, pipe_1_1):
    assert [annealed_steps(s, 12, 8, 3) for s in range(12)] == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3]
    assert [annealed_steps(s, 12, 8, None) for s in range(12)] == [8] * 12
    for pipe, sampler, per_step in ((pipe_1_0, "auto", 1), (pipe_1_1, "heun", 2)):
        for window in (0, 2):
            result = pipe.generate(PROMPTS, parallel_window=window, head_steps_floor=3, sampler=sampler,
                                   **{**T2I, "steps": 8})
            batches = [[q.sample for q in p.queries if q.sample is not None] for p in plan_passes((3, 4), window,
                                                                                                [False] * 12)]
            taken = annealed_steps(0, 12, 8, 3) + sum(len(b) * annealed_steps(max(b), 12, 8, 3) for b in batches if b)
            assert result.head_evaluations == per_step * taken  # per pass: its latest slot's steps
            if window == 0:
                assert taken == sum(annealed_steps(s, 12, 8, 3) for s in range(12))
            assert result.head_evaluations < 12 * 8 * per_step
    full = pipe_1_1.generate(PROMPTS, head_steps_floor=3, exact=False, **T2I)  # floor = steps: all steps
    assert torch.equal(full.tokens, pipe_1_1.generate(PROMPTS, exact=False, **T2I).tokens)


def test_annealed_noise_draws_follow_each_tokens_step_count(pipe_1_1, monkeypatch):
    count = []
    draw = token_loop.NoiseStream.draw
    monkeypatch.setattr(token_loop.NoiseStream, "draw", lambda self: count.append(1) or draw(self))
    pipe_1_1.generate(PROMPTS, parallel_window=1, head_steps_floor=2, **{**T2I, "steps": 6})
    per_steps = {s: count_noise_draws(prepare_sampler(SamplerSettings("sde", s, 1.0))) for s in range(2, 7)}
    assert len(count) == sum(per_steps[annealed_steps(s, 12, 6, 2)] for s in range(12))


def test_bad_options_name_themselves(pipe_1_0, pipe_1_1):
    kw = dict(width=32, height=32, steps=4, decode=False)
    with pytest.raises(NextStepError, match=r"parallel_window -1 must be a whole number >= 0"):
        pipe_1_1.generate("a", parallel_window=-1, **kw)
    with pytest.raises(NextStepError, match=r"head_steps_floor 0 must be a whole number >= 1 for the sde sampler"):
        pipe_1_1.generate("a", head_steps_floor=0, **kw)
    with pytest.raises(NextStepError, match=r"head_steps_floor 1 must be a whole number >= 2 for the euler_maruyama"):
        pipe_1_0.generate("a", head_steps_floor=1, **kw)
    with pytest.raises(NextStepError, match=r"head_steps_floor 5 is above the sampler's 4 steps: use at most 4"):
        pipe_1_1.generate("a", head_steps_floor=5, **kw)
    with pytest.raises(NextStepError, match="parallel_window and head_steps_floor need loop 'fast'"):
        pipe_1_1.generate("a", parallel_window=1, loop="reference", **kw)


@pytest.mark.parametrize("fail", [False, True])
def test_cuda_capture_path_one_graph_per_pass_shape_with_torch_cuda_faked(pipe_1_0, monkeypatch, fail):
    """capture_cuda_graph per pass shape (tests/test_graphs.py fakes torch.cuda on the CPU): the
    warm-up, capture and replays (or, when a capture fails, the eager passes) give the eager
    tokens; one graph per distinct (queries, head batches) shape, here 1 to 3 queries."""
    from test_graphs import fake_cuda_graphs

    import nextstep_core.pipeline as pipeline_module

    kw = dict(T2I, exact=False, parallel_window=1)
    eager = pipe_1_0.generate(PROMPTS, graph="off", **kw).tokens
    monkeypatch.setattr(pipeline_module, "graph_mode", lambda *args, **kwargs: "cuda")
    graphs = fake_cuda_graphs(monkeypatch, fail)
    graphed = pipe_1_0.generate(PROMPTS, **kw).tokens
    assert torch.equal(eager, graphed)
    shapes = {(len(p.queries), len(p.sampled)) for p in plan_passes((3, 4), 1, [False] * 12)}
    assert len(graphs.made) == len(shapes) == 4  # (queries, sampled): (2, 2), (3, 3) twice, (3, 2), (2, 1)
