"""Classifier-free guidance: how the branches' velocities combine, and the cfg schedules.

The head runs on every guidance branch at once. Its rows are branch-major, in the prompt rows'
order (engine/prompt.py): rows [b * n : (b + 1) * n] belong to branch b, and the branches are
`cond`, then `uncond_text` when cfg > 1, then `uncond_image` when editing with cfg_img > 1.
"""

from __future__ import annotations

import torch

from ..engine.prompt import COND, UNCOND_IMAGE, UNCOND_TEXT
from ..errors import NextStepError
from .settings import CFG_SCHEDULES

BRANCH_ORDER = (COND, UNCOND_TEXT, UNCOND_IMAGE)


def guidance_scales(k: int, num_tokens: int, cfg: float, cfg_img: float, schedule: str,
                    rising: bool) -> tuple[float, float]:
    """The (cfg, cfg_img) used for the k-th generated token (k from 0) of num_tokens.

    constant: the given scales. linear, falling (1.0): 1 + (scale - 1) (N - k) / N.
    linear, rising (1.1): max(scale / 2, 1 + (scale - 1) k / N).
    """
    if schedule == "constant":
        return cfg, cfg_img
    if schedule != "linear":
        raise NextStepError(f"cfg schedule {schedule!r} is not one of {', '.join(CFG_SCHEDULES)}")
    if rising:
        return tuple(max(s / 2, 1 + (s - 1) * k / num_tokens) for s in (cfg, cfg_img))
    return tuple(1 + (s - 1) * (num_tokens - k) / num_tokens for s in (cfg, cfg_img))


def check_branches(branches: list[str]) -> None:
    """The branches must be `cond` followed by the others in BRANCH_ORDER (as the prompt rows are)."""
    if branches[:1] != [COND] or branches != [b for b in BRANCH_ORDER if b in branches]:
        raise ValueError(f"guidance branches {branches} are not in the order {list(BRANCH_ORDER)}, cond first")


def combine_guidance(velocity: torch.Tensor, branches: list[str], cfg: float, cfg_img: float) -> torch.Tensor:
    """Branch-major velocities (len(branches) * n, D) -> guided velocity (n, D).

    [cond]:                                 v1
    [cond, uncond_text]:                    v2 + cfg (v1 - v2)
    [cond, uncond_image]:                   v3 + cfg_img (v1 - v3)
    [cond, uncond_text, uncond_image]:      v3 + cfg_img (v2 - v3) + cfg (v1 - v2)
    """
    count = len(branches)
    if count == 1:
        return velocity
    n = velocity.shape[0] // count
    v1, rest = velocity[:n], velocity[n:]
    if count == 3:
        v2, v3 = rest[:n], rest[n:]
        return v3 + cfg_img * (v2 - v3) + cfg * (v1 - v2)
    scale = cfg if branches[1] == UNCOND_TEXT else cfg_img
    return rest + scale * (v1 - rest)


def clamp_velocity_norm(guided: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
    """Scale each row of the guided velocity by min(1, |v_cond| / (|v| + 1e-6))."""
    ratio = conditional.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-6)
    return guided * ratio.clamp(max=1.0)


def guide(velocity: torch.Tensor, branches: list[str], cfg: float, cfg_img: float,
          velocity_norm: bool) -> torch.Tensor:
    """The guided velocity (n, D) from the head's branch-major output (len(branches) * n, D):
    combine_guidance, then (velocity_norm, with more than one branch) clamp_velocity_norm
    against the conditional rows."""
    guided = combine_guidance(velocity, branches, cfg, cfg_img)
    if velocity_norm and len(branches) > 1:
        guided = clamp_velocity_norm(guided, velocity[: guided.shape[0]])
    return guided
