"""Measure prompt-following on held-out scenes: the checker's score for captions and edits, and
the tokenizer's reconstruction PSNR.

    python -m nextstep_core.demo.evaluate --model nextstep_core/demo_model --report benchmarks/demo_eval.json \
        --grid docs/demo_samples.png

Held-out prompts come from seeds the training never uses (training: 0-2; here 1000+), so the
list is fixed and the same for every run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..engine.model import patchify, unpatchify
from ..engine.prompt import SpecialIds, build_prompt_rows
from ..pipeline import NextStepPipeline
from ..sampling.reference_loop import sample_token
from ..sampling.samplers import prepare_sampler
from .checker import find_objects, parse_caption, score, score_specs
from .data import parse_scene_sizes
from .edit_eval import chain_scores, edit_parts, hides_object, summarise_parts
from .objective import TrainingBatch, image_conditions, sequence_embeddings
from .phrasing import FORMS, form_phrasing, phrase, phrase_instruction, random_phrasing, scene_request
from .scenes import EDIT_KINDS, POSITIONS, caption, random_edit, random_scene, render

HELD_OUT_SEED = 1000
EDIT_SEED = 2000
# Free phrasings: their own streams, apart from training's (seeds < 100), the lists above and
# tests/given_scenes.py (3000-3003).
FREE_SEED = 4000
FREE_SIZES = ((64, 64), (96, 96), (128, 128), (128, 64))


def held_out_scenes(count: int, size=(64, 64)):
    rng = np.random.default_rng(HELD_OUT_SEED)
    return [random_scene(rng, *size) for _ in range(count)]


def held_out_edits(count: int, size=(64, 64)):
    rng = np.random.default_rng(EDIT_SEED)
    return [random_edit(rng, random_scene(rng, *size)) for _ in range(count)]


def free_phrased_captions(count: int, size=(64, 64)) -> list[tuple[str, str, list, object]]:
    """(form, caption, requested objects, requested background) for `count` held-out scenes of one
    size, the forms of phrasing.FORMS in turn; "plural" scenes have two objects of one colour."""
    rng = np.random.default_rng([FREE_SEED, *size])
    prompts = []
    for i in range(count):
        form = FORMS[i % len(FORMS)]
        scene = random_scene(rng, *size)
        while form == "plural" and len({o.color for o in scene.objects}) == len(scene.objects):
            scene = random_scene(rng, *size)
        how = random_phrasing(rng) if form == "mixed" else form_phrasing(form)
        text, request = phrase(scene_request(scene), how, rng)
        prompts.append((form, text, list(request.objects), request.background))
    return prompts


def free_phrased_edits(count: int, size=(64, 64)) -> list[tuple[str, Image.Image, str, list, object]]:
    """(form, source image, instruction, target objects, target background) for held-out edits,
    the instruction said in the forms of phrasing.FORMS in turn."""
    rng = np.random.default_rng([FREE_SEED + 1, *size])
    edits = []
    for i in range(count):
        form = FORMS[i % len(FORMS)]
        source, instruction, target = random_edit(rng, random_scene(rng, *size))
        how = random_phrasing(rng) if form == "mixed" else form_phrasing(form)
        text, added_size = phrase_instruction(instruction, how, rng)
        request = scene_request(target)
        objects = list(request.objects)
        if instruction.startswith("add") and added_size is None:  # the added object is listed last
            objects[-1] = replace(objects[-1], size=None)
        edits.append((form, render(source), text, objects, request.background))
    return edits


def draw_captions(pipe: NextStepPipeline, texts: list[str], size=(64, 64), *, seed: int = 0, batch: int = 12,
                  **sampling) -> list[Image.Image]:
    """The images of `texts` at one size (width, height), `batch` at a time, chunk i with seed + i."""
    images = []
    for i in range(0, len(texts), batch):
        images += pipe.generate(texts[i:i + batch], width=size[0], height=size[1], seed=seed + i, **sampling).to_pil()
    return images


def named_order_pairs(image, objects) -> list[bool]:
    """For each two objects named one after the other, both found exactly once (by colour and
    shape): whether the first comes first in reading order (POSITIONS). Training names objects
    without positions in reading order (phrasing.in_reading_order), so a model that learned it
    draws them in the order the caption names them."""
    found = find_objects(image)
    cells = []
    for spec in objects:
        hits = [f for f in found if (f.color, f.shape) == (spec.color, spec.shape)]
        cells.append(POSITIONS.index(hits[0].position) if len(hits) == 1 else None)
    return [a < b for a, b in zip(cells, cells[1:]) if a is not None and b is not None]


def free_phrasing_scores(pipe: NextStepPipeline, *, captions: int = 48, edits: int = 48, sizes=FREE_SIZES,
                         seed: int = 0, batch: int = 12, **sampling) -> dict:
    """Checker scores of free-phrased held-out captions per size and per form (over every size),
    and of free-phrased edits (64x64) per form: the demo model asked the way people ask. Also the
    share of the "no_position" captions' consecutive object pairs drawn in the order named
    (`named_order_pairs`), with the number of such pairs, and the share of the captions that name
    no background whose image has a background in the colour of an object asked for
    (`hides_object`), with the number of such captions."""
    started, per_size, per_form, in_order, hidden = time.perf_counter(), {}, {}, [], []
    for width, height in sizes:
        prompts, scores = free_phrased_captions(captions, (width, height)), []
        images = draw_captions(pipe, [p[1] for p in prompts], (width, height), seed=seed, batch=batch, **sampling)
        for (form, _, objects, background), image in zip(prompts, images):
            scores.append(score_specs(image, objects, background))
            per_form.setdefault(form, []).append(scores[-1])
            if form == "no_position":
                in_order += named_order_pairs(image, objects)
            if background is None:
                hidden.append(hides_object(image, objects))
        per_size[f"{width}x{height}"] = float(np.mean(scores))
    edit_forms = {}
    for k, (form, source, text, objects, background) in enumerate(free_phrased_edits(edits)):
        result = pipe.generate(f"<image> {text}", image=source, seed=seed + k, **sampling)
        edit_forms.setdefault(form, []).append(score_specs(result.to_pil()[0], objects, background))
    return {"free_caption_score_per_size": per_size,
            "free_caption_score_per_form": {f: float(np.mean(v)) for f, v in per_form.items()},
            "no_position_in_named_order": float(np.mean(in_order)) if in_order else None,
            "no_position_pairs": len(in_order),
            "no_background_hides_object": float(np.mean(hidden)) if hidden else None,
            "no_background_captions": len(hidden),
            "free_edit_score": float(np.mean([s for v in edit_forms.values() for s in v])) if edits else None,
            "free_edit_score_per_form": {f: float(np.mean(v)) for f, v in edit_forms.items()},
            "free_captions_per_size": captions, "free_edits": edits,
            "free_seconds": round(time.perf_counter() - started, 1)}


def tokenizer_reconstruction(image_tokenizer, scenes, dtype=torch.float32) -> dict:
    """Encode -> decode rendered scenes: mean PSNR (dB), and the checker's score on the
    reconstructions against the scenes' captions (the ceiling for the model's caption score)."""
    psnr, scores = [], []
    device = next(image_tokenizer.parameters()).device
    for scene in scenes:
        image = np.asarray(render(scene), dtype=np.float32) / 255
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].to(device=device, dtype=dtype) * 2 - 1
        with torch.no_grad():
            out = image_tokenizer.decode(image_tokenizer.encode(pixels))
        recon = ((out.float()[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).cpu().numpy()
        mse = float(np.mean((recon - image) ** 2))
        psnr.append(10 * math.log10(1 / max(mse, 1e-10)))
        scores.append(score(Image.fromarray((recon * 255).round().astype(np.uint8)), caption(scene)))
    return {"psnr_db": float(np.mean(psnr)), "checker_score": float(np.mean(scores))}


def attribute_rates(images, texts) -> dict:
    """Share of captioned objects found with the right colour and position, + shape, + size."""
    counts = np.zeros(4)
    for image, text in zip(images, texts):
        found = find_objects(image)
        for spec in parse_caption(text):
            placed = [f for f in found if (f.color, f.position) == (spec.color, spec.position)]
            shaped = [f for f in placed if f.shape == spec.shape]
            counts += (1, bool(placed), bool(shaped), any(f.size == spec.size for f in shaped))
    return {"color_position": counts[1] / counts[0], "and_shape": counts[2] / counts[0],
            "and_size": counts[3] / counts[0]}


@torch.no_grad()
def teacher_forced_score(pipe: NextStepPipeline, scenes=None, *, edits=None, seed: int = 0, cfg: float | None = None,
                         cfg_img: float | None = None, **sampling) -> float:
    """Caption score when every image token is sampled given the TRUE tokens before it (the
    scene's own, encoded), with guidance and the pipeline's sampler. Against the free-running
    caption score it measures exposure bias: how much the model is thrown by its own samples.

    edits: (source, instruction, target) triples of one size instead of scenes (give one of the
    two): the same for edit instructions, scored against the target's caption."""
    if (scenes is None) == (edits is None):
        raise ValueError("give scenes or edits")
    model, version = pipe.model, pipe.version
    editing = edits is not None
    targets = [e[2] for e in edits] if editing else list(scenes)
    cfg = version.cfg if cfg is None else cfg
    cfg_img = (version.edit_cfg_img if editing else 1.0) if cfg_img is None else cfg_img
    settings = pipe.sampler_settings(sampling.get("sampler", "auto"), sampling.get("steps"), sampling.get("shift"),
                                     sampling.get("noise_level", 0.8), False, editing)
    texts = [caption(s) for s in targets]
    size = (targets[0].width, targets[0].height)
    grid = (size[1] // pipe.pixels_per_token, size[0] // pipe.pixels_per_token)

    def encode(images):
        pixels = torch.cat([pipe.image_tokenizer.pil_to_pixels(render(s)) for s in images]).to(pipe.device, pipe.dtype)
        return patchify(pipe.image_tokenizer.encode(pixels), model.config.latent_patch_size)

    tokens = encode(targets)
    prompts = [f"<image> {e[1]}" for e in edits] if editing else texts
    rows = build_prompt_rows(pipe.tokenizer, prompts, token_grid=grid, edit_grid=grid if editing else None, cfg=cfg,
                             cfg_img=cfg_img, prepend_bos=version.prepend_bos)
    branches = rows.branches
    sources = None
    if editing:
        source_tokens = encode([e[0] for e in edits])
        sources = source_tokens.repeat(len(branches), 1, 1)[rows.image_rows]
    fed = tokens.repeat(len(branches), 1, 1)
    batch = TrainingBatch(rows.input_ids.to(pipe.device), rows.attention_mask.to(pipe.device), fed,
                          SpecialIds.from_tokenizer(pipe.tokenizer).placeholder, sources)
    conditions = image_conditions(model, batch, sequence_embeddings(model, batch))[1].reshape(*fed.shape[:2], -1)
    generator = torch.Generator().manual_seed(seed)
    state_dtype = torch.float32 if version.noise_in_float32 else pipe.dtype
    sampler = prepare_sampler(settings)
    sampled = torch.empty_like(tokens)
    for k in range(tokens.shape[1]):
        sampled[:, k] = sample_token(model.image_head.net, conditions[:, k], branches=branches, cfg=cfg,
                                     cfg_img=cfg_img, sampler=sampler, state_dtype=state_dtype,
                                     noise=lambda: torch.randn(len(targets), tokens.shape[2], generator=generator,
                                                               dtype=state_dtype).to(pipe.device))
    images = pipe.image_tokenizer.latent_to_image(unpatchify(sampled, grid, model.config.latent_patch_size))
    return float(np.mean([score(Image.fromarray((im.cpu().numpy() * 255).round().astype(np.uint8)), text)
                          for im, text in zip(images, texts)]))


def exposure_gap(pipe: NextStepPipeline, count: int, size=(64, 64), *, seed: int = 0, batch: int = 12,
                 **sampling) -> dict:
    """Exact-grammar held-out captions of one size scored both ways: free-running (the model
    feeding back its own tokens) and teacher-forced (teacher_forced_score). The gap between the
    two is what the model loses to its own imperfect tokens at that size."""
    scenes = held_out_scenes(count, size)
    texts = [caption(s) for s in scenes]
    images = draw_captions(pipe, texts, size, seed=seed, batch=batch, **sampling)
    return {"size": f"{size[0]}x{size[1]}", "captions": count,
            "free_running": float(np.mean([score(image, text) for image, text in zip(images, texts)])),
            "teacher_forced": teacher_forced_in_chunks(pipe, scenes=scenes, seed=seed, **sampling)}


def teacher_forced_in_chunks(pipe: NextStepPipeline, *, scenes=None, edits=None, seed: int = 0, chunk: int = 50,
                             **sampling) -> float:
    """teacher_forced_score over many scenes (or edits), `chunk` at a time (chunk i with seed + i),
    each chunk weighted by its length."""
    items, kind = (scenes, "scenes") if edits is None else (edits, "edits")
    total = sum(teacher_forced_score(pipe, **{kind: items[i:i + chunk]}, seed=seed + i, **sampling)
                * len(items[i:i + chunk]) for i in range(0, len(items), chunk))
    return float(total / len(items))


def edit_kind(instruction: str) -> str:
    """The EDIT_KINDS entry an instruction of scenes.random_edit's grammar belongs to."""
    verb = instruction.split()[0]
    return {"make": "recolour", "move": "move", "add": "add", "remove": "remove"}[verb]


def evaluate(pipe: NextStepPipeline, *, captions: int = 100, edits: int = 50, seed: int = 0, batch: int = 10,
             **sampling) -> dict:
    """Scores on held-out captions and edits with the given sampler settings."""
    started = time.perf_counter()
    scenes = held_out_scenes(captions)
    texts = [caption(s) for s in scenes]
    samples = draw_captions(pipe, texts, seed=seed, batch=batch, **sampling)
    t2i_scores = [score(image, text) for image, text in zip(samples, texts)]
    attributes = attribute_rates(samples, texts)
    edit_scores, copy_scores, kinds, parts = [], [], [], []
    for k, (source, instruction, target) in enumerate(held_out_edits(edits)):
        source_image, target_caption = render(source), caption(target)
        result = pipe.generate(f"<image> {instruction}", image=source_image, seed=seed + k, **sampling).to_pil()[0]
        edit_scores.append(score(result, target_caption))
        copy_scores.append(score(source_image, target_caption))
        kinds.append(edit_kind(instruction))
        parts.append(edit_parts(result, source, target))
    return {
        "caption_score": float(np.mean(t2i_scores)),
        "caption_all_right": float(np.mean([s >= 0.999 for s in t2i_scores])),
        "caption_objects": attributes,
        "edit_score": float(np.mean(edit_scores)) if edit_scores else None,
        "edit_kinds": {kind: float(np.mean([s for s, k in zip(edit_scores, kinds) if k == kind]))
                       for kind in EDIT_KINDS if kind in kinds},
        "edit_copy_score": float(np.mean(copy_scores)) if copy_scores else None,
        "edit_parts": summarise_parts(parts, kinds),
        **{f"tokenizer_{k}": v
           for k, v in tokenizer_reconstruction(pipe.image_tokenizer, scenes[:50], pipe.dtype).items()},
        "captions": captions, "edits": edits, "seconds": round(time.perf_counter() - started, 1),
        "settings": {k: v for k, v in sampling.items()},
        "_samples": samples, "_texts": texts,
    }


def sample_grid(images: list[Image.Image], columns: int = 8) -> Image.Image:
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (width + 2), rows * (height + 2)), (128, 128, 128))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * (width + 2), (i // columns) * (height + 2)))
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nextstep_core.demo.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(Path(__file__).parent.parent / "demo_model"))
    parser.add_argument("--captions", type=int, default=100)
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--sampler", default="auto")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg", type=float)
    parser.add_argument("--cfg-img", type=float)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--teacher-forced", type=int, default=0, metavar="N",
                        help="also score N held-out captions (and up to --edits edits) with every token sampled given "
                             "the true tokens before it")
    parser.add_argument("--exposure", type=int, default=0, metavar="N",
                        help="also score N exact-grammar held-out captions per --exposure-sizes both free-running "
                             "and teacher-forced (exposure_gap)")
    parser.add_argument("--exposure-sizes", type=parse_scene_sizes, default=((64, 64), (128, 128)), metavar="WxH,...")
    parser.add_argument("--free", type=int, default=0, metavar="N",
                        help="also score N free-phrased held-out captions per size (64, 96, 128, 128x64) and N "
                             "free-phrased edits, per phrasing form")
    parser.add_argument("--free-edits", type=int, help="free-phrased edits (default: --free)")
    parser.add_argument("--chains", type=int, default=0, metavar="N",
                        help="also run N held-out three-pass chains (a drawing, then three edits each on the "
                             "image before) and score every pass")
    parser.add_argument("--report", help="write the figures as JSON here")
    parser.add_argument("--grid", help="write a PNG grid of the first 32 caption samples here")
    args = parser.parse_args(argv)
    pipe = NextStepPipeline.from_folder(args.model, device=args.device)
    chosen = dict(sampler=args.sampler, steps=args.steps, cfg=args.cfg, cfg_img=args.cfg_img)
    sampling = {k: v for k, v in chosen.items() if v is not None}
    report = evaluate(pipe, captions=args.captions, edits=args.edits, **sampling)
    samples, texts = report.pop("_samples"), report.pop("_texts")
    if args.free:
        edits = args.free if args.free_edits is None else args.free_edits
        report.update(free_phrasing_scores(pipe, captions=args.free, edits=edits, **sampling))
    if args.teacher_forced:
        report["teacher_forced_caption_score"] = teacher_forced_in_chunks(
            pipe, scenes=held_out_scenes(args.teacher_forced), **sampling)
        edits = held_out_edits(min(args.teacher_forced, args.edits))
        if edits:
            report["teacher_forced_edit_score"] = teacher_forced_in_chunks(pipe, edits=edits, **sampling)
    if args.chains:
        report.update(chain_scores(pipe, args.chains, **sampling))
    if args.exposure:
        report["exposure_gap"] = [exposure_gap(pipe, args.exposure, size, **sampling) for size in args.exposure_sizes]
    print(json.dumps(report, indent=2))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        sample_grid(samples[:32]).save(args.grid)
        Path(args.grid).with_suffix(".txt").write_text("\n".join(texts[:32]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
