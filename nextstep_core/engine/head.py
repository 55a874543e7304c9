"""The flow-matching head: a small AdaLN MLP that maps (noisy token, time, condition) to a velocity.

Parameter names match the released checkpoints under `image_head.net.*`:
`input_proj`, `cond_embed`, `time_embed.mlp.{0,2}`, `res_blocks.{i}.{in_ln,mlp.0,mlp.2,adaLN_modulation.1}`,
`final_layer.{linear,adaLN_modulation.1}`.

Convention: t = 0 is noise, t = 1 is data, x_t = t * x1 + (1 - t) * noise, and the network
predicts the velocity x1 - noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import KERNEL_NAMES, Product, choose_kernel, forced_kernel

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
             repeats: int = 1, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss on clean tokens (rows, token_dim) given conditions (rows, cond_dim).

        t = sigmoid(u), u ~ N(0, 1) (logit-normal); each row is repeated `repeats` times with
        fresh noise and time (the paper's `fm_head_batch_mul`). `weights` (rows,): a weighted
        mean over the rows instead of the plain mean.
        """
        if repeats > 1:
            tokens = tokens.repeat(repeats, 1)
            condition = condition.repeat(repeats, 1)
            weights = None if weights is None else weights.repeat(repeats)
        draw_on = generator.device if generator is not None else tokens.device  # a CPU generator serves a GPU run
        noise = torch.randn(tokens.shape, generator=generator, device=draw_on, dtype=tokens.dtype).to(tokens.device)
        u = torch.randn(tokens.shape[0], generator=generator, device=draw_on).to(tokens.device)
        t = torch.sigmoid(u).to(tokens.dtype)
        x_t = t[:, None] * tokens + (1 - t[:, None]) * noise
        velocity = self.net(x_t, t, condition)
        squared_error = (velocity.float() - (tokens - noise).float()).pow(2)
        if weights is None:
            return squared_error.mean()
        weights = weights.float().to(squared_error.device)
        return (squared_error.mean(dim=1) * weights).sum() / weights.sum()


# Below this a product's work is a few microseconds: call overhead and waking threads dominate, so
# such weights keep F.linear (fast_product) and models made only of them run on one thread (decode.py).
SMALL_WEIGHT_BYTES = 2 * 2**20


def column_linear(x: torch.Tensor, weight: torch.Tensor, bias_column: torch.Tensor) -> torch.Tensor:
    """x (rows, in) -> (rows, out), computed as weight @ x.T + bias into an (out, rows) result
    (returned as its transposed view); bias_column is the bias as (out, 1).

    For 2-4 float32 rows MKL read the weight this way ~3x faster than in F.linear's (rows, in)
    x (in, out) form on an AMD EPYC (benchmarks/README.md); fast_product times it per shape.
    x.T must be a transposed view of a row-major x: a row-major (in, rows) operand takes MKL's
    slow path.
    """
    return torch.addmm(bias_column, weight, x.contiguous().T).T


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear through oneDNN, x (rows, in) -> (rows, out): on an AMD EPYC it read the weights
    ~2x faster than MKL's F.linear for 1 or 5+ rows; fast_product times it per shape."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_works() -> bool:
    """Whether this torch build has oneDNN's linear op and it agrees with F.linear."""
    try:
        x, weight, bias = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        return bool(torch.allclose(onednn_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5))
    except Exception:  # an op missing from this build, or a build without oneDNN
        return False


ONEDNN = onednn_works()


def exact_product(linear: nn.Linear) -> Product:
    """x (rows, in) -> F.linear(x, weight, bias): the net's own product, hence its bits. With a
    bias, as torch.addmm(bias, x, weight.t()) on a transposed view made once, which is the call
    F.linear makes for 2-D input (same kernel, same bits) without two dispatches per product."""
    if linear.bias is None:
        return partial(F.linear, weight=linear.weight, bias=None)
    return partial(addmm_rows, bias=linear.bias, weight_t=linear.weight.t())


def addmm_rows(x: torch.Tensor, bias: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x (rows, in) -> bias + x @ weight_t; other ranks go through F.linear."""
    if x.dim() != 2:
        return F.linear(x, weight_t.t(), bias)
    return torch.addmm(bias, x, weight_t)


def candidate_products(linear: nn.Linear) -> dict[str, Product]:
    """The product kernels fast_product chooses among, by their NEXTSTEP_CPU_KERNEL names (a
    linear with bias): F.linear, column_linear, and oneDNN's linear where this build has it."""
    candidates = {"linear": exact_product(linear),
                  "columns": partial(column_linear, weight=linear.weight, bias_column=linear.bias[:, None])}
    if ONEDNN:
        candidates["onednn"] = partial(onednn_linear, weight=linear.weight, bias=linear.bias)
    return candidates


def fast_product(linear: nn.Linear, rows: int) -> Product:
    """x (rows, in) -> linear(x) with the kernel that was quickest for this weight's shape and
    row count when this process first timed it (kernels.choose_kernel; NEXTSTEP_CPU_KERNEL
    forces one); F.linear, untimed, for small weights, other dtypes than float32, other
    devices and linears without bias. Rounding differs from F.linear (~1e-6 relative)."""
    # a bad NEXTSTEP_CPU_KERNEL is refused whatever the weights
    forced_kernel(name for name in KERNEL_NAMES if ONEDNN or name != "onednn")
    weight = linear.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or linear.bias is None:
        return exact_product(linear)
    if weight.numel() * weight.element_size() < SMALL_WEIGHT_BYTES:
        return exact_product(linear)
    candidates = candidate_products(linear)
    return candidates[choose_kernel(weight, linear.bias, rows, candidates)]


def per_step_modulation(linear: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """activated (steps, rows, dim) -> (steps, rows, out): one F.linear of (rows, dim) per step,
    as the net computes it (a matmul's rounding can depend on its row count, so batching the
    steps would change the bits)."""
    product = exact_product(linear)
    return lambda activated: torch.stack([product(a) for a in activated.unbind(0)])


def all_steps_modulation(linear: nn.Linear, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """activated (steps, rows_per_step, dim) -> (steps, rows_per_step, out): one product of all
    steps' rows (steps * rows_per_step = `rows`), which reads the weight once."""
    product = fast_product(linear, rows)
    return lambda activated: product(activated.flatten(0, 1)).unflatten(0, activated.shape[:2])


class TokenHead:
    """A FlowNet prepared for fast sampling: what is constant while one token is sampled is
    computed once, so each sampler step runs only the per-step part of the net.

    Constant per generation: the time embeddings of the sampler's evaluation times (one per
    step, `rows` rows each, computed exactly as the net would). Constant per token: the
    condition embedding, and every block's AdaLN modulation (shift, 1 + scale, gate) for all
    steps. With `exact=True` each step's modulation is its own (rows, dim) product, as in the
    net, and every product is F.linear, so the results are the net's bits. `exact=False`
    computes all steps' modulations in one (steps * rows, dim) product, reading each AdaLN
    weight once per token instead of once per step, and gives every large weight the product
    kernel measured quickest for its shape and row count (`fast_product`; on CPU in float32).
    Float rounding differs: ~1e-6 relative per product.

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
        product = exact_product if exact else lambda linear: fast_product(linear, rows)  # noqa: E731
        self.products = (
            product(net.input_proj),
            [((b.in_ln.weight, b.in_ln.bias), product(b.mlp[0]), product(b.mlp[2])) for b in net.res_blocks],
            product(net.final_layer.linear),
        )
        linears = [b.adaLN_modulation[1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[1]]
        steps = len(times)
        self.modulations = [per_step_modulation(linear) if exact else all_steps_modulation(linear, steps * rows)
                            for linear in linears]

    def set_condition(self, condition: torch.Tensor) -> None:
        """Precompute every step's modulations for one token's head conditions (rows, cond_dim)."""
        y = self.time_embeddings + self.net.cond_embed(condition)  # (steps, rows, dim)
        activated = F.silu(y)
        *blocks, final = [modulation(activated) for modulation in self.modulations]
        self.blocks = []
        for modulation in blocks:
            shift, scale, gate = modulation.chunk(3, dim=-1)
            self.blocks.append((shift.unbind(0), (1 + scale).unbind(0), gate.unbind(0)))
        shift, scale = final.chunk(2, dim=-1)
        self.final = (shift.unbind(0), (1 + scale).unbind(0))

    def velocity(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The net's output (rows, token_dim) for state x (rows, token_dim) at evaluation `step`."""
        blocks = [(shift[step], scale[step], gate[step]) for shift, scale, gate in self.blocks]
        return self.evaluate(x, blocks, (self.final[0][step], self.final[1][step]))

    def evaluate(self, x: torch.Tensor, blocks: list, final: tuple) -> torch.Tensor:
        """The net's own operations in its order, called as functions (no module dispatch), with
        one step's modulations: blocks [(shift, 1 + scale, gate)], final (shift, 1 + scale),
        each (rows, dim). A function of tensors only, so torch.compile needs no step guard."""
        project_in, res_blocks, project_out = self.products
        h = project_in(x)
        for (ln, up, down), (shift, scale, gate) in zip(res_blocks, blocks):
            modulated = F.layer_norm(h, h.shape[-1:], *ln, eps=1e-6) * scale + shift
            h = h + gate * down(F.silu(up(modulated)))
        shift, scale = final
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * scale + shift
        return project_out(h)

    def compile(self, mode: str | None = None) -> None:
        """torch.compile the per-step evaluation (mode "reduce-overhead" captures CUDA graphs)."""
        self.evaluate = torch.compile(self.evaluate, mode=mode, dynamic=False)
