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

from .model import NextStepModel


@dataclass
class TrainingBatch:
    """input_ids/attention_mask (B, L): prompt rows ending in boi (see prompt.build_prompt_rows,
    cfg 1); target_tokens (B, N, 64); source_tokens (B, M, 64) fill the placeholders of edit rows."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_tokens: torch.Tensor
    placeholder_id: int | None = None
    source_tokens: torch.Tensor | None = None

    def to(self, device) -> "TrainingBatch":
        """The same batch with its tensors on `device`."""
        source = None if self.source_tokens is None else self.source_tokens.to(device)
        return TrainingBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_tokens.to(device),
                             self.placeholder_id, source)


@dataclass
class Losses:
    total: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor


def sequence_embeddings(model: NextStepModel, batch: TrainingBatch) -> torch.Tensor:
    """(B, L + N - 1, hidden): prompt embeddings (placeholders filled) then the fed-back image tokens."""
    embeds = model.backbone.embed_tokens(batch.input_ids)
    if batch.source_tokens is not None:
        placeholders = batch.input_ids == batch.placeholder_id
        projected = model.image_in_projector(batch.source_tokens.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter(placeholders[..., None], projected)
    fed_back = model.image_in_projector(batch.target_tokens[:, :-1].to(embeds.dtype))
    return torch.cat([embeds, fed_back], dim=1)


def training_losses(model: NextStepModel, batch: TrainingBatch, *, lm_loss_weight: float = 0.01,
                    im_loss_weight: float = 1.0, head_repeats: int = 4,
                    generator: torch.Generator | None = None) -> Losses:
    """Both losses on one batch, weighted as the config's lm_loss_weight / im_loss_weight."""
    rows, length = batch.input_ids.shape
    num_tokens = batch.target_tokens.shape[1]
    embeds = sequence_embeddings(model, batch)
    mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(rows, num_tokens - 1)], dim=1)
    positions = torch.arange(embeds.shape[1], device=embeds.device).expand(rows, -1)
    hidden = model.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state

    image_hidden = hidden[:, length - 1:]  # (B, N, hidden): boi and each fed-back token
    if model.config.use_gen_pos_embed:
        image_hidden = image_hidden + model.gen_pos_embed[:, :num_tokens]
    conditions = model.image_out_projector(image_hidden).reshape(rows * num_tokens, -1)
    targets = batch.target_tokens.reshape(rows * num_tokens, -1).to(conditions.dtype)
    image_loss = model.image_head.loss(targets, conditions, generator=generator, repeats=head_repeats)

    text_loss = hidden.new_zeros(())
    if model.lm_head is not None and lm_loss_weight > 0 and length > 1:
        logits = model.lm_head(hidden[:, : length - 1]).float()
        labels = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
        if batch.placeholder_id is not None:
            labels = labels.masked_fill(labels == batch.placeholder_id, -100)
        text_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    total = lm_loss_weight * text_loss + im_loss_weight * image_loss
    return Losses(total, text_loss, image_loss)
