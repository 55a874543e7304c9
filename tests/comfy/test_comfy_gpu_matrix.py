"""The GPUs people own, simulated: the pack's loader node run in-process for a CUDA card of 8 to
80 GB (ComfyUI's get_total_memory / get_free_memory faked), a CPU with or without native bfloat16,
another model resident, and each of ComfyUI's memory flags, on NextStep-1's 14B shapes loaded onto
the meta device (headers only: nothing is allocated). Each row checks the compute dtype, that no
decoder matrix is upcast, the GPU/CPU split (and that ComfyUI counts the model at its size on the
GPU), the memory_required a 512x512 and a 1024x1024 request pass to load_models_gpu, that the
planned peak fits the card with ComfyUI's own arithmetic, and that the state dict is complete."""

import sys
from dataclasses import dataclass

import pytest
import torch
from comfy_harness import REPO, needs_comfyui
from test_comfy_gpu_paths import pack  # noqa: F401 - the fixture: ComfyUI and the pack in this process

pytestmark = needs_comfyui

GIB = 1 << 30
SIZES = (8, 12, 16, 24, 48, 80)
MODEL = "NextStep-14B-shapes"
# (precision, decoder layers swapped) the loader picks with the widgets' defaults and no flag, per card.
# Each is also checked to be the first that fits in the planner's order: bf16, fp8, fp8 + fewest layers swapped.
EXPECTED = {8: ("fp8_e4m3fn", 40), 12: ("fp8_e4m3fn", 26), 16: ("fp8_e4m3fn", 12), 24: ("fp8_e4m3fn", 0),
            48: ("bf16", 0), 80: ("bf16", 0)}


@dataclass(frozen=True)
class Card:
    gib: int
    flag: str = "normal"  # normal, lowvram, novram, highvram, gpu_only, reserve_vram (4 GiB)
    native_bf16: bool = False
    resident_gib: int = 0  # another model on the card already


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from memory import write_shapes_only
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return write_shapes_only(tmp_path_factory.mktemp("shapes"))


@pytest.fixture
def simulate(pack, shapes_folder, monkeypatch):  # noqa: F811
    """simulate(card, dtype, block_swap) -> (loaded, model module, the memory_required asked per size)."""
    import comfy.model_management as mm

    model, loaders = pack
    root = model.__name__.rpartition(".nodes")[0]
    engine = {name: sys.modules[f"{root}.nextstep_core.{name}"]
              for name in ("engine.precision", "engine.vae", "engine.vae_files", "pipeline")}

    def meta_tokenizer(folder, *, nextstep_1_1_defaults, dtype, device):
        config = engine["engine.vae_files"].read_config(folder, nextstep_1_1_defaults)
        with torch.device("meta"):
            autoencoder = engine["engine.vae"].build_autoencoder(config)
        return engine["engine.vae"].ImageTokenizer(config, autoencoder).to(dtype=dtype).eval()

    def run(card: Card, dtype="auto", block_swap=model.AUTO_SWAP):
        states = {"lowvram": "LOW_VRAM", "novram": "NO_VRAM", "highvram": "HIGH_VRAM", "gpu_only": "HIGH_VRAM"}
        total = card.gib * GIB
        monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
        monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False: total)
        monkeypatch.setattr(mm, "get_free_memory",
                            lambda dev=None, torch_free_too=False: total - card.resident_gib * GIB)
        monkeypatch.setattr(mm, "vram_state", mm.VRAMState[states.get(card.flag, "NORMAL_VRAM")])
        monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", 4 * GIB if card.flag == "reserve_vram" else 400 << 20)
        monkeypatch.setattr(mm, "unet_offload_device", lambda: torch.device("meta"))  # stage shapes only
        monkeypatch.setattr(mm, "vae_offload_device", lambda: torch.device("meta"))
        monkeypatch.setattr(engine["engine.precision"], "native_bf16_cpu", lambda: card.native_bf16)
        monkeypatch.setattr(engine["pipeline"], "load_image_tokenizer", meta_tokenizer)
        monkeypatch.setattr(loaders, "resolve", lambda name: shapes_folder)
        asked = []
        monkeypatch.setattr(mm, "load_models_gpu", lambda models, memory_required=0, **kw: asked.append(
            (models, memory_required, kw)))
        loaded, _ = loaders.NextStepModelLoader.execute(MODEL, "auto", dtype, "auto", block_swap).result
        required = {}
        for size in (512, 1024):
            model.load_for_generation(loaded, width=size, height=size, images=1, cfg=7.5)
            models, required[size], options = asked.pop()
            assert models == [loaded.patcher] and options == {"force_full_load": True}
        return loaded, required

    return model, run


def expected_keys(files, fp8: bool) -> set[str]:
    names = {n for n in files.tensor_shapes if n != "lm_head.weight"}
    scales = {n.removesuffix("weight") + "weight_scale" for n in names if fp8 and is_fp8_matrix(n)}
    return {("backbone." + n if n.startswith(("embed_tokens.", "layers.", "norm.")) else n) for n in names | scales}


def is_fp8_matrix(name):
    return name.startswith("layers.") and name.endswith("_proj.weight")


def check_row(model, loaded, required, card: Card):
    """Everything a row asserts; returns (precision, swapped layers) for comparisons across rows."""
    plan_module = sys.modules[model.__name__.rpartition(".nodes")[0] + ".nextstep_core.memory.plan"]
    pipe, files = loaded.pipe, loaded.files
    precision = pipe.model.precision
    assert precision.dtype == torch.bfloat16 and pipe.dtype == torch.bfloat16  # the GPU's compute dtype
    assert precision.stored is None and not [m for m in pipe.model.modules() if type(m).__name__ == "UpcastLinear"]
    linears = [m for m in pipe.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(hasattr(m, "comfy_cast_weights") for m in linears)  # comfy.ops: ComfyUI may stream them
    swap = pipe.model.block_swap
    swapped = 0 if swap is None else len(swap.order)
    assert swap is None or swap.order == list(range(48 - swapped, 48))
    plan = {size: plan_module.estimate(files, precision, swapped, plan_module.Request(width=size, height=size))
            for size in (512, 1024)}
    assert loaded.patcher.model_size() == plan[1024].weights  # ComfyUI counts what the GPU holds: no swapped layer
    assert required == {size: plan[size].working for size in (512, 1024)} and required[512] < required[1024]
    assert model.comfy_need(plan[1024]) <= card.gib * GIB  # what ComfyUI frees for it fits the card
    assert plan[1024].total + model.mm.extra_reserved_memory() <= card.gib * GIB
    assert set(pipe.model.state_dict()) == expected_keys(files, precision.fp8)  # complete, lm_head aside
    return precision.name, swapped


@pytest.mark.parametrize("gib", SIZES)
def test_cards_with_default_widgets(simulate, gib):
    """The same choice whatever the CPU and whatever else is loaded; the first plan that fits."""
    model, run = simulate
    rows = {}
    for card in (Card(gib), Card(gib, native_bf16=True), Card(gib, resident_gib=12 if gib > 12 else 4)):
        loaded, required = run(card)
        rows[card] = (check_row(model, loaded, required, card), tuple(sorted(required.items())))
    assert len(set(rows.values())) == 1, rows
    (precision, swapped), _ = rows[Card(gib)]
    assert (precision, swapped) == EXPECTED[gib]
    plan = sys.modules[model.__name__.rpartition(".nodes")[0] + ".nextstep_core.memory.plan"]
    files = loaded.files
    if precision == "fp8_e4m3fn":  # bf16 does not fit, nor fp8 with one layer fewer swapped
        assert model.comfy_need(plan.estimate(files, "bf16", 0, model.PLAN_REQUEST)) > gib * GIB
        if swapped:
            assert model.comfy_need(plan.estimate(files, precision, swapped - 1, model.PLAN_REQUEST)) > gib * GIB


@pytest.mark.parametrize("flag", ["lowvram", "novram", "highvram", "gpu_only", "reserve_vram"])
@pytest.mark.parametrize("gib", SIZES)
def test_cards_under_each_flag(simulate, gib, flag):
    model, run = simulate
    card = Card(gib, flag)
    refused = {"highvram": EXPECTED[gib][1], "gpu_only": EXPECTED[gib][1], "reserve_vram": gib == 8}
    if refused.get(flag):  # highvram: no swap unless block_swap asks; 8 GB less a 4 GB reserve: nothing fits
        hint = (f"the smallest setting that fits is dtype fp8_e4m3fn with block_swap {EXPECTED[gib][1]}"
                if flag != "reserve_vram" else "nothing fits, even with every decoder layer swapped: run ComfyUI "
                                               "with --cpu")
        with pytest.raises(Exception, match=rf"needs \d+\.\d GiB, more than the {gib}\.0 GiB this {gib} GiB GPU "
                                            rf"gives it \(\w+\): {hint}$") as error:
            run(card)
        assert "\n" not in str(error.value)
        return
    loaded, required = run(card)
    precision, swapped = check_row(model, loaded, required, card)
    if flag == "novram":
        assert (precision, swapped) == ("fp8_e4m3fn", 48)  # every decoder layer streamed, the fewest bytes
    elif flag in ("highvram", "gpu_only"):
        assert (precision, swapped) == EXPECTED[gib]
    elif flag == "lowvram":  # planned for half the card (the 8 GB one: nothing fits in 4 GB, so all of it)
        assert (precision, swapped) == {8: EXPECTED[8], 12: ("fp8_e4m3fn", 48), 16: EXPECTED[8],
                                        24: EXPECTED[12], 48: EXPECTED[24], 80: ("bf16", 0)}[gib]
        plan = sys.modules[model.__name__.rpartition(".nodes")[0] + ".nextstep_core.memory.plan"]
        need = model.comfy_need(plan.estimate(loaded.files, precision, swapped, model.PLAN_REQUEST))
        assert need <= gib * GIB // 2 or gib == 8
    else:  # 4 GiB kept for other applications instead of 0.4: more layers swapped
        assert (precision, swapped) == {12: ("fp8_e4m3fn", 39), 16: ("fp8_e4m3fn", 25), 24: EXPECTED[24],
                                        48: EXPECTED[48], 80: EXPECTED[80]}[gib]


def test_a_fixed_setting_that_cannot_fit_names_the_smallest_that_does(simulate):
    model, run = simulate
    with pytest.raises(Exception, match=r"^NextStep-14B-shapes at 1024x1024 as fp8_e4m3fn with block_swap 0 needs "
                                        r"\d+\.\d GiB, more than the 8\.0 GiB this 8 GiB GPU gives it \(NORMAL_VRAM\): "
                                        r"the smallest setting that fits is dtype fp8_e4m3fn with block_swap 40$"):
        run(Card(8), dtype="fp8_e4m3fn", block_swap=0)
    loaded, required = run(Card(8), dtype="fp8_e4m3fn", block_swap=47)  # a fixed setting that fits is kept
    assert check_row(model, loaded, required, Card(8)) == ("fp8_e4m3fn", 47)


def test_24_gb_with_and_without_a_12_gb_model_loaded_first(simulate):
    """The plan reads the card's total, never its free memory: the same dtype and split (so the same
    tokens: swapped and resident layers compute the same bits, tests/test_gpu_swap.py)."""
    model, run = simulate
    alone, required_alone = run(Card(24))
    beside, required_beside = run(Card(24, resident_gib=12))
    assert check_row(model, alone, required_alone, Card(24)) == check_row(model, beside, required_beside, Card(24))
    assert alone.pipe.model.precision == beside.pipe.model.precision and required_alone == required_beside
