"""Next-set decoding (ZipAR-style, across token rows) and annealed head steps in the fast loop.

`decode_tokens_parallel` runs the schedule of parallel_schedule.py: each decoder pass feeds
every active row's newest token at its own raster slot and samples the next token of each
active row; the flow head runs once per pass on all of them (active rows x images x guidance
branches; guidance rows share the schedule). token_loop.decode_tokens hands a generation to it
when parallel_window > 0 or head_steps_floor is set; parallel_window 0 with w >= W is one
query per pass, the sequential order.

- Positions are raster positions (prompt length + slot) and the KV cache is indexed by raster
  slot (`SlotCache`): a query writes its key/value into its own slot, whatever order the passes
  write in. The 4-D mask (rows, 1, queries, prompt + slots) lets a query see the prompt and
  every slot filled at or before its own slot, in this pass or earlier; slots not written yet
  are masked explicitly (their keys are zeros, and a zero key is not -inf).
- Row starts: ROW_START ("copy", as ZipAR: the row above's newest token at the slot before the
  row, seen by that query only; "above": the token right above the row's first instead; or
  "masked": a zero input whose own slot stays masked); see parallel_schedule.py. "copy" is the
  default; benchmarks/parallel_decoding.py measures them.
- RNG order: the noise of every sampled token is drawn from the run's generator in raster
  order, the same blocks in the same order as sequential decoding (its initial noise, then one
  draw per stochastic step; given tokens draw nothing), whatever the pass that samples it. So
  a seed gives the same noise per token at every window, and at w >= W the very tokens of the
  sequential loop's static-cache path (bit for bit on the CPU).
- Annealed head steps (head_steps_floor): a pass's tokens take annealed_steps of its latest
  slot (one token per pass: that token's own count), all in one head batch; noise is still
  drawn for each slot's own count, and a token uses the first of its blocks.
- Captured steps (graphs.py KeyedGraphs): one capture per pass shape, i.e. per (queries, head
  steps, tokens sampled); every value that changes between passes is in buffers.
- Progress: once per pass, with the number of tokens decided; the tokens handed over are the
  longest raster prefix decided so far (it can be shorter than that number).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..engine.head import TokenHead
from .graphs import KeyedGraphs
from .guidance import check_branches, guidance_scales
from .parallel_schedule import Pass, Query, annealed_steps, pass_visibility, plan_passes
from .samplers import normalize_token, prepare_sampler
from .token_step import GuidedVelocity, count_noise_draws

ROW_START = "copy"


class SlotCache:
    """A KV cache of fixed length (prompt + every image slot) written by position: `update`
    copies the new keys/values into the slots named by `positions` (a (queries,) long buffer set
    before each pass) and returns the whole cache. The prompt's part is the prefill's, taken
    from its DynamicCache (copied) or StaticCache (shared)."""

    def __init__(self, prefill_cache, prompt_length: int, total_length: int):
        self.keys, self.values = [], []
        for layer in prefill_cache.layers:
            for source, target in ((layer.keys, self.keys), (layer.values, self.values)):
                if source.shape[2] == total_length:
                    target.append(source)
                else:
                    full = source.new_zeros(*source.shape[:2], total_length, source.shape[3])
                    full[:, :, :prompt_length] = source[:, :, :prompt_length]
                    target.append(full)
        self.positions: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.positions, key_states)
        values.index_copy_(2, self.positions, value_states)
        return keys, values


class PassBuffers:
    """Everything a pass of one shape reads: its fed tokens (queries, images, D), positions,
    cache slots, mask and, for its one head batch of `count` sampled tokens (0: none) at `steps`
    head steps, the query indices sampled, their raster slots (per head row, for the 1.0
    position table), guidance scales and noise."""

    def __init__(self, decoder: ParallelDecoder, queries: int, steps: int, count: int):
        d = decoder
        device = d.device
        self.queries, self.steps, self.count = queries, steps, count
        self.tokens_in = torch.zeros(queries, d.images, d.token_dim, dtype=d.dtype, device=device)
        self.positions = torch.zeros(d.rows, queries, dtype=torch.long, device=device)
        self.cache_positions = torch.zeros(queries, dtype=torch.long, device=device)
        self.mask = torch.zeros(d.rows, 1, queries, d.length + d.num_tokens, dtype=torch.bool, device=device)
        self.mask[:, 0, :, : d.length] = d.prompt_mask[:, None, :]
        n = count * d.images
        # float32 as the sequential loop's scales, or the state's dtype where that is narrower
        scale_dtype = torch.float32 if d.state_dtype == torch.float64 else d.state_dtype
        self.scales = torch.ones(2, n, 1, dtype=scale_dtype, device=device) if d.varying_scales else None
        self.index = torch.zeros(count, dtype=torch.long, device=device)
        self.slots = torch.zeros(d.branches * n, dtype=torch.long, device=device)
        draws = d.noise_draws(steps) if count else 0
        self.noise = torch.zeros(draws, n, d.token_dim, dtype=d.state_dtype, device=device)


class ParallelDecoder:
    """The passes of one generation (see the module docstring). `run()` returns the tokens."""

    def __init__(self, model, version, request, cache, prompt_mask: torch.Tensor, noise_stream, *,
                 exact: bool = True, compile: Callable | None = None, graph: str | None = None):
        check_branches(request.branches)
        self.model, self.version, self.request = model, version, request
        self.dtype = model.image_in_projector.weight.dtype
        self.device = prompt_mask.device
        self.state_dtype = torch.float32 if version.noise_in_float32 else self.dtype
        self.token_dim = model.config.token_dim
        self.rows, self.length = prompt_mask.shape
        self.prompt_mask = prompt_mask.bool()
        self.branches = len(request.branches)
        self.images = request.images
        self.num_tokens = request.num_tokens
        self.cache = SlotCache(cache, self.length, self.length + self.num_tokens)
        self.exact, self.compile = exact, compile
        self.varying_scales = request.cfg_schedule != "constant"
        self.samplers: dict[int, object] = {}
        self.draws: dict[int, int] = {}
        self.velocities: dict[tuple[int, int], GuidedVelocity] = {}
        self.buffers: dict[tuple, PassBuffers] = {}
        self.graphs = KeyedGraphs(graph) if graph is not None else None
        self.noise_stream = noise_stream
        self.noise: dict[int, list[torch.Tensor]] = {}  # drawn ahead, by slot, until sampled
        self.next_draw = 0
        self.filled = torch.zeros(self.num_tokens, dtype=torch.bool)
        self.forward_passes = 0
        self.head_evaluations = 0

    # -- per-token settings -------------------------------------------------------------
    def steps_of(self, slot: int) -> int:
        request = self.request
        return annealed_steps(slot, self.num_tokens, request.settings.steps, request.head_steps_floor)

    def sampler(self, steps: int):
        if steps not in self.samplers:
            self.samplers[steps] = prepare_sampler(replace(self.request.settings, steps=steps))
        return self.samplers[steps]

    def noise_draws(self, steps: int) -> int:
        if steps not in self.draws:
            self.draws[steps] = count_noise_draws(self.sampler(steps))
        return self.draws[steps]

    def velocity(self, steps: int, n: int) -> GuidedVelocity:
        key = (steps, n)
        if key not in self.velocities:
            times = self.sampler(steps).evaluation_times.to(self.device)
            head = TokenHead(self.model.image_head.net, times, self.branches * n, self.dtype, exact=self.exact)
            if self.compile is not None:
                self.compile(head, self.device)
            self.velocities[key] = GuidedVelocity(head, self.request.branches, self.request.settings,
                                                  self.state_dtype)
        return self.velocities[key]

    def draw_noise(self, slot: int, given) -> list[torch.Tensor]:
        """The noise blocks of sampled token `slot`, drawing every sampled slot before it first
        (raster order, the sequential loop's order)."""
        while self.next_draw <= slot:
            s = self.next_draw
            self.next_draw += 1
            if not given[s]:
                self.noise[s] = [self.noise_stream.draw() for _ in range(self.noise_draws(self.steps_of(s)))]
        return self.noise.pop(slot)

    # -- one pass -----------------------------------------------------------------------
    def pass_steps(self, sampled: list[int]) -> int:
        """The head steps of a pass's tokens: its latest slot's (the fewest), so one head batch
        samples them all and each token's noise blocks (drawn for its own count) suffice; 0 for
        a pass that samples nothing."""
        return self.steps_of(max(sampled)) if sampled else 0

    def pass_buffers(self, queries: int, steps: int, count: int) -> PassBuffers:
        key = (queries, steps, count)
        if key not in self.buffers:
            self.buffers[key] = PassBuffers(self, queries, steps, count)
        return self.buffers[key]

    def fill_sampling(self, buffers: PassBuffers, query_index: list[int], sampled: list[int], given) -> None:
        """Write the head batch's query indices, slots, scales and noise for this pass."""
        if not sampled:
            return
        request = self.request
        buffers.index.copy_(torch.tensor(query_index))
        buffers.slots.copy_(torch.tensor(sampled).repeat_interleave(self.images).repeat(self.branches))
        if buffers.scales is not None:
            scales = [guidance_scales(s, self.num_tokens, request.cfg, request.cfg_img, request.cfg_schedule,
                                      self.version.rising_linear_schedule) for s in sampled]
            table = torch.tensor(scales, dtype=torch.float32).T.repeat_interleave(self.images, dim=1)
            buffers.scales.copy_(table[..., None])
        draws = self.noise_draws(buffers.steps)  # the first blocks of each slot's own draws
        blocks = [self.draw_noise(s, given)[:draws] for s in sampled]  # per slot: draws x (images, D)
        buffers.noise.copy_(torch.stack([torch.cat([b[i] for b in blocks]) for i in range(draws)]))
        self.head_evaluations += len(sampled) * self.sampler(buffers.steps).head_evaluations

    def sample(self, hidden: torch.Tensor, buffers: PassBuffers) -> torch.Tensor:
        """Decoder output (rows, queries, hidden) -> the sampled tokens (count, images, D)."""
        b, images, count = self.branches, self.images, buffers.count
        picked = hidden.index_select(1, buffers.index)  # (rows, count, hidden)
        picked = picked.reshape(b, images, count, -1).permute(0, 2, 1, 3).reshape(b * count * images, -1)
        if self.model.config.use_gen_pos_embed:
            picked = picked + self.model.gen_pos_embed[0].index_select(0, buffers.slots)
        condition = self.model.image_out_projector(picked)
        velocity = self.velocity(buffers.steps, count * images)
        if buffers.scales is None:
            velocity.start_token(condition, self.request.cfg, self.request.cfg_img)
        else:
            velocity.start_token(condition, buffers.scales[0], buffers.scales[1])
        blocks = iter(buffers.noise.unbind(0))
        token = self.sampler(buffers.steps)(velocity, lambda: next(blocks)).to(self.dtype)
        token = normalize_token(token) if self.request.use_norm else token
        return token.reshape(count, images, -1)

    def feed_and_sample(self, buffers: PassBuffers) -> torch.Tensor:
        """The captured part of a pass: feed the queries, sample from their hidden states."""
        q = buffers.queries
        embed = self.model.image_in_projector(buffers.tokens_in.reshape(q * self.images, -1))
        embed = embed.reshape(q, self.images, -1).transpose(0, 1).repeat(self.branches, 1, 1)
        out = self.model.backbone(inputs_embeds=embed, attention_mask={"full_attention": buffers.mask},
                                  position_ids=buffers.positions, cache=self.cache, use_cache=True)
        hidden = out.last_hidden_state
        if not buffers.count:
            return hidden[:0, 0].clone()
        return self.sample(hidden, buffers)

    def run_pass(self, plan: Pass, tokens: torch.Tensor, given) -> None:
        queries: tuple[Query, ...] = plan.queries
        sampling = [(i, q.sample) for i, q in enumerate(queries) if q.sample is not None]
        sampled = [s for _, s in sampling]
        buffers = self.pass_buffers(len(queries), self.pass_steps(sampled), len(sampled))
        zero = tokens.new_zeros(self.images, self.token_dim)
        buffers.tokens_in.copy_(torch.stack([zero if q.source is None else tokens[:, q.source] for q in queries]))
        slots = torch.tensor([q.slot for q in queries])
        buffers.positions.copy_((self.length + slots).expand(self.rows, -1))
        buffers.cache_positions.copy_(self.length + slots)
        filled, visible = pass_visibility(self.filled, queries, ROW_START)
        buffers.mask[:, 0, :, self.length:].copy_(visible)
        self.fill_sampling(buffers, [i for i, _ in sampling], sampled, given)
        self.cache.positions = buffers.cache_positions
        if self.graphs is None:
            new = self.feed_and_sample(buffers)
        else:
            new = self.graphs((len(queries), buffers.steps, buffers.count), lambda: self.feed_and_sample(buffers))
        self.filled = filled
        self.forward_passes += 1
        for j, slot in enumerate(sampled):
            tokens[:, slot] = new[j]
        for slot in plan.decided:
            if given[slot]:
                tokens[:, slot] = given.token(slot)

    def run(self, hidden: torch.Tensor, given) -> torch.Tensor:
        """hidden (rows, hidden): the prefill's last hidden state -> tokens (images, N, D)."""
        request = self.request
        tokens = torch.zeros(self.images, self.num_tokens, self.token_dim, device=self.device, dtype=self.dtype)
        if given[0]:
            tokens[:, 0] = given.token(0)
        else:
            buffers = PassBuffers(self, 1, self.steps_of(0), 1)
            self.fill_sampling(buffers, [0], [0], given)
            tokens[:, 0] = self.sample(hidden[:, None], buffers)[0]
        decided = torch.zeros(self.num_tokens, dtype=torch.bool)
        decided[0] = True
        report(request, tokens, decided)
        window = request.parallel_window
        for plan in plan_passes(request.token_grid, window, [given[k] for k in range(self.num_tokens)],
                                ROW_START):
            self.run_pass(plan, tokens, given)
            decided[list(plan.decided)] = True
            report(request, tokens, decided)
        return tokens


def report(request, tokens: torch.Tensor, decided: torch.Tensor) -> None:
    """Progress once per pass: (tokens decided, total, the longest decided raster prefix)."""
    done = int(decided.sum())
    prefix = int(decided.int().cumprod(0).sum())
    request.report(tokens[:, :prefix], done)


@torch.no_grad()
def decode_tokens_parallel(model, version, hidden: torch.Tensor, cache, mask: torch.Tensor, request, noise_stream, *,
                           exact: bool = True, compile: Callable | None = None,
                           graph: str | None = None) -> torch.Tensor:
    """Next-set decoding (see the module docstring); sets request.forward_passes and
    request.head_evaluations. compile: called as compile(head, device) on every new TokenHead
    (token_loop.compile_head), or None. Returns tokens (images, num_tokens, token_dim)."""
    decoder = ParallelDecoder(model, version, request, cache, mask, noise_stream, exact=exact, compile=compile,
                              graph=graph)
    tokens = decoder.run(hidden, request.given_feed(decoder.dtype, decoder.device))
    request.forward_passes = decoder.forward_passes
    request.head_evaluations = decoder.head_evaluations
    return tokens
