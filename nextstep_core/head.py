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
        draw_on = generator.device if generator is not None else tokens.device  # a CPU generator serves a GPU run
        noise = torch.randn(tokens.shape, generator=generator, device=draw_on, dtype=tokens.dtype).to(tokens.device)
        u = torch.randn(tokens.shape[0], generator=generator, device=draw_on).to(tokens.device)
        t = torch.sigmoid(u).to(tokens.dtype)
        x_t = t[:, None] * tokens + (1 - t[:, None]) * noise
        velocity = self.net(x_t, t, condition)
        return (velocity.float() - (tokens - noise).float()).pow(2).mean()


class TokenHead:
    """A FlowNet prepared for fast sampling: what is constant while one token is sampled is
    computed once, so each sampler step runs only the per-step part of the net.

    Constant per generation: the time embeddings of the sampler's evaluation times (one per
    step, `rows` rows each, computed exactly as the net would). Constant per token: the
    condition embedding, and every block's AdaLN modulation (shift, 1 + scale, gate) for all
    steps. With `exact=True` each step's modulation is its own (rows, dim) product, as in the
    net, so the results are the net's bits; `exact=False` computes all steps in one
    (steps * rows, dim) product, reading each AdaLN weight once per token instead of once per
    step (a matmul's rounding depends on its row count: differences ~1e-7 relative).

    Shapes: condition (rows, cond_dim); x (rows, token_dim); step i indexes `times`.
    """

    def __init__(self, net: FlowNet, times: torch.Tensor, rows: int, dtype: torch.dtype, exact: bool = True):
        self.net = net
        self.exact = exact
        self.dtype = dtype
        # (steps, rows, dim): the time embedding of each evaluation time, one (rows,) batch each
        self.time_embeddings = torch.stack([net.time_embed(t.expand(rows).to(dtype)) for t in times])
        self.blocks: list[tuple[list[torch.Tensor], ...]] = []
        self.final: tuple[list[torch.Tensor], ...] = ()
        pair = lambda linear: (linear.weight, linear.bias)  # noqa: E731
        self.weights = (
            pair(net.input_proj),
            [(pair(b.in_ln), pair(b.mlp[0]), pair(b.mlp[2])) for b in net.res_blocks],
            pair(net.final_layer.linear),
        )

    def set_condition(self, condition: torch.Tensor) -> None:
        """Precompute every step's modulations for one token's head conditions (rows, cond_dim)."""
        y = self.time_embeddings + self.net.cond_embed(condition)  # (steps, rows, dim)
        activated = F.silu(y)
        self.blocks = []
        for block in self.net.res_blocks:
            shift, scale, gate = self.modulation(block.adaLN_modulation[1], activated).chunk(3, dim=-1)
            self.blocks.append((shift.unbind(0), (1 + scale).unbind(0), gate.unbind(0)))
        shift, scale = self.modulation(self.net.final_layer.adaLN_modulation[1], activated).chunk(2, dim=-1)
        self.final = (shift.unbind(0), (1 + scale).unbind(0))

    def modulation(self, linear: nn.Linear, activated: torch.Tensor) -> torch.Tensor:
        """(steps, rows, dim) -> (steps, rows, out) = linear applied to every step."""
        steps, rows, dim = activated.shape
        if not self.exact:
            return F.linear(activated.reshape(steps * rows, dim), linear.weight, linear.bias).reshape(steps, rows, -1)
        # one (rows, dim) product per step, as the net computes it: a matmul's rounding can
        # depend on how many rows it is given, so batching the steps would change the bits
        return torch.stack([F.linear(a, linear.weight, linear.bias) for a in activated.unbind(0)])

    def velocity(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The net's output (rows, token_dim) for state x (rows, token_dim) at evaluation `step`."""
        blocks = [(shift[step], scale[step], gate[step]) for shift, scale, gate in self.blocks]
        return self.evaluate(x, blocks, (self.final[0][step], self.final[1][step]))

    def evaluate(self, x: torch.Tensor, blocks: list, final: tuple) -> torch.Tensor:
        """The net's own operations in its order, called as functions (no module dispatch), with
        one step's modulations: blocks [(shift, 1 + scale, gate)], final (shift, 1 + scale),
        each (rows, dim). A function of tensors only, so torch.compile needs no step guard."""
        weights = self.weights
        h = F.linear(x, *weights[0])
        for (ln, up, down), (shift, scale, gate) in zip(weights[1], blocks):
            modulated = F.layer_norm(h, h.shape[-1:], *ln, eps=1e-6) * scale + shift
            h = h + gate * F.linear(F.silu(F.linear(modulated, *up)), *down)
        shift, scale = final
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * scale + shift
        return F.linear(h, *weights[2])

    def compile(self, mode: str | None = None) -> None:
        """torch.compile the per-step evaluation (mode "reduce-overhead" captures CUDA graphs)."""
        self.evaluate = torch.compile(self.evaluate, mode=mode, dynamic=False)
