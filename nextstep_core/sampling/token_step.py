"""One image token of the fast loop as one function of tensors: `TokenStep`.

For token k >= 1 the step feeds token k - 1 back (input projector, the decoder at one position
over every guidance row, the KV cache) and samples token k (head condition, every head
evaluation of the prepared sampler with guidance, token normalisation). Token 0 comes from the
prefill's hidden state through `sample` alone.

Everything that changes from one token to the next is written into buffers by `prepare(k)`
before the step runs: the position and attention mask of the fed token, the head's position
index, the guidance scales (when they vary) and the token's noise, drawn from the run's
generator in the contract's order. With a StaticCache (`static=True`) every shape is fixed and
the step reads nothing else that changes, so it can be captured once as a CUDA graph and
replayed for every later token (graphs.py); elsewhere the same function runs eagerly.

At a given position (sampling/given.py) the loop calls `prepare(k, sample=False)` and `feed`
alone: no noise is drawn and no head runs; the feed writes the same cache and buffers the
captured step reads.
"""

from __future__ import annotations

import torch
from transformers import StaticCache

from ..engine.head import TokenHead
from .guidance import check_branches, guidance_scales, guide
from .samplers import normalize_token, prepare_sampler
from .settings import Sampler, SamplerSettings


class GuidedVelocity:
    """velocity(x, t, index) for the samplers, backed by a TokenHead whose modulations were worked
    out for the prepared sampler's `evaluation_times`: evaluation `index` uses the index-th of them
    (the sampler says which, so the time and the modulations cannot drift apart)."""

    def __init__(self, head: TokenHead, branches: list[str], settings: SamplerSettings, state_dtype: torch.dtype):
        self.head = head
        self.branches = branches
        self.num_branches = len(branches)
        self.velocity_norm = settings.velocity_norm
        self.state_dtype = state_dtype
        self.cfg = self.cfg_img = 1.0

    def start_token(self, condition: torch.Tensor, cfg: float | torch.Tensor, cfg_img: float | torch.Tensor) -> None:
        self.head.set_condition(condition)
        self.cfg, self.cfg_img = cfg, cfg_img

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: int) -> torch.Tensor:
        n = x.shape[0]
        if x.dtype != self.head.dtype:
            x = x.to(self.head.dtype)
        raw = self.head.velocity(x.expand(self.num_branches, *x.shape).reshape(self.num_branches * n, -1), index)
        if raw.dtype != self.state_dtype:
            raw = raw.to(self.state_dtype)
        return guide(raw, self.branches, self.cfg, self.cfg_img, self.velocity_norm)


def count_noise_draws(sampler: Sampler) -> int:
    """How many noise blocks the sampler draws per token (its first draw included)."""
    draws = 0

    def noise() -> torch.Tensor:
        nonlocal draws
        draws += 1
        return torch.zeros(1, 1)

    sampler(lambda x, t, index: torch.zeros_like(x), noise)
    return draws


class TokenStep:
    """The fast loop's per-token work, `step(token)` -> the next token.

    Shapes: hidden (rows, hidden), rows = branches x images; tokens (images, token_dim) in the
    model's dtype. `static`: the cache is a StaticCache for the prompt plus every image token,
    and the attention mask a fixed (rows, 1, 1, L + N) buffer handed to the decoder as it is,
    so no shape or Python value in the step changes between tokens. Otherwise (a DynamicCache)
    the mask grows by one column per token, as in the reference loop.
    """

    def __init__(self, model, version, request, cache, prompt_mask: torch.Tensor, noise, *, exact: bool = True):
        check_branches(request.branches)
        self.model = model
        self.version = version
        self.request = request
        self.cache = cache
        self.static = isinstance(cache, StaticCache)
        self.dtype = model.image_in_projector.weight.dtype
        device = prompt_mask.device
        rows, length = prompt_mask.shape
        self.length = length
        state_dtype = torch.float32 if version.noise_in_float32 else self.dtype
        self.sampler = prepare_sampler(request.settings)
        head = TokenHead(model.image_head.net, self.sampler.evaluation_times.to(device), rows, self.dtype,
                         exact=exact)
        self.velocity = GuidedVelocity(head, request.branches, request.settings, state_dtype)
        self.noise_stream = noise
        self.noise_blocks = torch.zeros(count_noise_draws(self.sampler), request.images, model.config.token_dim,
                                 dtype=state_dtype, device=device)
        self.noise_drawn = 0
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.token_index = torch.zeros((), dtype=torch.long, device=device)
        num_tokens = request.num_tokens
        if self.static:  # the decoder's own (rows, 1, query, keys) form; fed columns switch on as tokens are fed
            self.mask = torch.zeros(rows, 1, 1, length + num_tokens, dtype=torch.bool, device=device)
            self.mask[:, 0, 0, :length] = prompt_mask.bool()
        else:  # (rows, L + N), of which the first L + fed columns are handed over
            self.mask = prompt_mask.new_ones(rows, length + num_tokens)
            self.mask[:, :length] = prompt_mask
        self.fed = 0
        # Guidance scales: Python floats, baked into a graph, unless a schedule moves them per
        # token and the step must stay graph-safe; then 0-d float32 tensors filled per token.
        varying = request.cfg_schedule != "constant" and self.static
        self.scale_buffer = torch.ones(2, dtype=torch.float32, device=device) if varying else None
        self.scales: tuple = (request.cfg, request.cfg_img)

    def prepare(self, k: int, sample: bool = True) -> None:
        """Fill the buffers for token k: its noise, head position and guidance scales and, for
        k >= 1, the position and mask column of token k - 1, which the step feeds.

        sample=False (a given token k): only the feed's position and mask; no noise is drawn."""
        if sample:
            self.prepare_sample(k)
        if k >= 1:
            self.fed = k
            self.position.fill_(self.length + k - 1)
            if self.static:
                self.mask[:, 0, 0, self.length + k - 1] = True

    def prepare_sample(self, k: int) -> None:
        request = self.request
        self.noise_blocks.copy_(self.noise_stream.blocks(self.noise_blocks.shape[0]))
        self.token_index.fill_(k)
        scales = guidance_scales(k, request.num_tokens, request.cfg, request.cfg_img, request.cfg_schedule,
                                 self.version.rising_linear_schedule)
        if self.scale_buffer is not None:
            self.scale_buffer.copy_(torch.tensor(scales, dtype=torch.float32))
            self.scales = tuple(self.scale_buffer.unbind(0))
        else:
            self.scales = scales

    def draw_noise(self) -> torch.Tensor:
        block = self.noise_blocks[self.noise_drawn]
        self.noise_drawn += 1
        return block

    def sample(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last hidden state (rows, hidden) -> the token (images, token_dim), from the prepared noise."""
        condition = self.model.head_condition(hidden, self.token_index)
        self.velocity.start_token(condition, *self.scales)
        self.noise_drawn = 0
        token = self.sampler(self.velocity, self.draw_noise).to(self.dtype)
        return normalize_token(token) if self.request.use_norm else token

    def feed(self, token: torch.Tensor) -> torch.Tensor:
        """Token (images, token_dim) -> the decoder's last hidden state (rows, hidden) after it."""
        embed = self.model.image_in_projector(token).repeat(len(self.request.branches), 1)[:, None]
        mask = {"full_attention": self.mask} if self.static else self.mask[:, : self.length + self.fed]
        out = self.model.backbone(inputs_embeds=embed, attention_mask=mask, position_ids=self.position,
                                  cache=self.cache, use_cache=True)
        return out.last_hidden_state[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Token k - 1 -> token k (after `prepare(k)`)."""
        return self.sample(self.feed(token))
