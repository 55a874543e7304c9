"""Command line: `python -m nextstep_core generate --prompt "..." --out out.png`.

Given tokens (docs/given-tokens.md): `--keep-rows N --reference PATH` continues a picture
below its first N token rows; `--region MASK --reference PATH` redraws the masked area (white
or any nonzero pixel = redraw, `--grow N` widens it by N tokens); `--region MASK` with `--image`
is a masked edit (outside the mask the edit image's own tokens are kept)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import DEMO_MODEL
from .checks import check_device, check_output_path, read_image
from .demo.vocabulary import demo_model_warning
from .errors import NextStepError
from .request import Given, Guidance, Output, Request, Sampling, resolve_folder
from .sampling.settings import SAMPLERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nextstep_core", description="NextStep-1 / 1.1 image generation")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text-to-image, or editing with --image")
    gen.add_argument("--prompt", required=True, help="caption; for editing it holds one <image> marker")
    gen.add_argument("--out", required=True, help="output PNG; several images become out_0.png, out_1.png, ...")
    gen.add_argument("--model", help="model folder (default: the embedded demo model)")
    gen.add_argument("--vae", help="image tokenizer folder (1.0: NextStep-1-f8ch16-Tokenizer; 1.1 has vae/ inside)")
    gen.add_argument("--version", default="auto", choices=["auto", "1.0", "1.1"], help="override version detection")
    gen.add_argument("--negative", help="negative prompt (default empty)")
    gen.add_argument("--positive", help="text appended to the caption after a space")
    size_help = "pixels, a multiple of 16 (default 256; 64 for the demo model; the input image's when editing)"
    gen.add_argument("--width", type=int, help=size_help)
    gen.add_argument("--height", type=int, help=size_help)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--cfg", type=float, help="text guidance scale (default: the version's, 7.5)")
    gen.add_argument("--cfg-img", type=float, help="image guidance scale for editing (default 2.0)")
    gen.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"])
    gen.add_argument("--steps", type=int, help="sampler steps per token (default: 50 for 1.0, 28 for 1.1; the few-step "
                     "samplers' own: heun 4, midpoint 4, dpm2m 8, dpm2m_sde 8)")
    gen.add_argument("--shift", type=float, help="time shift (default: 1.0; 3.2 for 1.0 editing)")
    gen.add_argument("--sampler", default="auto", choices=["auto", *SAMPLERS],
                     help="auto: the model's own (euler_maruyama for 1.0, sde for 1.1); heun, midpoint, dpm2m, "
                          "dpm2m_sde: few-step samplers (fewer head evaluations per token)")
    gen.add_argument("--noise-level", type=float, default=0.8, help="for the sde, cps and dpm2m_sde samplers")
    gen.add_argument("--use-norm", action=argparse.BooleanOptionalAction, default=None,
                     help="layer-normalise each token (default: on for 1.0, off for 1.1)")
    gen.add_argument("--velocity-norm", action="store_true", help="clamp the guided velocity's norm (1.1 option)")
    gen.add_argument("--parallel-window", type=int, default=0, metavar="W",
                     help="several tokens per decoder pass: a token row starts once the row above is W tokens "
                          "ahead (0: one token per pass, the default; docs/parallel-decoding.md)")
    gen.add_argument("--head-steps-floor", type=int, metavar="N",
                     help="annealed head steps: later tokens take fewer flow steps, down to N for the last")
    gen.add_argument("--image", help="input image for editing")
    gen.add_argument("--reference", help="image whose tokens are kept, for --keep-rows and --region (the output "
                     "takes its size)")
    gen.add_argument("--keep-rows", type=int, default=0, metavar="N",
                     help="continuation: keep the reference's first N token rows (16 px each), draw the rest")
    gen.add_argument("--region", metavar="MASK",
                     help="mask image of the output's size: nonzero (white) pixels are redrawn, the rest kept from "
                          "--reference, or with --image a masked edit")
    gen.add_argument("--grow", type=int, default=0, metavar="N", help="widen --region by N tokens")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--quiet", action="store_true")
    return parser


def output_paths(out: str, count: int) -> list[Path]:
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix or '.png'}") for i in range(count)]


def write_png(picture, path: Path) -> None:
    """Write through a temporary file beside the target, renamed into place once complete, so an
    interrupted or failed write never leaves a partial image under the output name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        picture.save(partial, format="PNG")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def cli_request(args, model) -> Request:
    """The request the command line asks for (the size defaults to 256, 64 for the demo model,
    when there is no input image to take it from)."""
    image = read_image(args.image) if args.image else None
    reference = read_image(args.reference, "reference image") if args.reference else None
    # a pixel nonzero in any channel is to be redrawn (a greyscale conversion could round a dark one to 0)
    region = np.asarray(read_image(args.region, "region mask")).max(axis=-1) if args.region else None
    width, height = args.width, args.height
    if image is None and reference is None:
        default = 64 if model == DEMO_MODEL else 256  # the demo model was trained on 64-128 px scenes
        width = default if width is None else width
        height = default if height is None else height
    return Request(
        negative=args.negative, positive=args.positive, image=image,
        sampling=Sampling(sampler=args.sampler, steps=args.steps, shift=args.shift, noise_level=args.noise_level,
                          velocity_norm=args.velocity_norm, use_norm=args.use_norm,
                          parallel_window=args.parallel_window, head_steps_floor=args.head_steps_floor),
        guidance=Guidance(cfg=args.cfg, cfg_img=args.cfg_img, schedule=args.cfg_schedule),
        given=Given(reference=reference, keep_rows=args.keep_rows, region=region, grow=args.grow),
        output=Output(size=(width, height), num_images=args.num_images, seed=args.seed),
    )


def run_generate(args) -> list[Path]:
    model = args.model
    if model is None:
        if not (DEMO_MODEL / "config.json").is_file():
            raise NextStepError("no --model given and the embedded demo model is not shipped yet: pass --model DIR")
        model = DEMO_MODEL
    check_output_path(args.out)
    check_device(args.device)
    request = cli_request(args, model)
    # Every setting is checked against the folder's config and tokenizer before a weight is read.
    resolve_folder(model, request, args.prompt, vae_folder=args.vae, version=args.version)

    from .pipeline import NextStepPipeline

    started = time.perf_counter()
    pipe = NextStepPipeline.from_folder(model, args.vae, version=args.version, precision=args.dtype,
                                        device=args.device)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    warning = demo_model_warning(pipe.folder, args.prompt)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    log(f"loaded {model} as NextStep-{pipe.version.name} ({'; '.join(pipe.version_reasons)}) "
        f"in {time.perf_counter() - started:.1f}s")

    def progress(done: int, total: int, tokens) -> None:
        if not args.quiet and (done == total or done % max(1, total // 20) == 0):
            print(f"\rtoken {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    result = pipe.generate(args.prompt, request, callback=progress)
    paths = output_paths(args.out, len(result.images))
    for path, picture in zip(paths, result.to_pil()):
        write_png(picture, path)
        log(f"wrote {path}")
    log(f"done in {time.perf_counter() - started:.1f}s")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_generate(args)
    except NextStepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
