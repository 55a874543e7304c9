"""Next-set decoding's schedule: which image tokens each decoder pass feeds and samples, and
the annealed head-step schedule. Pure Python, no tensors (sampling/parallel.py runs it).

Grid of H rows x W columns; raster slot s = r W + c. Window w (1 <= w <= W; parallel_window 0,
or any w >= W, means w = W, which is sequential decoding): row r starts once the row above is
w tokens ahead, every active row adds one token per pass, so token (r, c) is decided at step

    t(r, c) = r w + c.

Step 0 is the prefill's output (token (0, 0)); every later step is one decoder pass. Hence

    forward passes = t(H - 1, W - 1) = (H - 1) w + W - 1      (sequential: H W - 1),

for any H x W grid (ZipAR counts 2W + (W - 2) w for its own convention on a W x W grid; this
schedule needs W - w passes fewer because a new row's first token is sampled in the same pass
that sends the row above its w-th token).

Context. The query that samples token s sees the prompt and exactly the raster slots s' < s
decided at steps t(s') < t(s) (tests/test_parallel_decoding.py checks the masks against this
closed form): for w = W that is every earlier slot, as in sequential decoding.

Queries of a pass (each at its own raster slot; its position id is prompt length + slot and
it writes its key/value into that slot of the cache):
- for token (r, c), c >= 1: feeds the real token (r, c - 1) at slot r W + c - 1;
- for (r, 0), r >= 1, when (r - 1, W - 1) is decided already (w = W): feeds that token at slot
  r W - 1, as sequential decoding does;
- otherwise (w < W) a row-start placeholder at slot r W - 1, which the real token (r - 1, W - 1)
  has not reached yet. ROW_STARTS names the ways to feed it (parallel.py): "copy", the row
  above's newest token (the one its own query feeds in the same pass, as ZipAR does), or
  "above", the token right above the new row's first, (r - 1, 0), each visible to the
  placeholder itself only; "masked", a zero input whose own slot stays masked. In every case
  the slot counts as unfilled for every other query until the real token is written;
- a fill query in the pass after a row's last token (r, W - 1) is decided (w < W), writing it
  into slot (r + 1) W - 1; it samples nothing.
A given token (sampling/given.py) is decided at its step like any other, without a head; its
query still feeds the token before it (a pass's queries do not depend on what is given, except
that a row-start placeholder is skipped when the row's first token is given).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NextStepError

ROW_STARTS = ("copy", "above", "masked")


@dataclass(frozen=True)
class Query:
    """One query of a decoder pass. slot: the raster slot it sits at (position and cache slot);
    source: the slot of the token it feeds (None: a masked placeholder, zero input); sample:
    the slot of the token sampled from its hidden state (None: it only feeds); placeholder:
    a row start standing in for a token not decided yet (its slot stays unfilled)."""

    slot: int
    source: int | None
    sample: int | None
    placeholder: bool = False


@dataclass(frozen=True)
class Pass:
    """Step `step` >= 1: its queries in slot order, and every slot decided at this step."""

    step: int
    queries: tuple[Query, ...]
    decided: tuple[int, ...]

    @property
    def sampled(self) -> tuple[int, ...]:
        """The slots sampled in this pass, in query order."""
        return tuple(q.sample for q in self.queries if q.sample is not None)


def effective_window(window: int, cols: int) -> int:
    """parallel_window as the schedule uses it: 0 or anything >= cols is cols (sequential)."""
    return cols if window <= 0 or window >= cols else window


def decision_step(slot: int, cols: int, window: int) -> int:
    """t(r, c) = r w + c of raster slot r W + c (window already effective)."""
    return (slot // cols) * window + slot % cols


def predicted_forward_passes(token_grid: tuple[int, int], window: int) -> int:
    """Decoder passes after the prefill: (H - 1) w + W - 1, with w the effective window."""
    rows, cols = token_grid
    return (rows - 1) * effective_window(window, cols) + cols - 1


def plan_passes(token_grid: tuple[int, int], window: int, given: list[bool], row_start: str = "copy") -> list[Pass]:
    """The decoder passes (steps 1 .. last) of a grid at `window` (raw parallel_window)."""
    if row_start not in ROW_STARTS:
        raise ValueError(f"row_start {row_start!r} is not one of {ROW_STARTS}")
    rows, cols = token_grid
    w = effective_window(window, cols)
    last = predicted_forward_passes(token_grid, window)
    passes = []
    for step in range(1, last + 1):
        queries, decided = [], []
        for r in range(rows):
            c = step - r * w
            if 0 <= c < cols:
                slot = r * cols + c
                decided.append(slot)
                sample = None if given[slot] else slot
                if c:
                    queries.append(Query(slot - 1, slot - 1, sample))
                elif decision_step(slot - 1, cols, w) < step:  # w = W: the real token is there
                    queries.append(Query(slot - 1, slot - 1, sample))
                elif sample is not None:
                    source = {"copy": (r - 1) * cols + (step - 1 - (r - 1) * w), "above": (r - 1) * cols,
                              "masked": None}[row_start]
                    queries.append(Query(slot - 1, source, sample, placeholder=True))
            if r + 1 < rows and c == cols and w < cols:  # fill: row r's last token, decided last step
                end = r * cols + cols - 1
                queries.append(Query(end, end, None))
        queries.sort(key=lambda q: q.slot)
        passes.append(Pass(step, tuple(queries), tuple(sorted(decided))))
    return passes


def pass_visibility(filled: torch.Tensor, queries: tuple[Query, ...],
                    row_start: str = "copy") -> tuple[torch.Tensor, torch.Tensor]:
    """filled (N,) bool: slots holding a real token before the pass -> (filled after the pass,
    visible (queries, N) bool): query j sees the filled slots at or before its own slot (filled
    in this pass or earlier); a placeholder but a "masked" one also sees its own slot, which
    stays unfilled."""
    after = filled.clone()
    after[[q.slot for q in queries if not q.placeholder]] = True
    slots = torch.tensor([q.slot for q in queries])
    visible = after[None] & (torch.arange(len(filled))[None] <= slots[:, None])
    if row_start != "masked":
        for i, q in enumerate(queries):
            if q.placeholder:
                visible[i, q.slot] = True
    return after, visible


def check_schedule_options(parallel_window, head_steps_floor, steps: int, sampler: str) -> None:
    """parallel_window: an int >= 0; head_steps_floor: None or an int in [1 (2 for
    euler_maruyama), steps]. Raises NextStepError naming the option."""
    if isinstance(parallel_window, bool) or not isinstance(parallel_window, int) or parallel_window < 0:
        raise NextStepError(f"parallel_window {parallel_window!r} must be a whole number >= 0 (0: one token per pass)")
    if head_steps_floor is None:
        return
    lowest = 2 if sampler == "euler_maruyama" else 1
    if isinstance(head_steps_floor, bool) or not isinstance(head_steps_floor, int) or head_steps_floor < lowest:
        raise NextStepError(f"head_steps_floor {head_steps_floor!r} must be a whole number >= {lowest} for the "
                            f"{sampler} sampler (None: every token takes all steps)")
    if head_steps_floor > steps:
        raise NextStepError(f"head_steps_floor {head_steps_floor} is above the sampler's {steps} steps: "
                            f"use at most {steps}")


def annealed_steps(slot: int, num_tokens: int, steps: int, floor: int | None) -> int:
    """Head steps of the token at raster slot `slot`: `steps` when floor is None; else linear
    in the slot from `steps` (slot 0) down to `floor` (the last slot), rounded half up."""
    if floor is None or num_tokens == 1:
        return steps
    span = num_tokens - 1
    return steps - ((steps - floor) * slot * 2 + span) // (2 * span)
