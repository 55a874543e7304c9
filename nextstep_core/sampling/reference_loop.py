"""The token loop exactly as the contract describes it, one line per rule (nextstep-reference.md
sections 4-8, and 11 for given tokens): per token the whole flow net runs at every sampler step (time embedding,
condition embedding, every block), the attention mask grows by one column and the position is
worked out anew. generate(loop="reference") runs it; the default fast loop (token_loop.py) is
tested against it bit for bit and benchmarks/ measure against it. Both use the same prepared
samplers (samplers.py) and guidance (guidance.py).
"""

from __future__ import annotations

import torch

from ..errors import NextStepError
from .guidance import check_branches, guidance_scales, guide
from .samplers import normalize_token, prepare_sampler
from .settings import NoiseFn, Sampler
from .token_loop import DecodeRequest, NoiseStream, report_progress


def sample_token(net, condition: torch.Tensor, *, branches: list[str], cfg: float, cfg_img: float,
                 sampler: Sampler, noise: NoiseFn, state_dtype: torch.dtype) -> torch.Tensor:
    """Sample one token per image from the flow net.

    Args:
        net: the flow net (engine/head.py FlowNet): cond_embed, time_embed, forward_embedded.
        condition: (len(branches) * n, cond_dim) head conditions, branch-major.
        sampler: the prepared sampler (its settings' velocity_norm applies).
        noise: draws a fresh (n, token_dim) noise block in the sampling state's dtype.
        state_dtype: dtype of the sampling state (float32 for 1.0, the condition's for 1.1).
    Returns:
        (n, token_dim) tokens in the condition's dtype.
    """
    num_branches = len(branches)
    rows = condition.shape[0]
    condition_embedding = net.cond_embed(condition)  # constant over the steps of this token
    velocity_norm = sampler.settings.velocity_norm

    def guided_velocity(x: torch.Tensor, t: torch.Tensor, index: int) -> torch.Tensor:
        t_rows = t.expand(rows).to(condition)
        y = net.time_embed(t_rows) + condition_embedding
        raw = net.forward_embedded(x.repeat(num_branches, 1).to(condition.dtype), y).to(state_dtype)
        return guide(raw, branches, cfg, cfg_img, velocity_norm)

    return sampler(guided_velocity, noise).to(condition.dtype)


@torch.no_grad()
def decode_tokens_reference(model, version, hidden: torch.Tensor, cache, mask: torch.Tensor,
                            request: DecodeRequest) -> torch.Tensor:
    """hidden (rows, hidden): the prefill's last hidden state; returns (images, num_tokens, token_dim).
    Sequential only: next-set decoding and annealed head steps are the fast loop's."""
    check_branches(request.branches)
    if request.next_set:
        raise NextStepError("parallel_window and head_steps_floor need loop 'fast'; the reference loop is sequential")
    dtype = model.image_in_projector.weight.dtype
    device = hidden.device
    token_dim = model.config.token_dim
    state_dtype = torch.float32 if version.noise_in_float32 else dtype
    noise = NoiseStream(request, token_dim, state_dtype, device, version.shared_noise_across_prompts)
    sampler = prepare_sampler(request.settings)
    tokens = torch.empty(request.images, request.num_tokens, token_dim, device=device, dtype=dtype)
    length = request.rows.input_ids.shape[1]
    given = request.given_feed(dtype, device)
    for k in range(request.num_tokens):
        if given[k]:  # section 11: no head, no noise; the token as given, never re-normalised
            token = given.token(k)
        else:
            condition = model.head_condition(hidden, k)
            scale, scale_img = guidance_scales(k, request.num_tokens, request.cfg, request.cfg_img,
                                               request.cfg_schedule, version.rising_linear_schedule)
            token = sample_token(model.image_head.net, condition, branches=request.branches, cfg=scale,
                                 cfg_img=scale_img, sampler=sampler, noise=noise, state_dtype=state_dtype)
            if request.use_norm:
                token = normalize_token(token)
        tokens[:, k] = token
        report_progress(request, tokens, k + 1)
        if k + 1 == request.num_tokens:
            break
        embed = model.image_in_projector(token).repeat(len(request.branches), 1)[:, None]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = torch.full((mask.shape[0], 1), length + k, device=device)
        out = model.backbone(inputs_embeds=embed, attention_mask=mask, position_ids=position,
                             cache=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
    request.count_sequential(sampler.head_evaluations)
    return tokens
