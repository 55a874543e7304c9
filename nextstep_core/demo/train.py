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

Tokenizer stage (on crops, `--crop 64`: whole scenes): reconstruction (L1 + L2 + an image-gradient term
standing in for a perceptual loss) through the latent normalisation with the paper's noise perturbation
(Gaussian noise of a random strength added to the normalised latent before decoding).
Model stage: the objective in objective.py (text cross-entropy x lm_loss_weight + flow matching
x im_loss_weight with fm_head_batch_mul repeats), captions dropped 10% of the time so
classifier-free guidance has an unconditional branch; edit triples teach `<image>` editing.

Here: the command line, the run's sizes and the stages; their data is made in data.py, and the
checkpoints, schedule, step budget and precision they share are in stage.py.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.checkpoint import NextStepConfig, save_sharded
from ..engine.model import NextStepModel
from ..engine.prompt import SpecialIds, load_tokenizer
from ..engine.vae import ImageTokenizer
from ..engine.vae_files import VaeConfig, diffusers_keys_to_flux, save_image_tokenizer
from .data import (
    CROP,
    SIZES,
    cached_examples,
    check_edit_share,
    check_size_weights,
    example_batches,
    grouped_batches,
    make_batch,
    own_edit_examples,
    pil_batch_to_pixels,
    random_crops,
)
from .objective import training_losses
from .scenes import scene_dataset
from .stage import (
    StepBudget,
    compute_precision,
    load_state,
    move_optimizer_state,
    resume,
    save_state,
    set_learning_rate,
)
from .tiny import TinySpec, release_state_dict, tiny_config_dict
from .tiny_tokenizer import write_tiny_tokenizer
from .train_args import build_parser

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
            raise SystemExit(f"--size {item!r}: {value!r} is not a whole number "
                             "(or a comma list for vae_ch_mult)") from None
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


def vae_config(spec: TinySpec) -> VaeConfig:
    return VaeConfig.from_dict({"resolution": 64, "ch": spec.vae_ch, "ch_mult": list(spec.vae_ch_mult),
                                "num_res_blocks": spec.vae_res_blocks, "z_channels": 16},
                               nextstep_1_1_defaults=True)


NOISE_STRENGTH = 0.25  # the latent perturbation: Gaussian noise of strength U(0, 0.25) on the normalised latent


def reconstruction_loss(decoded: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """L1 + L2 + the L1 of horizontal and vertical image gradients (edges)."""
    def grads(x):
        return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]

    (dy, dx), (ty, tx) = grads(decoded), grads(pixels)
    return F.l1_loss(decoded, pixels) + F.mse_loss(decoded, pixels) + F.l1_loss(dy, ty) + F.l1_loss(dx, tx)


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


def load_trained_vae(out: Path, device: str = "cpu") -> ImageTokenizer:
    tokenizer = ImageTokenizer(vae_config(run_spec(out)))
    tokenizer.load_state_dict(load_state(out / "vae.pt")["weights"])
    return tokenizer.eval().to(device)


def new_demo_model(text_tokenizer, spec: TinySpec, seed: int) -> tuple[NextStepModel, dict]:
    special = SpecialIds.from_tokenizer(text_tokenizer)
    config_dict = tiny_config_dict(spec, len(text_tokenizer), asdict(special), "1.1")
    config_dict.update(lm_loss_weight=0.01, im_loss_weight=1.0, fm_head_batch_mul=4)
    torch.manual_seed(seed)
    return NextStepModel(NextStepConfig.from_dict(config_dict), spec.head_dim, spec.head_layers), config_dict


def train_model(out: Path, steps: int, batch_size: int, seed: int, save_every: int, log,
                scenes: int = 12000, edits: int = 6000, device: str = "cpu",
                minutes: float | None = None, init_from: Path | None = None, lr: float = 5e-4,
                input_noise: float = 0.0, self_feed: float = 0.0, bf16: bool = False,
                edit_share: float | None = None, changed_weight: float = 1.0, free_captions: float = 0.0,
                scene_sizes=SIZES, batch_tokens: int | None = None,
                size_weights: dict | None = None, phrasing_weights: dict | None = None,
                reading_order: bool = True, edit_kinds: dict | None = None, source_noise: float = 0.0,
                default_background: bool = True, own_edits: Path | None = None, edit_sizes=None) -> NextStepModel:
    """The model stage. `init_from` (a model.pt of an earlier run of the same sizes) starts a new
    run from those weights, with a fresh optimiser and schedule (ignored when resuming).
    `input_noise`, `self_feed`: see objective.training_losses. `bf16`: see compute_precision.
    `edit_share`: see group_weights. `changed_weight`: see objective.edited_token_weights.
    `free_captions`, `scene_sizes`, `batch_tokens`, `size_weights`, `phrasing_weights`,
    `reading_order`, `default_background`, `edit_kinds`: see data.make_batch, build_examples,
    example_batches. `source_noise`: see objective.training_losses. `own_edits`, `edit_sizes`: see
    build_examples."""
    check_size_weights(size_weights, scene_sizes)  # before minutes of encoding; example_batches checks the data
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
    examples = cached_examples(out, load_trained_vae(out, device), seed, scenes, edits, log, bf16=bf16,
                               sizes=scene_sizes, edit_kinds=edit_kinds, edit_sizes=edit_sizes)
    if own_edits is not None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            examples += [(k, t, tgt.float(), src.float(), g) for k, t, tgt, src, g in
                         own_edit_examples(load_trained_vae(out, device), own_edits, log)]
    rng = np.random.default_rng(seed + start)
    batches = example_batches(examples, batch_size, rng, edit_share, batch_tokens, size_weights)
    generator = torch.Generator().manual_seed(seed + start)
    budget = StepBudget(steps, minutes, start, log)
    began = time.perf_counter()

    def save(done: int) -> None:
        save_state(path, weights=model.state_dict(), optimizer=optimizer.state_dict(), step=done)

    for step, total in budget.run(save_every, save):
        batch = make_batch(text_tokenizer, special, next(batches), rng, free_captions, phrasing_weights,
                           reading_order, default_background).to(device)
        with compute_precision(device, bf16):
            losses = training_losses(model, batch, lm_loss_weight=0.01, head_repeats=4, generator=generator,
                                     input_noise=input_noise, self_feed=self_feed, changed_weight=changed_weight,
                                     source_noise=source_noise)
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

    pipe = NextStepPipeline.from_folder(folder, load_lm_head=True)  # training fits the text head too
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
    parser = build_parser(__doc__.split("\n")[0], str(Path(__file__).parent.parent / "demo_model"))
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
                    edit_share=args.edit_share, changed_weight=args.changed_weight,
                    free_captions=args.free_captions, scene_sizes=args.scene_sizes, batch_tokens=args.batch_tokens,
                    size_weights=args.size_weights, phrasing_weights=args.phrasing_weights,
                    reading_order=args.unplaced_order == "reading", edit_kinds=args.edit_kinds,
                    source_noise=args.source_noise, default_background=args.free_background == "default",
                    own_edits=args.own_edits and Path(args.own_edits), edit_sizes=args.edit_sizes)
    else:
        log(f"exported to {export(out, Path(args.to))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
