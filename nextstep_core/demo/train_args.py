"""The command line of nextstep_core.demo.train (its options; the stages are in train.py)."""

from __future__ import annotations

import argparse

from .data import CROP, SIZES, parse_scene_sizes, parse_size_weights
from .edit_eval import parse_edit_kinds
from .phrasing import parse_phrasing_weights


def build_parser(description: str, default_to: str) -> argparse.ArgumentParser:
    """The options of every stage; `default_to` is export's default target folder."""
    parser = argparse.ArgumentParser(prog="python -m nextstep_core.demo.train", description=description)
    parser.add_argument("stage", choices=["import", "vae", "model", "export"])
    parser.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--crop", type=int, default=CROP,
                        help="tokenizer stage: train on crops of this size (64: whole scenes)")
    parser.add_argument("--freeze-encoder", action="store_true",
                        help="tokenizer stage: train the decoder only "
                             "(the latent space the model stage sees stays fixed)")
    parser.add_argument("--from", dest="source", help="import stage: the model folder to start the run from")
    parser.add_argument("--to", default=default_to, help="export target folder")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda (the same draws either way; float rounding differs)")
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
                        help="model stage: share of batches drawn from the edit examples "
                             "(default: their share of the data)")
    parser.add_argument("--changed-weight", type=float, default=1.0,
                        help="model stage: flow-loss weight of the edited tokens of edit examples (those that "
                             "differ from the source image's; every other token weighs 1)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast for the forward/backward passes and the tokenizer's encoding "
                             "(float32 weights and optimiser; much faster on CPUs with AMX)")
    parser.add_argument("--free-captions", type=float, default=0.0,
                        help="model stage: share of captions said in a random free phrasing (phrasing.py)")
    parser.add_argument("--scene-sizes", type=parse_scene_sizes, default=SIZES, metavar="WxH,...",
                        help="model stage: training scene sizes, cycled (default 64x64,64x64,128x64,64x128)")
    parser.add_argument("--batch-tokens", type=int,
                        help="model stage: image tokens per batch (at most --batch-size images, at least 4)")
    parser.add_argument("--size-weights", type=parse_size_weights, metavar="WxH=F,...",
                        help="model stage: draw batches of these scene sizes F times as often as their share "
                             "of the examples (e.g. 128x128=3,96x96=2)")
    parser.add_argument("--phrasing-weights", type=parse_phrasing_weights, metavar="CHOICE=W:W:W,...",
                        help="model stage: how often a free phrasing picks each option, e.g. positions=5:3:3 "
                             "(word:synonym:none; background last:first:none; default phrasing.PHRASING_WEIGHTS)")
    parser.add_argument("--unplaced-order", choices=("reading", "scene"), default="reading",
                        help="model stage: the order of the objects in a free phrasing that names no positions: "
                             "reading order (default) or the scene's (as runs before 2026-12-03, evening)")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=VALUE",
                        help="override a size of demo_spec() (TinySpec field, e.g. vae_ch=64, vae_ch_mult=1,2,2,2, "
                             "hidden_size=256); kept in <out>/spec.json for the later stages")
    parser.add_argument("--edit-kinds", type=parse_edit_kinds, metavar="KIND=W,...",
                        help="model stage: relative weights of the edit kinds in the training edits, e.g. "
                             "recolour=2,move=2,remove=2 (a kind not named weighs 1; default: uniform)")
    parser.add_argument("--source-noise", type=float, default=0.0,
                        help="model stage: noise strength U(0, this) on an edit's source image tokens "
                             "(imperfect sources, as the model's own drawings in a chain of edits)")
    parser.add_argument("--free-background", choices=("default", "any"), default="default",
                        help="model stage: a free phrasing leaves the background out only where it is the "
                             "default one (white, black when an object is white; default), or for any "
                             "background (as runs before 2026-12-06)")
    parser.add_argument("--own-edits", metavar="FILE.npz",
                        help="model stage: also train on these edit triples on a model's own drawings "
                             "(python -m nextstep_core.demo.own_edits)")
    parser.add_argument("--edit-sizes", type=parse_scene_sizes, metavar="WxH,...",
                        help="model stage: the training edits' sizes, cycled (default: --scene-sizes)")
    return parser
