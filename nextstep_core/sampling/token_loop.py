"""The fast token loop (the default): one image token per image per iteration, fed back
through the KV cache.

Two loops share `DecodeRequest`, the noise stream (`NoiseStream`), the prepared samplers
(samplers.py) and guidance (guidance.py):
- `reference_loop.decode_tokens_reference`: the contract, line by line (kept for tests and
  benchmarks to compare against);
- `decode_tokens` (here): the same arithmetic with everything that is constant while one token
  is sampled computed once (engine/head.py TokenHead: time embeddings per generation;
  condition embedding and AdaLN modulations of all steps per token), the attention mask and
  positions allocated once, and an optional compiled head step. On CPU with `exact=True` it
  gives the reference's tokens bit for bit (tests/test_fast_decode.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..engine.head import SMALL_WEIGHT_BYTES, TokenHead
from ..engine.prompt import PromptRows
from ..errors import NextStepError
from .given import GivenFeed
from .graphs import GraphedStep
from .parallel import decode_tokens_parallel
from .parallel_schedule import check_schedule_options
from .settings import SamplerSettings
from .token_step import TokenStep

# callback(tokens_done, tokens_total, tokens (images, tokens_done, 64)) -> False to stop
ProgressCallback = Callable[[int, int, torch.Tensor], "bool | None"]


class GenerationInterrupted(RuntimeError):
    """The progress callback asked to stop."""


@dataclass
class DecodeRequest:
    """Everything the token loop needs besides the model.

    rows: the prompt rows (rows = branches * prompts * images_per_prompt, branch-major).
    token_grid: (rows, cols) of image tokens. scales: cfg, cfg_img and their schedule.
    given_tokens (num_tokens, token_dim) or (images, num_tokens, token_dim) and given_mask
    (num_tokens,) bool: positions whose token is given (sampling/given.py; None: none). The
    `linear` cfg schedule keeps k = the position index whether or not earlier ones were given.
    parallel_window: next-set decoding's window w (sampling/parallel.py; 0: one token per
    pass). head_steps_floor: annealed head steps down to this floor (None: off). Both need the
    fast loop. The loops set forward_passes (decoder passes after the prefill) and
    head_evaluations (per-token flow-head evaluations summed over the sampled tokens).
    """

    rows: PromptRows
    token_grid: tuple[int, int]
    num_images: int
    num_prompts: int
    cfg: float
    cfg_img: float
    cfg_schedule: str
    settings: SamplerSettings
    use_norm: bool
    generator: torch.Generator
    callback: ProgressCallback | None = None
    given_tokens: torch.Tensor | None = None
    given_mask: torch.Tensor | None = None
    parallel_window: int = 0
    head_steps_floor: int | None = None
    forward_passes: int = field(default=0, init=False)
    head_evaluations: int = field(default=0, init=False)

    def __post_init__(self):
        check_schedule_options(self.parallel_window, self.head_steps_floor, self.settings.steps, self.settings.name)

    @property
    def next_set(self) -> bool:
        """Whether the generation runs sampling/parallel.py (a window or annealed head steps)."""
        return self.parallel_window > 0 or self.head_steps_floor is not None

    def report(self, tokens: torch.Tensor, done: int) -> None:
        """Progress: `done` tokens decided, `tokens` (images, <= done, D) the decided raster
        prefix; raises GenerationInterrupted when the callback returns False."""
        if self.callback is not None and self.callback(done, self.num_tokens, tokens) is False:
            raise GenerationInterrupted(f"stopped after {done} of {self.num_tokens} tokens")

    def count_sequential(self, evaluations_per_token: int) -> None:
        """forward_passes and head_evaluations of a sequential loop: N - 1 feeds, and the
        sampler's evaluations for every token not given."""
        sampled = self.num_tokens - (0 if self.given_mask is None else int(self.given_mask.sum()))
        self.forward_passes = self.num_tokens - 1
        self.head_evaluations = sampled * evaluations_per_token

    def given_feed(self, dtype: torch.dtype, device) -> GivenFeed:
        return GivenFeed(self.given_tokens, self.given_mask, self.images, self.num_tokens, dtype, device)

    @property
    def num_tokens(self) -> int:
        return self.token_grid[0] * self.token_grid[1]

    @property
    def images(self) -> int:
        return self.num_prompts * self.num_images

    @property
    def branches(self) -> list[str]:
        return self.rows.branches


class NoiseStream:
    """Draws (images, token_dim) noise blocks from the generator in the contract's order/shapes.

    shared_across_prompts (1.0): one (images_per_prompt, D) block repeated for every prompt;
    otherwise (1.1) one row per image. Drawn on the CPU in `dtype`, then moved to `device`.
    """

    def __init__(self, request: DecodeRequest, token_dim: int, dtype: torch.dtype, device, shared_across_prompts: bool):
        self.generator = request.generator
        self.shape = (request.num_images if shared_across_prompts else request.images, token_dim)
        self.repeats = request.num_prompts if shared_across_prompts else 1
        self.dtype = dtype
        self.device = torch.device(device)

    def draw(self) -> torch.Tensor:
        """The next (images, token_dim) block, on the CPU."""
        block = torch.randn(self.shape, generator=self.generator, dtype=self.dtype)
        return block.repeat(self.repeats, 1) if self.repeats > 1 else block

    def __call__(self) -> torch.Tensor:
        block = self.draw()
        return block if self.device.type == "cpu" else block.to(self.device)

    def blocks(self, count: int) -> torch.Tensor:
        """The next `count` blocks (count, images, token_dim), drawn one by one as __call__
        would draw them, moved to the device at once."""
        stacked = torch.stack([self.draw() for _ in range(count)])
        # Asynchronous only on CUDA, which stages a copy from pageable memory before returning; elsewhere
        # (MPS) a non-blocking copy could read the CPU block after it is freed.
        cuda = self.device.type == "cuda"
        return stacked if self.device.type == "cpu" else stacked.to(self.device, non_blocking=cuda)


def report_progress(request: DecodeRequest, tokens: torch.Tensor, done: int) -> None:
    request.report(tokens[:, :done], done)


def compile_head(head: TokenHead, device: torch.device) -> None:
    """torch.compile the head's per-step evaluation (on CUDA, mode "reduce-overhead" uses CUDA graphs)."""
    try:
        head.compile("reduce-overhead" if device.type == "cuda" else None)
    except Exception as exc:  # torch.compile is unavailable on some platforms
        raise NextStepError(f"compile=True failed ({exc}); run with compile=False") from exc


def runs_best_on_one_thread(model, device: torch.device) -> bool:
    """Whether every weight matrix of the token loop (decoder layers and flow head) is small.
    Then each op of a token step is a few microseconds of work, and on a CPU the cost of a
    parallel region (waking the other threads: 1-50 us, most when they sleep, as with
    OMP_WAIT_POLICY=PASSIVE) would dominate. True for the tiny and demo models, false for the
    released ones. The pipeline then runs either token loop on one thread; both loops keep the
    same bits (MKL's products can round differently on 1 and 2 threads for some row counts)."""
    if device.type != "cpu":
        return False
    matrices = [p for p in model.backbone.layers.parameters() if p.dim() == 2]
    matrices += [p for p in model.image_head.parameters() if p.dim() == 2]
    return all(p.numel() * p.element_size() < SMALL_WEIGHT_BYTES for p in matrices)


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside the block (None: unchanged)."""
    previous = torch.get_num_threads()
    if count is not None and count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@torch.no_grad()
def decode_tokens(model, version, hidden: torch.Tensor, cache, mask: torch.Tensor, request: DecodeRequest, *,
                  exact: bool = True, compile: bool = False, graph: str | None = None) -> torch.Tensor:
    """The fast token loop. hidden (rows, hidden) is the prefill's last hidden state; returns
    tokens (images, num_tokens, token_dim) in the model's dtype.

    exact: AdaLN modulations as per-step products and every product F.linear (CPU: the
    reference's bits); False reads each modulation weight once per token and uses faster
    product kernels for large weights (head.fast_product; float rounding differs). compile:
    torch.compile the head step. graph: how the steps after the first run (graphs.graph_mode):
    None eagerly, "cuda" as one CUDA graph replayed per token, "recorded" as the recorded replay;
    graphs need the StaticCache the pipeline allocates for them.

    Given positions (request.given_mask): no head, no noise drawn; for k >= 1 the step's feed
    part alone runs (eagerly, also in graph mode: it writes the same cache and buffers the
    captured step reads), and the given token is the output and the next token fed.

    request.parallel_window > 0 or request.head_steps_floor: sampling/parallel.py decodes
    (next-set decoding, annealed head steps); otherwise this loop, unchanged.
    """
    dtype = model.image_in_projector.weight.dtype
    device = hidden.device
    state_dtype = torch.float32 if version.noise_in_float32 else dtype
    noise = NoiseStream(request, model.config.token_dim, state_dtype, device, version.shared_noise_across_prompts)
    if request.next_set:
        return decode_tokens_parallel(model, version, hidden, cache, mask, request, noise, exact=exact,
                                      compile=compile_head if compile else None, graph=graph)
    step = TokenStep(model, version, request, cache, mask, noise, exact=exact)
    if compile:
        compile_head(step.velocity.head, device)
    run = GraphedStep(step, graph) if graph is not None else step
    tokens = torch.empty(request.images, request.num_tokens, model.config.token_dim, device=device, dtype=dtype)
    given = request.given_feed(dtype, device)
    token = None
    for k in range(request.num_tokens):
        if given[k]:
            if k:
                step.prepare(k, sample=False)
                step.feed(token)
            token = given.token(k)
        elif k == 0:
            step.prepare(0)
            token = step.sample(hidden)
        else:
            step.prepare(k)
            token = run(token)
        tokens[:, k] = token
        report_progress(request, tokens, k + 1)
    request.count_sequential(step.sampler.head_evaluations)
    return tokens
