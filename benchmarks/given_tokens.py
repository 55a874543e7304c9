"""Given tokens on the demo model: continuation, region redraw and masked edit, scored by the
demo checker on held-out scenes (tests/given_scenes.py), with the given tokens' identity checked.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/given_tokens.py --count 24 --report benchmarks/given_tokens.json

Prints and writes: the mean checker score of each kind (continuation: the scene's caption;
region: the caption of the scene with the masked object replaced; masked edit and the same
edit unmasked: the target's caption), and whether every given token came back identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from given_scenes import continuation_cases, edit_cases, region_cases  # noqa: E402

from nextstep_core import DEMO_MODEL, NextStepPipeline  # noqa: E402
from nextstep_core.demo.checker import score, score_edit  # noqa: E402
from nextstep_core.demo.scenes import caption, render  # noqa: E402


def kept(result, reference_tokens) -> bool:
    """Every given position of every image holds the reference's token, bit for bit."""
    given = result.given
    return bool(torch.equal(result.tokens[:, given], reference_tokens[given].expand(result.tokens.shape[0], -1, -1)))


def measure(pipe, count: int, seed: int = 0, **sampling) -> dict:
    started = time.perf_counter()
    out = {}
    scores, identical = [], True
    for i, scene in enumerate(continuation_cases(count)):
        image = render(scene)
        result = pipe.generate(caption(scene), reference=image, keep_rows=2, seed=seed + i, **sampling)
        scores.append(score(result.to_pil()[0], caption(scene)))
        identical &= kept(result, pipe.reference_tokens(pipe.image_input(image, "reference")))
    out["continuation"] = {"score": float(np.mean(scores)), "given_identical": identical, "scores": scores}
    scores, identical = [], True
    for i, (source, target, mask) in enumerate(region_cases(count)):
        image = render(source)
        result = pipe.generate(caption(target), reference=image, region=mask, seed=seed + i, **sampling)
        scores.append(score(result.to_pil()[0], caption(target)))
        identical &= kept(result, pipe.reference_tokens(pipe.image_input(image, "reference")))
    out["region"] = {"score": float(np.mean(scores)), "given_identical": identical, "scores": scores}
    masked, unmasked, identical = [], [], True
    for i, (source, instruction, target, mask) in enumerate(edit_cases(count)):
        image = render(source)
        prompt = f"<image> {instruction}"
        result = pipe.generate(prompt, image=image, region=mask, seed=seed + i, **sampling)
        masked.append(score_edit(result.to_pil()[0], caption(target)))
        identical &= kept(result, pipe.reference_tokens(pipe.image_input(image, "reference")))
        plain = pipe.generate(prompt, image=image, seed=seed + i, **sampling)
        unmasked.append(score_edit(plain.to_pil()[0], caption(target)))
    out["masked_edit"] = {"score": float(np.mean(masked)), "unmasked_score": float(np.mean(unmasked)),
                          "given_identical": identical, "scores": masked, "unmasked_scores": unmasked}
    out["count"], out["seconds"] = count, round(time.perf_counter() - started, 1)
    out["settings"] = sampling
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report")
    args = parser.parse_args(argv)
    pipe = NextStepPipeline.from_folder(args.model)
    sampling = {} if args.steps is None else {"steps": args.steps}
    report = measure(pipe, args.count, args.seed, **sampling)
    summary = {k: {m: v for m, v in r.items() if not m.endswith("scores")} if isinstance(r, dict) else r
               for k, r in report.items()}
    print(json.dumps(summary, indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
