"""The flow-matching head: a small AdaLN MLP that maps (noisy token, time, condition) to a velocity.

Parameter names match the released checkpoints under `image_head.net.*`:
`input_proj`, `cond_embed`, `time_embed.mlp.{0,2}`, `res_blocks.{i}.{in_ln,mlp.0,mlp.2,adaLN_modulation.1}`,
`final_layer.{linear,adaLN_modulation.1}`.

Convention: t = 0 is noise, t = 1 is data, x_t = t * x1 + (1 - t) * noise, and the network
predicts the velocity x1 - noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TIME_FREQUENCIES = 256


def timestep_features(t: torch.Tensor, size: int = TIME_FREQUENCIES, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t (rows,) -> (rows, size): the cos half first, then the sin half.

    t is used as is (in [0, 1]; no x1000 scaling), computed in float32.
    """
    half = size // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """LayerNorm -> modulate(shift, scale) -> Linear-SiLU-Linear -> gated residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, token_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, token_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale))


class FlowNet(nn.Module):
    """velocity = net(x (rows, token_dim), t (rows,), condition (rows, cond_dim)) -> (rows, token_dim)."""

    def __init__(self, token_dim: int, cond_dim: int, dim: int, layers: int):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, dim)
        self.cond_embed = nn.Linear(cond_dim, dim)
        self.time_embed = TimeEmbedding(dim)
        self.res_blocks = nn.ModuleList(ResBlock(dim) for _ in range(layers))
        self.final_layer = FinalLayer(dim, token_dim)

    def embed_condition(self, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """y = time embedding + condition embedding, (rows, dim)."""
        return self.time_embed(t) + self.cond_embed(condition)

    def forward_embedded(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(x, self.embed_condition(t, condition))


class FlowHead(nn.Module):
    """Holds the net under the released name `image_head.net`; the training loss lives here."""

    def __init__(self, token_dim: int, cond_dim: int, dim: int = 1536, layers: int = 12):
        super().__init__()
        self.net = FlowNet(token_dim, cond_dim, dim, layers)

    def loss(self, tokens: torch.Tensor, condition: torch.Tensor, generator: torch.Generator | None = None,
             repeats: int = 1) -> torch.Tensor:
        """Flow-matching loss on clean tokens (rows, token_dim) given conditions (rows, cond_dim).

        t = sigmoid(u), u ~ N(0, 1) (logit-normal); each row is repeated `repeats` times with
        fresh noise and time (the paper's `fm_head_batch_mul`).
        """
        if repeats > 1:
            tokens = tokens.repeat(repeats, 1)
            condition = condition.repeat(repeats, 1)
        noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
        u = torch.randn(tokens.shape[0], generator=generator, device=tokens.device)
        t = torch.sigmoid(u).to(tokens.dtype)
        x_t = t[:, None] * tokens + (1 - t[:, None]) * noise
        velocity = self.net(x_t, t, condition)
        return (velocity.float() - (tokens - noise).float()).pow(2).mean()
