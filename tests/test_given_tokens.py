"""Given tokens in both token loops (nextstep-reference.md section 11): with nothing given the
loops are plain generation bit for bit; given tokens come back bit-identical; the fast loop
(eager, recorded replay, the CUDA capture path faked on the CPU) equals the contract's loop;
sampled positions draw exactly their own noise, in order, and the head never runs at a given
position."""


import pytest
import torch
from PIL import Image

import nextstep_core.pipeline as pipeline_module
import nextstep_core.sampling.token_loop as token_loop
from nextstep_core import LatentImage, NextStepError
from nextstep_core.pipeline import GenerationInterrupted
from nextstep_core.sampling.samplers import prepare_sampler
from nextstep_core.sampling.token_step import count_noise_draws

PROMPTS = ["a red circle", "two blue squares at the top"]
SOURCE = Image.new("RGB", (48, 32), (200, 40, 40))
for x in range(10, 30):
    for y in range(4, 20):
        SOURCE.putpixel((x, y), (20, 30, 220))


def region(*cells, size=(48, 32)):
    """A float mask (ComfyUI's MASK) with one pixel set in each (row, col) token cell."""
    mask = torch.zeros(size[1], size[0])
    for r, c in cells:
        mask[r * 16 + 5, c * 16 + 9] = 0.5
    return mask


def reference_tokens(pipe, image=SOURCE):
    return pipe.reference_tokens(pipe.image_input(image, "the reference"))


def cases():
    """(name, generate kwargs): text-to-image and editing, keep_rows and regions, several images."""
    t2i = dict(width=48, height=32, num_images=2, steps=3, seed=5, cfg=4.0, cfg_schedule="linear", decode=False)
    edit = dict(image=SOURCE, steps=3, seed=3, cfg=5.0, cfg_img=2.0, num_images=2, decode=False)
    return [
        ("keep", PROMPTS, dict(t2i, reference=SOURCE, keep_rows=1)),
        ("region", PROMPTS, dict(t2i, reference=SOURCE, region=region((0, 1), (1, 2)))),
        ("region-first-sampled-late", PROMPTS[0], dict(t2i, reference=SOURCE, region=region((1, 2)))),
        ("masked-edit", "<image> make it blue", dict(edit, region=region((0, 0)), grow=1)),
    ]


CASES = cases()
GIVEN_OPTIONS = ("reference", "keep_rows", "region", "grow")


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
@pytest.mark.parametrize("loop", ["fast", "reference"])
def test_nothing_given_is_plain_generation_bit_for_bit(pipe_name, loop, request):
    """A region over the whole image leaves no token given (the given path runs, with an
    all-False mask); a reference with keep_rows 0 gives none either."""
    pipe = request.getfixturevalue(pipe_name)
    everything = torch.ones(32, 48)
    for prompt, kw in [(PROMPTS, dict(width=48, height=32, num_images=2, steps=3, seed=5, cfg=4.0,
                                      cfg_schedule="linear")),
                       ("<image> make it blue", dict(image=SOURCE, steps=3, seed=3, cfg=5.0, cfg_img=2.0,
                                                     num_images=2))]:
        kw = dict(kw, decode=False, loop=loop)
        plain = pipe.generate(prompt, **kw)
        whole = pipe.generate(prompt, reference=SOURCE, region=everything, **kw)
        unkept = pipe.generate(prompt, reference=SOURCE, keep_rows=0, **kw)
        assert plain.given is None and unkept.given is None and not whole.given.any()
        assert torch.equal(plain.tokens, whole.tokens) and torch.equal(plain.tokens, unkept.tokens)


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
@pytest.mark.parametrize("name,prompt,kw", CASES, ids=[c[0] for c in CASES])
def test_given_tokens_come_back_and_the_fast_loop_equals_the_reference(pipe_name, name, prompt, kw, request):
    pipe = request.getfixturevalue(pipe_name)
    fast = pipe.generate(prompt, **kw)
    reference = pipe.generate(prompt, loop="reference", **kw)
    given = fast.given
    assert given is not None and given.any() and not given.all()
    assert torch.equal(fast.given, reference.given)
    assert torch.equal(fast.tokens, reference.tokens)  # the same standard as test_fast_decode
    expected = reference_tokens(pipe)[given]
    for image_tokens in fast.tokens:  # every image of every prompt
        assert torch.equal(image_tokens[given], expected)
    plain = pipe.generate(prompt, **{k: v for k, v in kw.items() if k not in GIVEN_OPTIONS})
    after = ~given & (torch.arange(len(given)) > given.nonzero()[0, 0])  # sampled after a given token
    assert after.any() and not torch.equal(plain.tokens[:, after], fast.tokens[:, after])  # conditioned by it


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
@pytest.mark.parametrize("name,prompt,kw", CASES, ids=[c[0] for c in CASES])
def test_recorded_replay_with_givens_equals_the_eager_static_step(pipe_name, name, prompt, kw, request):
    pipe = request.getfixturevalue(pipe_name)
    eager = pipe.generate(prompt, graph="off", exact=False, **kw).tokens
    replayed = pipe.generate(prompt, graph="on", exact=False, **kw).tokens
    assert torch.equal(eager, replayed)


def draws_recorded(monkeypatch):
    """Record every noise block the loops draw, and the generator they draw it from."""
    seen = {"blocks": [], "generator": None}
    original = token_loop.NoiseStream.draw

    def draw(self):
        block = original(self)
        seen["blocks"].append(block.clone())
        seen["generator"] = self.generator
        return block

    monkeypatch.setattr(token_loop.NoiseStream, "draw", draw)
    return seen


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
@pytest.mark.parametrize("loop", ["fast", "reference"])
def test_sampled_positions_draw_exactly_their_noise_in_order(pipe_name, loop, request, monkeypatch):
    """A hand-driven generator with the same seed, drawing the contract's blocks for the sampled
    positions only, gives the same blocks and ends in the same state: nothing else was drawn.
    The head condition is worked out once per sampled position and never at a given one."""
    pipe = request.getfixturevalue(pipe_name)
    seen = draws_recorded(monkeypatch)
    conditions = []
    original_condition = pipe.model.head_condition
    monkeypatch.setattr(pipe.model, "head_condition",
                        lambda hidden, k: conditions.append(int(k)) or original_condition(hidden, k))
    mask = region((0, 1), (1, 2))
    result = pipe.generate(PROMPTS, width=48, height=32, num_images=2, steps=3, seed=9, cfg=4.0, decode=False,
                           reference=SOURCE, region=mask, loop=loop)
    sampled = (~result.given).nonzero().flatten().tolist()
    assert sampled == [1, 5] and conditions == sampled
    per_token = count_noise_draws(prepare_sampler(pipe.sampler_settings(steps=3)))
    hand = torch.Generator().manual_seed(9)
    v = pipe.version
    shape = (2 if v.shared_noise_across_prompts else 4, 64)
    dtype = torch.float32 if v.noise_in_float32 else pipe.dtype
    expected = [torch.randn(shape, generator=hand, dtype=dtype) for _ in range(len(sampled) * per_token)]
    assert len(seen["blocks"]) == len(expected)
    for block, want in zip(seen["blocks"], expected):
        assert torch.equal(block, want.repeat(2, 1) if v.shared_noise_across_prompts else want)
    assert torch.equal(seen["generator"].get_state(), hand.get_state())


def test_keeping_every_row_is_refused(pipe_1_0):
    """keep_rows == rows would draw nothing: refused by the engine, as by the nodes (one check)."""
    with pytest.raises(NextStepError, match=r"keep_rows 2 must be a whole number from 0 to 1 \(the output has 2 "):
        pipe_1_0.generate(PROMPTS, reference=SOURCE, keep_rows=2, steps=3, num_images=2)


@pytest.mark.parametrize("loop", ["fast", "reference"])
def test_given_positions_report_progress_and_can_be_interrupted(pipe_1_1, loop):
    reports = []

    def callback(done, total, tokens):
        reports.append((done, total, tokens.clone()))

    result = pipe_1_1.generate("a red circle", reference=SOURCE, keep_rows=1, steps=2, callback=callback, loop=loop,
                               decode=False)
    assert [(d, t) for d, t, _ in reports] == [(k, 6) for k in range(1, 7)]
    for done, _, tokens in reports:
        assert torch.equal(tokens, result.tokens[:, :done])
    with pytest.raises(GenerationInterrupted, match="stopped after 2 of 6 tokens"):
        pipe_1_1.generate("a red circle", reference=SOURCE, keep_rows=1, steps=2, loop=loop,
                          callback=lambda done, total, tokens: done < 2)


def test_latent_reference_tokens_are_the_latent_exactly_and_chain_losslessly(pipe_1_1):
    first = pipe_1_1.generate("a red circle", width=48, height=32, steps=2, seed=1)
    latent = LatentImage(first.latents[:1])
    again = pipe_1_1.generate("a blue square", reference=latent, keep_rows=1, steps=2, seed=2, decode=False)
    assert again.token_grid == (2, 3)  # the size came from the latent
    assert torch.equal(again.tokens[0, :3], first.tokens[0, :3])
    assert torch.equal(again.latents[..., :2, :], first.latents[..., :2, :])


def fake_cuda_graphs(monkeypatch):
    """torch.cuda's graph capture faked on the CPU as in tests/test_graphs.py, and chosen by generate."""
    from test_graphs import fake_cuda_graphs as fake

    monkeypatch.setattr(pipeline_module, "graph_mode", lambda *args, **kwargs: "cuda")
    return fake(monkeypatch)


@pytest.mark.parametrize("name,prompt,kw", CASES, ids=[c[0] for c in CASES])
def test_cuda_capture_path_with_givens_with_torch_cuda_faked(pipe_1_0, name, prompt, kw, monkeypatch):
    """Given positions run the feed eagerly between replays of the captured step (which writes
    the same cache and buffers): the tokens are the eager static step's."""
    eager = pipe_1_0.generate(prompt, graph="off", exact=False, **kw).tokens
    graphs = fake_cuda_graphs(monkeypatch)
    graphed = pipe_1_0.generate(prompt, exact=False, **kw).tokens
    assert len(graphs.made) == 1
    assert torch.equal(eager, graphed)
