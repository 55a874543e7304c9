"""The paper's training objective for the transformer and flow head (teacher forcing).

A training row is the generation sequence with the answer filled in:

    [left padding] caption tokens  <|image_area|>h*w  boi  t_0 ... t_{N-2}
                                                      ^ predicts t_0       ^ predicts t_{N-1}

Image tokens enter as `image_in_projector(token)`. The hidden state at boi conditions token 0,
the hidden state at t_{k-1} conditions token k (after `gen_pos_embed[k]` when used, and
`image_out_projector`), exactly as in generation. Losses:

    loss = lm_loss_weight * cross-entropy(next text token)         (text positions only)
         + im_loss_weight * flow-matching loss(image tokens)        (fm_head_batch_mul repeats)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.model import NextStepModel


@dataclass
class TrainingBatch:
    """input_ids/attention_mask (B, L): prompt rows ending in boi (see prompt.build_prompt_rows,
    cfg 1); target_tokens (B, N, 64); source_tokens (B, M, 64) fill the placeholders of edit rows."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_tokens: torch.Tensor
    placeholder_id: int | None = None
    source_tokens: torch.Tensor | None = None

    def to(self, device) -> TrainingBatch:
        """The same batch with its tensors on `device`."""
        source = None if self.source_tokens is None else self.source_tokens.to(device)
        return TrainingBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_tokens.to(device),
                             self.placeholder_id, source)


@dataclass
class Losses:
    total: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor


def sequence_embeddings(model: NextStepModel, batch: TrainingBatch,
                        fed_back_noise: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L + N - 1, hidden): prompt embeddings (placeholders filled) then the fed-back image tokens
    (plus `fed_back_noise` (B, N - 1, token_dim) when given; the targets stay clean)."""
    embeds = model.backbone.embed_tokens(batch.input_ids)
    if batch.source_tokens is not None:
        placeholders = batch.input_ids == batch.placeholder_id
        projected = model.image_in_projector(batch.source_tokens.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter(placeholders[..., None], projected.to(embeds.dtype))  # autocast: bf16
    fed_back = batch.target_tokens[:, :-1]
    if fed_back_noise is not None:
        fed_back = fed_back + fed_back_noise.to(fed_back)
    fed_back = model.image_in_projector(fed_back.to(embeds.dtype))
    return torch.cat([embeds, fed_back.to(embeds.dtype)], dim=1)


def image_conditions(model: NextStepModel, batch: TrainingBatch,
                     embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer over a teacher-forcing sequence (embeds from sequence_embeddings):
    (hidden (B, L + N - 1, hidden), head conditions (B * N, hidden) of every image token)."""
    rows, length = batch.input_ids.shape
    num_tokens = batch.target_tokens.shape[1]
    mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(rows, num_tokens - 1)], dim=1)
    positions = torch.arange(embeds.shape[1], device=embeds.device).expand(rows, -1)
    hidden = model.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    image_hidden = hidden[:, length - 1:]  # (B, N, hidden): boi and each fed-back token
    if model.config.use_gen_pos_embed:
        image_hidden = image_hidden + model.gen_pos_embed[:, :num_tokens]
    return hidden, model.image_out_projector(image_hidden).reshape(rows * num_tokens, -1)


@torch.no_grad()
def own_samples(model: NextStepModel, batch: TrainingBatch, steps: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, N, token_dim): each image token sampled by the model itself given the TRUE tokens
    before it (one parallel pass, no guidance): the kind of imperfect token it will feed back to
    itself when generating. Euler steps of the flow ODE from noise, `steps` head evaluations."""
    conditions = image_conditions(model, batch, sequence_embeddings(model, batch))[1]
    shape = batch.target_tokens.shape
    x = torch.randn(conditions.shape[0], shape[2], generator=generator).to(conditions)
    for k in range(steps):
        t = torch.full((x.shape[0],), k / steps, device=x.device, dtype=x.dtype)
        x = x + model.image_head.net(x, t, conditions).to(x.dtype) / steps
    return x.reshape(shape).to(batch.target_tokens.dtype)


CHANGED_TOKEN_RMS = 0.25  # a target token counts as edited when it differs from the source's by more (RMS)


def edited_token_weights(batch: TrainingBatch, changed_weight: float,
                         threshold: float = CHANGED_TOKEN_RMS) -> torch.Tensor | None:
    """(B * N,) flow-loss weights: `changed_weight` for the image tokens of edit rows that differ
    from the source image's token at the same position (RMS difference above `threshold`), 1 for
    every other token; None when there is nothing to weight. Most of an edit's target is a copy
    of its source, so without this the few edited tokens carry little of the loss. Edit rows
    come first in a batch (one source per edit row, as TrainingBatch says)."""
    if changed_weight == 1.0 or batch.source_tokens is None:
        return None
    edits = batch.source_tokens.shape[0]
    targets = batch.target_tokens[:edits]
    if batch.source_tokens.shape != targets.shape:
        raise ValueError(f"changed_weight needs edit sources of the target's size: source tokens "
                         f"{tuple(batch.source_tokens.shape)}, target tokens {tuple(targets.shape)}")
    difference = (targets.float() - batch.source_tokens.float()).pow(2).mean(dim=-1).sqrt()
    weights = torch.ones(batch.target_tokens.shape[:2], device=difference.device)
    weights[:edits] = torch.where(difference > threshold, changed_weight, 1.0)
    return weights.reshape(-1)


def training_losses(model: NextStepModel, batch: TrainingBatch, *, lm_loss_weight: float = 0.01,
                    im_loss_weight: float = 1.0, head_repeats: int = 4,
                    generator: torch.Generator | None = None, input_noise: float = 0.0,
                    self_feed: float = 0.0, self_feed_steps: int = 4, changed_weight: float = 1.0,
                    source_noise: float = 0.0) -> Losses:
    """Both losses on one batch, weighted as the config's lm_loss_weight / im_loss_weight.

    input_noise > 0: the image tokens fed back into the transformer get Gaussian noise of a
    strength drawn per row from U(0, input_noise) (targets stay clean), so that the model learns
    to continue from its own imperfect samples rather than only from exact tokens (exposure bias:
    without it the demo model scores 0.95 when fed the true tokens but 0.50 on its own).
    self_feed > 0: that share of the fed-back tokens (drawn per token) is replaced by the model's
    own samples of them (own_samples), a cheap one-step form of scheduled sampling.
    changed_weight != 1: the flow loss weights the edited tokens of edit rows by it
    (edited_token_weights).
    source_noise > 0: an edit's source image tokens get Gaussian noise of a strength drawn per row
    from U(0, source_noise), so the model learns to edit imperfect images like its own drawings (what
    a chain of edits feeds it) and still copy what it keeps from them cleanly; the changed-token
    weights compare the clean tokens.
    """
    rows, length = batch.input_ids.shape
    num_tokens = batch.target_tokens.shape[1]
    fed_back_noise = None
    if input_noise > 0:
        shape = (rows, num_tokens - 1, batch.target_tokens.shape[2])
        strength = torch.rand(rows, 1, 1, generator=generator) * input_noise
        fed_back_noise = strength * torch.randn(shape, generator=generator)
    fed_batch = batch
    if source_noise > 0 and batch.source_tokens is not None:
        sources = batch.source_tokens
        strength = torch.rand(sources.shape[0], 1, 1, generator=generator) * source_noise
        noisy = sources + (strength * torch.randn(sources.shape, generator=generator)).to(sources)
        fed_batch = TrainingBatch(batch.input_ids, batch.attention_mask, batch.target_tokens,
                                  batch.placeholder_id, noisy)
    if self_feed > 0:
        own = own_samples(model, batch, self_feed_steps, generator)
        swap = (torch.rand(rows, num_tokens, 1, generator=generator) < self_feed).to(own.device)
        fed_batch = TrainingBatch(batch.input_ids, batch.attention_mask, torch.where(swap, own, batch.target_tokens),
                                  batch.placeholder_id, fed_batch.source_tokens)
    hidden, conditions = image_conditions(model, fed_batch, sequence_embeddings(model, fed_batch, fed_back_noise))
    targets = batch.target_tokens.reshape(rows * num_tokens, -1).to(conditions.dtype)
    image_loss = model.image_head.loss(targets, conditions, generator=generator, repeats=head_repeats,
                                       weights=edited_token_weights(batch, changed_weight))

    text_loss = hidden.new_zeros(())
    if model.lm_head is not None and lm_loss_weight > 0 and length > 1:
        logits = model.lm_head(hidden[:, : length - 1]).float()
        labels = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
        if batch.placeholder_id is not None:
            labels = labels.masked_fill(labels == batch.placeholder_id, -100)
        text_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    total = lm_loss_weight * text_loss + im_loss_weight * image_loss
    return Losses(total, text_loss, image_loss)
