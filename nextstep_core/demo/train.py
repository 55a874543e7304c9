"""Train a small NextStep on procedurally drawn scenes: the image tokenizer, then the model.

    python -m nextstep_core.demo.train vae   --out runs/demo --steps 3000
    python -m nextstep_core.demo.train model --out runs/demo --steps 8000
    python -m nextstep_core.demo.train export --out runs/demo --to nextstep_core/demo_model

To go on from an exported model instead (the shipped demo model, say):

    python -m nextstep_core.demo.train import --out runs/more --from nextstep_core/demo_model
    python -m nextstep_core.demo.train model --out runs/more --steps 2000 --init-from runs/more/imported_model.pt

Each stage saves a resumable checkpoint (`<out>/<stage>.pt`: weights, optimiser, step) every
`--save-every` steps and continues from it when run again. Everything is seeded: the same
command on the same device gives the same weights (`--device cuda` trains on a GPU; random
draws come from CPU generators on every device). The run's sizes (demo_spec() plus `--size
name=value` overrides) are kept in `<out>/spec.json` for the later stages. The exported model
is a NextStep-1.1 release-layout folder (config.json, model.safetensors, tokenizer files, vae/).

Tokenizer stage (on crops, `--crop 64`: whole scenes): reconstruction (L1 + L2 + an image-gradient term standing in for a perceptual
loss) through the latent normalisation with the paper's noise perturbation (Gaussian noise of a
random strength added to the normalised latent before decoding).
Model stage: the objective in objective.py (text cross-entropy x lm_loss_weight + flow matching
x im_loss_weight with fm_head_batch_mul repeats), captions dropped 10% of the time so
classifier-free guidance has an unconditional branch; edit triples teach `<image>` editing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..engine.checkpoint import NextStepConfig, save_sharded
from ..engine.model import NextStepModel, patchify
from ..engine.prompt import SpecialIds, build_prompt_rows, load_tokenizer
from ..engine.vae import ImageTokenizer
from ..engine.vae_files import VaeConfig, diffusers_keys_to_flux, save_image_tokenizer
from .objective import TrainingBatch, training_losses
from .scenes import edit_dataset, scene_dataset
from .tiny import TinySpec, release_state_dict, tiny_config_dict
from .tiny_tokenizer import write_tiny_tokenizer

SIZES = ((64, 64), (64, 64), (128, 64), (64, 128))


DEMO_SIZES = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=768, max_position_embeddings=1024, head_dim=384, head_layers=4,
                  vae_ch=64, vae_ch_mult=(1, 1, 2, 2), vae_res_blocks=1)


# cfg 3.0 scored best on the demo model (README: "The demo model, as of now").
DEMO_SAMPLING_DEFAULTS = {"cfg": 3.0}


def demo_spec(**overrides) -> TinySpec:
    """Sizes of the demo model (8.5 M parameters, tokenizer 4.1 M); overrides make smaller ones for tests."""
    return TinySpec(**{**DEMO_SIZES, **overrides})


SPEC_FILE = "spec.json"


def parse_size_overrides(items: list[str]) -> dict:
    """`--size name=value` arguments -> {name: value} for TinySpec fields (ints; ch_mult as 1,2,2)."""
    fields = TinySpec.__dataclass_fields__
    overrides = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"--size {item!r}: expected name=value with name one of {', '.join(fields)}")
        try:
            overrides[name] = tuple(int(v) for v in value.split(",")) if name == "vae_ch_mult" else int(value)
        except ValueError:
            raise SystemExit(f"--size {item!r}: {value!r} is not a whole number (or a comma list for vae_ch_mult)")
    return overrides


def run_spec(out: Path, overrides: dict | None = None) -> TinySpec:
    """The run's sizes: demo_spec() updated by `<out>/spec.json`. Given `overrides` (a stage
    started from the command line, even with none), the whole spec with the overrides applied
    is written back, so that later stages and resumed ones build the same shapes even if
    DEMO_SIZES changes in between."""
    path = out / SPEC_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if "vae_ch_mult" in saved:
        saved["vae_ch_mult"] = tuple(saved["vae_ch_mult"])
    spec = demo_spec(**{**saved, **(overrides or {})})
    if overrides is not None:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")
    return spec


def pil_batch_to_pixels(images) -> torch.Tensor:
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def vae_config(spec: TinySpec) -> VaeConfig:
    return VaeConfig.from_dict({"resolution": 64, "ch": spec.vae_ch, "ch_mult": list(spec.vae_ch_mult),
                                "num_res_blocks": spec.vae_res_blocks, "z_channels": 16},
                               nextstep_1_1_defaults=True)


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


def save_state(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


CROP = 32  # the tokenizer is convolutional: training on crops is 4x cheaper than on whole 64px scenes
NOISE_STRENGTH = 0.25  # the latent perturbation: Gaussian noise of strength U(0, 0.25) on the normalised latent


def random_crops(pixels: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One random size x size crop per image (aligned to the 8-pixel latent grid)."""
    crops = []
    for image in pixels:
        size_y, size_x = min(size, image.shape[1]), min(size, image.shape[2])
        top = 8 * int(rng.integers(0, (image.shape[1] - size_y) // 8 + 1))
        left = 8 * int(rng.integers(0, (image.shape[2] - size_x) // 8 + 1))
        crops.append(image[:, top:top + size_y, left:left + size_x])
    return torch.stack(crops)


def compute_precision(device: str, bf16: bool):
    """The context the forward pass runs in (the backward keeps its dtypes): bfloat16 autocast when `bf16` (on CPUs
    with AMX or AVX-512 BF16 its matrix products run ~6x faster than float32; on CPU the math SDPA
    kernel then trains ~1.4x faster than the flash one at these short sequences), else nothing.
    Master weights, optimiser state and losses stay float32 either way."""
    stack = contextlib.ExitStack()
    if bf16:
        device_type = torch.device(device).type
        stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
        if device_type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def resume(path: Path, module: torch.nn.Module, optimizer) -> int:
    """Load a stage checkpoint into module and optimiser if there is one; returns the step to start from."""
    state = load_state(path)
    if state is None:
        return 0
    module.load_state_dict(state["weights"])
    if state["optimizer"]:  # an imported tokenizer (import_folder) comes without optimiser state
        optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def set_learning_rate(optimizer, step: int, steps: int, peak: float, warmup: int) -> None:
    """Linear warm-up over `warmup` steps (the same whatever `steps` is), then cosine decay to zero at `steps`."""
    if step < warmup:
        rate = peak * (step + 1) / warmup
    else:
        rate = peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = rate


def reconstruction_loss(decoded: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """L1 + L2 + the L1 of horizontal and vertical image gradients (edges)."""
    def grads(x):
        return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]

    (dy, dx), (ty, tx) = grads(decoded), grads(pixels)
    return F.l1_loss(decoded, pixels) + F.mse_loss(decoded, pixels) + F.l1_loss(dy, ty) + F.l1_loss(dx, tx)


class StepBudget:
    """Fixes a stage's step count from its own speed when asked to fit a time budget.

    steps > 0: that many steps. steps == 0 with `minutes`: time the first `probe` steps (all
    inside the warm-up, whose learning rate does not depend on the total), then set the total
    so the run ends in about `minutes`; the chosen total is logged, and passing it as `--steps`
    repeats the run exactly. `minutes` with steps > 0 only stops early (saving first)."""

    def __init__(self, steps: int, minutes: float | None, start: int, log, probe: int = 100):
        if steps <= 0 and not minutes:
            raise SystemExit("give --steps, or --steps 0 with --minutes")
        self.steps, self.minutes, self.log, self.probe = steps, minutes, log, probe
        self.start, self.began = start, time.perf_counter()

    def total(self, step: int) -> int:
        """The step count (a provisional large one while still probing)."""
        if self.steps <= 0 and step >= self.start + self.probe:
            rate = (step - self.start) / (time.perf_counter() - self.began)
            remaining = self.minutes * 60 - (time.perf_counter() - self.began)
            self.steps = step + max(1, int(0.97 * rate * remaining))
            self.log(f"steps set to {self.steps} ({rate:.1f} steps/s, {self.minutes} min budget)")
        return self.steps if self.steps > 0 else 1 << 30

    def out_of_time(self) -> bool:
        return bool(self.minutes) and time.perf_counter() - self.began > self.minutes * 60

    def run(self, save_every: int, save) -> Iterator[tuple[int, int]]:
        """Yields (step, total) for each step to run, from `start`. After a step, calls
        save(steps done) every `save_every` steps and at the end (count reached or time up)."""
        step = self.start
        while step < self.total(step):
            yield step, self.total(step)
            step += 1
            done = step >= self.total(step) or self.out_of_time()
            if step % save_every == 0 or done:
                save(step)
            if done:
                return


def train_vae(out: Path, steps: int, batch_size: int, seed: int, save_every: int, log, crop: int = CROP,
              freeze_encoder: bool = False, scenes: int = 4000, device: str = "cpu",
              minutes: float | None = None) -> ImageTokenizer:
    """The tokenizer stage. With `freeze_encoder` only the decoder learns: the latent space stays
    fixed, so the model stage can train on the encoder's tokens while the decoder keeps improving."""
    spec = run_spec(out)
    torch.manual_seed(seed)
    tokenizer = ImageTokenizer(vae_config(spec))
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=1e-3, weight_decay=0.0)
    path = out / "vae.pt"
    start = resume(path, tokenizer, optimizer)
    tokenizer.to(device)
    move_optimizer_state(optimizer, device)
    tokenizer.autoencoder.encoder.requires_grad_(not freeze_encoder)  # AdamW skips parameters without gradients
    samples = scene_dataset(seed, scenes, SIZES)
    rng = np.random.default_rng(seed + start)
    generator = torch.Generator().manual_seed(seed + start)
    batches = grouped_batches(samples, batch_size, rng)
    budget = StepBudget(steps, minutes, start, log)
    began = time.perf_counter()

    def save(done: int) -> None:
        save_state(path, weights=tokenizer.state_dict(), optimizer=optimizer.state_dict(), step=done)

    for step, total in budget.run(save_every, save):
        pixels = random_crops(pil_batch_to_pixels([image for image, _ in next(batches)]), crop, rng).to(device)
        with torch.set_grad_enabled(not freeze_encoder):
            mean, _ = tokenizer.posterior(pixels)
        strength = torch.rand(mean.shape[0], 1, 1, 1, generator=generator) * NOISE_STRENGTH
        noisy = mean + (strength * torch.randn(mean.shape, generator=generator)).to(device)
        loss = reconstruction_loss(tokenizer.decode(noisy), pixels)
        set_learning_rate(optimizer, step, total, peak=1e-3, warmup=200)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            log(f"vae step {step + 1}/{budget.total(step + 1)} loss {loss.item():.4f} "
                f"({time.perf_counter() - began:.0f}s)")
    return tokenizer.eval()


def move_optimizer_state(optimizer, device: str) -> None:
    """Put a resumed optimiser's moment tensors on the training device (they load on the CPU)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)


def load_trained_vae(out: Path, device: str = "cpu") -> ImageTokenizer:
    tokenizer = ImageTokenizer(vae_config(run_spec(out)))
    tokenizer.load_state_dict(load_state(out / "vae.pt")["weights"])
    return tokenizer.eval().to(device)


@torch.no_grad()
def encode_tokens(tokenizer: ImageTokenizer, images) -> torch.Tensor:
    """PIL images of one size -> (n, tokens, 64) normalised latent tokens, on the tokenizer's device."""
    device = next(tokenizer.parameters()).device
    return torch.cat([patchify(tokenizer.encode(pil_batch_to_pixels(images[i:i + 256]).to(device)))
                      for i in range(0, len(images), 256)])


def build_examples(tokenizer_vae: ImageTokenizer, seed: int, scenes: int, edits: int, log):
    """(kind, caption, target tokens, source tokens | None, grid) examples, encoded once."""
    examples = []
    pairs = scene_dataset(seed + 1, scenes, SIZES)
    triples = edit_dataset(seed + 2, edits, SIZES)
    for size in sorted({im.size for im, _ in pairs}):
        chosen = [(im, cap) for im, cap in pairs if im.size == size]
        tokens = encode_tokens(tokenizer_vae, [im for im, _ in chosen])
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


def cached_examples(out: Path, tokenizer_vae: ImageTokenizer, seed: int, scenes: int, edits: int, log,
                    bf16: bool = False):
    """build_examples(), kept in `<out>/examples-<key>.pt` so that a resumed or repeated run does
    not encode the same images again. The key covers the arguments, the encoding precision and
    the tokenizer's weights (vae.pt), so a changed tokenizer never reuses stale tokens."""
    digest = hashlib.sha1(f"{seed} {scenes} {edits} {bf16}".encode())
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
                        build_examples(tokenizer_vae, seed, scenes, edits, log)]
        tmp = path.with_suffix(".tmp")
        torch.save(examples, tmp)
        tmp.replace(path)
    return [(k, t, tgt.to(device), None if src is None else src.to(device), g) for k, t, tgt, src, g in examples]


def make_batch(text_tokenizer, special: SpecialIds, examples, rng: np.random.Generator) -> TrainingBatch:
    """Teacher-forcing rows for examples of one kind and size, with guidance dropout."""
    kind, grid = examples[0][0], examples[0][4]
    captions, sources = [], []
    for _, caption, _, source, _ in examples:
        drop = rng.random()
        if kind == "t2i":
            captions.append("" if drop < 0.1 else caption)
        elif drop < 0.05:  # negative alone: the image-free guidance branch, trained as t2i
            captions.append("")
        else:
            captions.append("<image>" if drop < 0.15 else caption)
            sources.append(source)
    texts_with_image = [c for c in captions if "<image>" in c]
    plain = [c for c in captions if "<image>" not in c]
    order = [i for i, c in enumerate(captions) if "<image>" in c] + [i for i, c in enumerate(captions) if "<image>" not in c]
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


def new_demo_model(text_tokenizer, spec: TinySpec, seed: int) -> tuple[NextStepModel, dict]:
    special = SpecialIds.from_tokenizer(text_tokenizer)
    config_dict = tiny_config_dict(spec, len(text_tokenizer), asdict(special), "1.1")
    config_dict.update(lm_loss_weight=0.01, im_loss_weight=1.0, fm_head_batch_mul=4)
    torch.manual_seed(seed)
    return NextStepModel(NextStepConfig.from_dict(config_dict), spec.head_dim, spec.head_layers), config_dict


def check_edit_share(edit_share: float | None) -> None:
    """SystemExit unless `--edit-share` is unset or between 0 and 1."""
    if edit_share is not None and not 0 <= edit_share <= 1:
        raise SystemExit(f"--edit-share {edit_share} must be between 0 and 1")


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


def train_model(out: Path, steps: int, batch_size: int, seed: int, save_every: int, log,
                scenes: int = 12000, edits: int = 6000, device: str = "cpu",
                minutes: float | None = None, init_from: Path | None = None, lr: float = 5e-4,
                input_noise: float = 0.0, self_feed: float = 0.0, bf16: bool = False,
                edit_share: float | None = None, changed_weight: float = 1.0) -> NextStepModel:
    """The model stage. `init_from` (a model.pt of an earlier run of the same sizes) starts a new
    run from those weights, with a fresh optimiser and schedule (ignored when resuming).
    `input_noise`, `self_feed`: see objective.training_losses. `bf16`: see compute_precision.
    `edit_share`: see group_weights. `changed_weight`: see objective.edited_token_weights."""
    spec = run_spec(out)
    text_folder = write_tiny_tokenizer(out / "text_tokenizer", vocab_size=640)
    text_tokenizer = load_tokenizer(text_folder)
    special = SpecialIds.from_tokenizer(text_tokenizer)
    model, config_dict = new_demo_model(text_tokenizer, spec, seed)
    (out / "model_config.json").write_text(json.dumps(config_dict, indent=2))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    path = out / "model.pt"
    start = resume(path, model, optimizer)
    if start == 0 and init_from is not None:
        model.load_state_dict({k: v.float() for k, v in load_state(Path(init_from))["weights"].items()})
        log(f"model weights from {init_from}")
    model.to(device)
    move_optimizer_state(optimizer, device)
    examples = cached_examples(out, load_trained_vae(out, device), seed, scenes, edits, log, bf16=bf16)
    groups: dict[tuple, list] = {}
    for example in examples:
        groups.setdefault((example[0], example[4]), []).append(example)
    keys = list(groups)
    weights = group_weights(keys, [len(groups[k]) for k in keys], edit_share)
    rng = np.random.default_rng(seed + start)
    generator = torch.Generator().manual_seed(seed + start)
    budget = StepBudget(steps, minutes, start, log)
    began = time.perf_counter()

    def save(done: int) -> None:
        save_state(path, weights=model.state_dict(), optimizer=optimizer.state_dict(), step=done)

    for step, total in budget.run(save_every, save):
        key = keys[rng.choice(len(keys), p=weights)]
        chosen = [groups[key][i] for i in rng.choice(len(groups[key]), size=batch_size, replace=False)]
        batch = make_batch(text_tokenizer, special, chosen, rng).to(device)
        with compute_precision(device, bf16):
            losses = training_losses(model, batch, lm_loss_weight=0.01, head_repeats=4, generator=generator,
                                     input_noise=input_noise, self_feed=self_feed, changed_weight=changed_weight)
        set_learning_rate(optimizer, step, total, peak=lr, warmup=300)
        optimizer.zero_grad()
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0:
            log(f"model step {step + 1}/{budget.total(step + 1)} image {losses.image.item():.4f} "
                f"text {losses.text.item():.3f} ({time.perf_counter() - began:.0f}s)")
    return model.eval()


IMPORTED_MODEL = "imported_model.pt"


def import_folder(folder: Path, out: Path, log) -> None:
    """Start a run from a model folder in the 1.1 release layout (an exported run, such as the
    shipped demo model): `<out>/spec.json` takes its sizes, `<out>/vae.pt` its tokenizer (step 0,
    no optimiser state) and `<out>/imported_model.pt` its weights, for `model --init-from`.
    Its text tokenizer must be the one training writes (tiny_tokenizer)."""
    from ..pipeline import NextStepPipeline  # the public loader, float32

    pipe = NextStepPipeline.from_folder(folder)
    config, vae, net = pipe.model.config, pipe.image_tokenizer.config, pipe.model.image_head.net
    training_vocab = load_tokenizer(write_tiny_tokenizer(out / "text_tokenizer", vocab_size=640)).get_vocab()
    if pipe.tokenizer.get_vocab() != training_vocab:
        raise SystemExit(f"{folder}: its text tokenizer is not the one training writes (tiny_tokenizer); "
                         "only folders exported by this training can be imported")
    run_spec(out, dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                       num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                       intermediate_size=config.intermediate_size,
                       max_position_embeddings=config.max_position_embeddings,
                       head_dim=net.input_proj.out_features, head_layers=len(net.res_blocks),
                       vae_ch=vae.ch, vae_ch_mult=tuple(vae.ch_mult), vae_res_blocks=vae.num_res_blocks))
    save_state(out / "vae.pt", weights=pipe.image_tokenizer.state_dict(), optimizer={}, step=0)
    save_state(out / IMPORTED_MODEL, weights=pipe.model.state_dict(), optimizer={}, step=0)
    log(f"imported {folder}: sizes in {SPEC_FILE}, tokenizer in vae.pt, weights in {IMPORTED_MODEL}")


def export(out: Path, target: Path) -> Path:
    """Write the trained model in the NextStep-1.1 release layout (float16 weights)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(out / "text_tokenizer" / name, target / name)
    config_dict = json.loads((out / "model_config.json").read_text())
    config_dict["torch_dtype"] = "float16"
    config_dict["sampling_defaults"] = DEMO_SAMPLING_DEFAULTS
    (target / "config.json").write_text(json.dumps(config_dict, indent=2))
    spec = run_spec(out)
    model = NextStepModel(NextStepConfig.from_dict(config_dict), spec.head_dim, spec.head_layers)
    model.load_state_dict(load_state(out / "model.pt")["weights"])
    tensors = {k: v.half() for k, v in release_state_dict(model).items()}
    save_sharded(target, tensors, shards=1)
    vae = load_trained_vae(out)
    flux = diffusers_keys_to_flux(vae.autoencoder.state_dict(), len(vae.config.ch_mult))
    save_image_tokenizer(target / "vae", vae.config, {k: v.half() for k, v in flux.items()}, fmt="safetensors")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nextstep_core.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["import", "vae", "model", "export"])
    parser.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--crop", type=int, default=CROP, help="tokenizer stage: train on crops of this size (64: whole scenes)")
    parser.add_argument("--freeze-encoder", action="store_true",
                        help="tokenizer stage: train the decoder only (the latent space the model stage sees stays fixed)")
    parser.add_argument("--from", dest="source", help="import stage: the model folder to start the run from")
    parser.add_argument("--to", default=str(Path(__file__).parent.parent / "demo_model"), help="export target folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the same draws either way; float rounding differs)")
    parser.add_argument("--minutes", type=float,
                        help="time budget: with --steps 0 the step count is fitted to it (and logged); else stop early")
    parser.add_argument("--scenes", type=int, help="training scenes (default: tokenizer 4000, model 12000)")
    parser.add_argument("--edits", type=int, default=6000, help="model stage: training edit triples")
    parser.add_argument("--init-from", help="model stage: start from the weights of this model.pt (fresh optimiser)")
    parser.add_argument("--lr", type=float, default=5e-4, help="model stage: peak learning rate")
    parser.add_argument("--input-noise", type=float, default=0.0,
                        help="model stage: noise strength U(0, this) on the image tokens fed back to the transformer")
    parser.add_argument("--self-feed", type=float, default=0.0,
                        help="model stage: share of fed-back image tokens replaced by the model's own samples of them")
    parser.add_argument("--edit-share", type=float,
                        help="model stage: share of batches drawn from the edit examples (default: their share of the data)")
    parser.add_argument("--changed-weight", type=float, default=1.0,
                        help="model stage: flow-loss weight of the edited tokens of edit examples (those that "
                             "differ from the source image's; every other token weighs 1)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast for the forward/backward passes and the tokenizer's encoding "
                             "(float32 weights and optimiser; much faster on CPUs with AMX)")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=VALUE",
                        help="override a size of demo_spec() (TinySpec field, e.g. vae_ch=64, vae_ch_mult=1,2,2,2, "
                             "hidden_size=256); kept in <out>/spec.json for the later stages")
    args = parser.parse_args(argv)
    check_edit_share(args.edit_share)  # here too: group_weights runs only after minutes of encoding
    if args.changed_weight <= 0:
        raise SystemExit(f"--changed-weight {args.changed_weight} must be above 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage != "import":
        run_spec(out, parse_size_overrides(args.size))
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def log(message: str) -> None:
        print(message, flush=True)
        with open(out / "train.log", "a") as f:
            f.write(message + "\n")

    if args.stage == "import":
        if not args.source:
            raise SystemExit("import needs --from MODEL_FOLDER")
        import_folder(Path(args.source), out, log)
    elif args.stage == "vae":
        train_vae(out, args.steps, args.batch_size, args.seed, args.save_every, log, crop=args.crop,
                  freeze_encoder=args.freeze_encoder, scenes=args.scenes or 4000, device=args.device,
                  minutes=args.minutes)
    elif args.stage == "model":
        train_model(out, args.steps, args.batch_size, args.seed, args.save_every, log, scenes=args.scenes or 12000,
                    edits=args.edits, device=args.device, minutes=args.minutes, init_from=args.init_from,
                    lr=args.lr, input_noise=args.input_noise, self_feed=args.self_feed, bf16=args.bf16,
                    edit_share=args.edit_share, changed_weight=args.changed_weight)
    else:
        log(f"exported to {export(out, Path(args.to))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
