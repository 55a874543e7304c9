"""The token loop exactly as the contract describes it, one line per rule (nextstep-reference.md
sections 4-8). generate(loop="reference") runs it; the default fast loop (decode.py) is tested
against it and benchmarks/ measure against it."""

from __future__ import annotations

import torch

from .samplers import guidance_scales, normalize_token, sample_token
from .token_loop import DecodeRequest, NoiseStream, report_progress


@torch.no_grad()
def decode_tokens_reference(model, version, hidden: torch.Tensor, cache, mask: torch.Tensor,
                            request: DecodeRequest) -> torch.Tensor:
    """hidden (rows, hidden): the prefill's last hidden state; returns (images, num_tokens, token_dim)."""
    dtype = model.image_in_projector.weight.dtype
    device = hidden.device
    token_dim = model.config.token_dim
    state_dtype = torch.float32 if version.noise_in_float32 else dtype
    noise = NoiseStream(request, token_dim, state_dtype, device, version.shared_noise_across_prompts)
    tokens = torch.empty(request.images, request.num_tokens, token_dim, device=device, dtype=dtype)
    length = request.rows.input_ids.shape[1]
    for k in range(request.num_tokens):
        condition = model.head_condition(hidden, k)
        scale, scale_img = guidance_scales(k, request.num_tokens, request.cfg, request.cfg_img, request.cfg_schedule,
                                           version.rising_linear_schedule)
        token = sample_token(model.image_head.net, condition, branches=request.branches, cfg=scale, cfg_img=scale_img,
                             settings=request.settings, noise=noise, state_dtype=state_dtype)
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
                             past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
    return tokens
