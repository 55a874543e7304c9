"""The demo's training data: procedurally drawn scenes turned into what the two stages consume.

Tokenizer stage: scenes as pixel tensors, in endless random batches of one image size, cut into
random crops aligned to the latent grid. Model stage: scenes and edit triples encoded once by
the trained tokenizer into (kind, caption, target tokens, source tokens | None, grid) examples,
cached in the run folder, drawn in batches of one kind and grid (group_weights decides how often
each group comes up, `--edit-share`), and turned into teacher-forcing rows with guidance dropout
(make_batch). The stages themselves are in train.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..engine.model import patchify
from ..engine.prompt import IMAGE_MARKER, SpecialIds, build_prompt_rows
from ..engine.vae import ImageTokenizer
from .objective import TrainingBatch
from .own_edits import load_triples
from .phrasing import free_caption, free_instruction
from .scenes import edit_dataset, scene_dataset

SIZES = ((64, 64), (64, 64), (128, 64), (64, 128))  # (width, height) of the training scenes; 64x64 drawn half the time

CROP = 32  # the tokenizer is convolutional: training on crops is 4x cheaper than on whole 64px scenes


def pil_batch_to_pixels(images) -> torch.Tensor:
    """PIL images of one size -> pixels (n, 3, H, W) float32: their 8-bit RGB values x / 127.5 - 1."""
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def random_crops(pixels: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One random size x size crop per image (aligned to the 8-pixel latent grid)."""
    crops = []
    for image in pixels:
        size_y, size_x = min(size, image.shape[1]), min(size, image.shape[2])
        top = 8 * int(rng.integers(0, (image.shape[1] - size_y) // 8 + 1))
        left = 8 * int(rng.integers(0, (image.shape[2] - size_x) // 8 + 1))
        crops.append(image[:, top:top + size_y, left:left + size_x])
    return torch.stack(crops)


def grouped_batches(samples, batch_size: int, rng: np.random.Generator):
    """Endless random batches whose images share one size."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, sample in enumerate(samples):
        by_size.setdefault(sample[0].size, []).append(i)
    sizes = list(by_size)
    weights = np.array([len(by_size[s]) for s in sizes], dtype=np.float64)
    while True:
        size = sizes[rng.choice(len(sizes), p=weights / weights.sum())]
        yield [samples[i] for i in rng.choice(by_size[size], size=min(batch_size, len(by_size[size])), replace=False)]


@torch.no_grad()
def encode_tokens(tokenizer: ImageTokenizer, images) -> torch.Tensor:
    """PIL images of one size -> (n, tokens, 64) normalised latent tokens, on the tokenizer's device."""
    device = next(tokenizer.parameters()).device
    return torch.cat([patchify(tokenizer.encode(pil_batch_to_pixels(images[i:i + 256]).to(device)))
                      for i in range(0, len(images), 256)])


def parse_scene_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'64x64,96x96,128x64' -> ((64, 64), (96, 96), (128, 64)) as (width, height); sides multiples of 16, >= 64."""
    sizes = []
    for item in text.split(","):
        try:
            width, height = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise SystemExit(f"--scene-sizes: {item!r} is not WIDTHxHEIGHT") from None
        if width % 16 or height % 16 or min(width, height) < 64:
            raise SystemExit(f"--scene-sizes: {width}x{height} needs sides that are multiples of 16, at least 64")
        sizes.append((width, height))
    return tuple(sizes)


def parse_size_weights(text: str) -> dict[tuple[int, int], float]:
    """'128x128=3,96x96=2' -> {(128, 128): 3.0, (96, 96): 2.0}: how many times as often batches of
    that scene size (width, height) come up as their share of the examples would give."""
    weights = {}
    for item in text.split(","):
        size, _, factor = item.partition("=")
        try:
            value = float(factor)
        except ValueError:
            raise SystemExit(f"--size-weights: {item.strip()!r} is not WIDTHxHEIGHT=FACTOR") from None
        if not value > 0:
            raise SystemExit(f"--size-weights: the factor of {size.strip()} must be above 0, not {factor}")
        weights[parse_scene_sizes(size)[0]] = value
    return weights


def build_examples(tokenizer_vae: ImageTokenizer, seed: int, scenes: int, edits: int, log, sizes=SIZES,
                   edit_kinds: dict[str, float] | None = None, edit_sizes=None):
    """(kind, caption, target tokens, source tokens | None, grid) examples, encoded once; scene
    i has size sizes[i % len(sizes)] (width, height); edit kinds drawn with `edit_kinds` weights;
    the edits of size edit_sizes[i % len(edit_sizes)] (default `sizes`)."""
    examples = []
    pairs = scene_dataset(seed + 1, scenes, sizes)
    triples = edit_dataset(seed + 2, edits, edit_sizes or sizes, edit_kinds)
    for size in sorted({im.size for im, _ in pairs} | {s.size for s, _, _ in triples}):
        chosen = [(im, cap) for im, cap in pairs if im.size == size]
        tokens = encode_tokens(tokenizer_vae, [im for im, _ in chosen]) if chosen else []
        grid = (size[1] // 16, size[0] // 16)
        examples += [("t2i", cap, tok, None, grid) for (_, cap), tok in zip(chosen, tokens)]
        chosen_edits = [t for t in triples if t[0].size == size]
        if chosen_edits:
            sources = encode_tokens(tokenizer_vae, [s for s, _, _ in chosen_edits])
            targets = encode_tokens(tokenizer_vae, [t for _, _, t in chosen_edits])
            examples += [("edit", f"<image> {ins}", tgt, src, grid)
                         for (_, ins, _), src, tgt in zip(chosen_edits, sources, targets)]
    log(f"encoded {len(examples)} training examples")
    return examples


def own_edit_examples(tokenizer_vae: ImageTokenizer, path: Path, log) -> list:
    """The edit triples on a model's own drawings in `path` (own_edits.load_triples) as edit
    examples, (kind, caption, target tokens, source tokens, grid) on the tokenizer's device. A few
    thousand at most: encoded each run, not cached, so the file may be made while the other
    examples encode."""
    examples = []
    triples = load_triples(path)
    for size in sorted({s.shape[:2] for s, _, _ in triples}):
        chosen = [t for t in triples if t[0].shape[:2] == size]
        sources = encode_tokens(tokenizer_vae, [Image.fromarray(s) for s, _, _ in chosen])
        targets = encode_tokens(tokenizer_vae, [Image.fromarray(t) for _, _, t in chosen])
        examples += [("edit", f"<image> {ins}", tgt, src, (size[0] // 16, size[1] // 16))
                     for (_, ins, _), src, tgt in zip(chosen, sources, targets)]
    log(f"encoded {len(examples)} edit triples on the model's own drawings from {path}")
    return examples


def cached_examples(out: Path, tokenizer_vae: ImageTokenizer, seed: int, scenes: int, edits: int, log,
                    bf16: bool = False, sizes=SIZES, edit_kinds: dict[str, float] | None = None,
                    edit_sizes=None):
    """build_examples(), kept in `<out>/examples-<key>.pt` so that a resumed or repeated run does
    not encode the same images again. The key covers the arguments, the encoding precision and
    the tokenizer's weights (vae.pt), so a changed tokenizer never reuses stale tokens."""
    key = (f"{seed} {scenes} {edits} {bf16}" + ("" if tuple(sizes) == SIZES else f" {tuple(sizes)}")
           + (f" {sorted(edit_kinds.items())}" if edit_kinds else "")
           + (f" edits {tuple(edit_sizes)}" if edit_sizes else ""))
    digest = hashlib.sha1(key.encode())
    digest.update((out / "vae.pt").read_bytes())
    path = out / f"examples-{digest.hexdigest()[:12]}.pt"
    device = next(tokenizer_vae.parameters()).device
    if path.is_file():
        examples = torch.load(path, map_location="cpu", weights_only=True)
        log(f"loaded {len(examples)} encoded training examples from {path.name}")
    else:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            examples = [(kind, text, target.float().cpu(), None if source is None else source.float().cpu(), grid)
                        for kind, text, target, source, grid in
                        build_examples(tokenizer_vae, seed, scenes, edits, log, sizes, edit_kinds, edit_sizes)]
        tmp = path.with_suffix(".tmp")
        torch.save(examples, tmp)
        tmp.replace(path)
    return [(k, t, tgt.to(device), None if src is None else src.to(device), g) for k, t, tgt, src, g in examples]


def check_edit_share(edit_share: float | None) -> None:
    """SystemExit unless `--edit-share` is unset or between 0 and 1."""
    if edit_share is not None and not 0 <= edit_share <= 1:
        raise SystemExit(f"--edit-share {edit_share} must be between 0 and 1")


def check_size_weights(size_weights: dict[tuple[int, int], float] | None, sizes) -> None:
    """SystemExit unless every size of `--size-weights` is one of `sizes` ((width, height) pairs)."""
    missing = set(size_weights or {}) - set(sizes)
    if missing:
        names = ", ".join(f"{w}x{h}" for w, h in sorted(missing))
        raise SystemExit(f"--size-weights: no training scenes of size {names} (see --scene-sizes)")


def group_weights(keys: list[tuple], sizes: list[int], edit_share: float | None = None) -> np.ndarray:
    """Probability of drawing each (kind, grid) group for a batch: its share of the examples, or,
    with `edit_share`, that share of all batches split among the edit groups by size (the rest
    among the text-to-image groups the same way)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if edit_share is None:
        return sizes / sizes.sum()
    check_edit_share(edit_share)
    is_edit = np.array([kind == "edit" for kind, _ in keys])
    if not is_edit.any() or is_edit.all():
        raise SystemExit("--edit-share needs both edit and text-to-image examples (--edits and --scenes above 0)")
    return np.where(is_edit, edit_share * sizes / sizes[is_edit].sum(),
                    (1 - edit_share) * sizes / sizes[~is_edit].sum())


def example_batches(examples, batch_size: int, rng: np.random.Generator,
                    edit_share: float | None = None, batch_tokens: int | None = None,
                    size_weights: dict[tuple[int, int], float] | None = None) -> Iterator[list]:
    """Endless batches for the model stage: a (kind, grid) group drawn with group_weights, then
    `batch_size` different examples of it (with `batch_tokens`: as many as give that many image
    tokens, at most batch_size and at least 4, so big images make smaller batches). `size_weights`
    ((width, height) -> factor, parse_size_weights) multiplies the groups of those scene sizes
    before group_weights shares them out. The groups and weights are made (and `edit_share`
    checked) at once; the draws happen as batches are taken."""
    groups: dict[tuple, list] = {}
    for example in examples:
        groups.setdefault((example[0], example[4]), []).append(example)
    keys = list(groups)
    scene_size = {key: (key[1][1] * 16, key[1][0] * 16) for key in keys}  # (width, height) of each group
    check_size_weights(size_weights, scene_size.values())
    counts = [len(groups[k]) * (size_weights or {}).get(scene_size[k], 1.0) for k in keys]
    weights = group_weights(keys, counts, edit_share)

    def draw() -> Iterator[list]:
        while True:
            key = keys[rng.choice(len(keys), p=weights)]
            size = batch_size
            if batch_tokens is not None:
                size = min(batch_size, max(4, batch_tokens // (key[1][0] * key[1][1])))
            group = groups[key]
            yield [group[i] for i in rng.choice(len(group), size=min(size, len(group)), replace=False)]

    return draw()


def make_batch(text_tokenizer, special: SpecialIds, examples, rng: np.random.Generator,
               free_captions: float = 0.0, phrasing_weights: dict | None = None,
               reading_order: bool = True, default_background: bool = True) -> TrainingBatch:
    """Teacher-forcing rows for examples of one kind and size, with guidance dropout; that share
    of the kept captions and edit instructions said in a random free phrasing (phrasing.py,
    random_phrasing with `phrasing_weights`; `reading_order`, `default_background`: see
    phrasing.free_caption's reading_order and default_only)."""
    kind, grid = examples[0][0], examples[0][4]
    captions, sources = [], []
    for _, caption, _, source, _ in examples:
        drop = rng.random()
        if kind == "t2i":
            if drop >= 0.1 and free_captions and rng.random() < free_captions:
                caption = free_caption(caption, rng, phrasing_weights, reading_order, default_background)
            captions.append("" if drop < 0.1 else caption)
        elif drop < 0.05:  # negative alone: the image-free guidance branch, trained as t2i
            captions.append("")
        else:
            if drop >= 0.15 and free_captions and rng.random() < free_captions:
                instruction = caption.removeprefix(IMAGE_MARKER).strip()
                caption = f"{IMAGE_MARKER} {free_instruction(instruction, rng, phrasing_weights)}"
            captions.append(IMAGE_MARKER if drop < 0.15 else caption)
            sources.append(source)
    texts_with_image = [c for c in captions if "<image>" in c]
    plain = [c for c in captions if "<image>" not in c]
    order = ([i for i, c in enumerate(captions) if "<image>" in c]
             + [i for i, c in enumerate(captions) if "<image>" not in c])
    ids, masks = [], []
    if texts_with_image:
        rows = build_prompt_rows(text_tokenizer, texts_with_image, token_grid=grid, edit_grid=grid, cfg=1.0,
                                 cfg_img=1.0, prepend_bos=True)
        ids.append(rows.input_ids)
        masks.append(rows.attention_mask)
    if plain:
        rows = build_prompt_rows(text_tokenizer, plain, token_grid=grid, cfg=1.0, prepend_bos=True)
        ids.append(rows.input_ids)
        masks.append(rows.attention_mask)
    width = max(t.shape[1] for t in ids)
    input_ids = torch.cat([F.pad(t, (width - t.shape[1], 0), value=special.pad) for t in ids])
    attention_mask = torch.cat([F.pad(m, (width - m.shape[1], 0), value=0) for m in masks])
    targets = torch.stack([examples[i][2] for i in order])
    source_tokens = torch.stack(sources) if sources else None
    return TrainingBatch(input_ids, attention_mask, targets, special.placeholder, source_tokens)
