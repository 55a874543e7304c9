"""The training objective: a step on a fixed batch lowers both losses; edit rows are built right."""

import json

import numpy as np
import pytest
import torch
from bounds import gamma

from nextstep_core.demo.data import make_batch, pil_batch_to_pixels
from nextstep_core.demo.objective import training_losses
from nextstep_core.demo.scenes import edit_dataset, scene_dataset
from nextstep_core.demo.tiny_tokenizer import write_tiny_tokenizer
from nextstep_core.demo.train import demo_spec, new_demo_model, reconstruction_loss, vae_config
from nextstep_core.engine.model import patchify
from nextstep_core.engine.prompt import SpecialIds, load_tokenizer
from nextstep_core.engine.vae import ImageTokenizer


def small_spec():
    return demo_spec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, head_dim=64, head_layers=2)


def fixed_losses(model, batch):
    return training_losses(model, batch, generator=torch.Generator().manual_seed(0), head_repeats=2)


def test_a_few_steps_on_a_fixed_batch_lower_both_losses(tmp_path):
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    special = SpecialIds.from_tokenizer(tokenizer)
    model, _ = new_demo_model(tokenizer, small_spec(), seed=0)
    torch.manual_seed(0)
    vae = ImageTokenizer(vae_config(small_spec())).eval()
    samples = scene_dataset(0, 4)
    with torch.no_grad():
        tokens = patchify(vae.encode(pil_batch_to_pixels([im for im, _ in samples])))
    examples = [("t2i", cap, tok, None, (4, 4)) for (_, cap), tok in zip(samples, tokens)]
    batch = make_batch(tokenizer, special, examples, np.random.default_rng(1))
    before = fixed_losses(model, batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        optimizer.zero_grad()
        training_losses(model, batch, head_repeats=2).total.backward()
        optimizer.step()
    after = fixed_losses(model, batch)
    assert after.image.item() < before.image.item()
    assert after.text.item() < before.text.item()
    assert before.text.item() > 0 and before.image.item() > 0


def test_edit_batches_fill_placeholders_and_condition_on_the_source(tmp_path):
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    special = SpecialIds.from_tokenizer(tokenizer)
    triples = edit_dataset(3, 4)
    source = torch.randn(4, 16, 64)
    target = torch.randn(4, 16, 64)
    examples = [("edit", f"<image> {ins}", target[i], source[i], (4, 4)) for i, (_, ins, _) in enumerate(triples)]
    batch = make_batch(tokenizer, special, examples, np.random.default_rng(5))  # no dropout draws < 0.15 here
    carrying = (batch.input_ids == special.placeholder).sum(dim=1)
    assert carrying.tolist().count(16) == batch.source_tokens.shape[0]
    model, _ = new_demo_model(tokenizer, small_spec(), seed=0)
    a = fixed_losses(model, batch).image
    batch.source_tokens = batch.source_tokens + 1.0
    b = fixed_losses(model, batch).image
    assert abs(a.item() - b.item()) > 1e-6  # the source image reaches the loss


def test_tokenizer_reconstruction_step_lowers_the_loss():
    torch.manual_seed(0)
    vae = ImageTokenizer(vae_config(small_spec()))
    pixels = pil_batch_to_pixels([im for im, _ in scene_dataset(2, 4)])
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)

    def loss():
        mean, _ = vae.posterior(pixels)
        return reconstruction_loss(vae.decode(mean), pixels)

    before = loss().item()
    for _ in range(3):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < before


def test_decoder_only_tokenizer_training_keeps_the_latent_space(tmp_path):
    """`train vae --freeze-encoder` resumes the stage and changes the decoder only."""
    from nextstep_core.demo.train import load_trained_vae, train_vae

    train_vae(tmp_path, steps=1, batch_size=2, seed=0, save_every=1, log=print, crop=32, scenes=8)
    first = load_trained_vae(tmp_path).autoencoder
    train_vae(tmp_path, steps=3, batch_size=2, seed=0, save_every=1, log=print, crop=32, freeze_encoder=True,
              scenes=8)
    second = load_trained_vae(tmp_path).autoencoder
    assert torch.load(tmp_path / "vae.pt", weights_only=True)["step"] == 3
    for (name, before), after in zip(first.encoder.state_dict().items(), second.encoder.state_dict().values()):
        assert torch.equal(before, after), name
    assert not torch.equal(first.decoder.conv_out.weight, second.decoder.conv_out.weight)


def test_size_overrides_are_kept_for_the_later_stages(tmp_path):
    """`--size` on the tokenizer stage shapes the tokenizer that the model stage and export load."""
    from nextstep_core.demo.train import load_trained_vae, main, parse_size_overrides, run_spec

    assert parse_size_overrides(["vae_ch=16", "vae_ch_mult=1,1,2,2"]) == {"vae_ch": 16, "vae_ch_mult": (1, 1, 2, 2)}
    for bad in (["vae_ch"], ["colour=3"], ["vae_ch=big"]):
        with pytest.raises(SystemExit, match="--size"):
            parse_size_overrides(bad)
    main(["vae", "--out", str(tmp_path), "--steps", "1", "--batch-size", "2", "--scenes", "4", "--crop", "32",
          "--size", "vae_ch=16", "--size", "hidden_size=64"])
    assert run_spec(tmp_path).vae_ch == 16 and run_spec(tmp_path).hidden_size == 64
    assert load_trained_vae(tmp_path).config.ch == 16  # rebuilt from spec.json without being told
    saved = json.loads((tmp_path / "spec.json").read_text())
    assert saved["num_hidden_layers"] == demo_spec().num_hidden_layers  # the whole spec is frozen


def test_a_run_keeps_its_sizes_when_the_demo_sizes_change(tmp_path, monkeypatch):
    import nextstep_core.demo.train as train

    original = train.run_spec(tmp_path, {}).hidden_size  # a stage started from the command line, no overrides
    monkeypatch.setitem(train.DEMO_SIZES, "hidden_size", 999)
    assert train.run_spec(tmp_path).hidden_size == original != 999
    assert train.run_spec(tmp_path / "fresh").hidden_size == 999


def test_warm_up_does_not_depend_on_the_total_and_the_schedule_ends_at_zero():
    from nextstep_core.demo.stage import set_learning_rate

    def rate(step, steps):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        set_learning_rate(optimizer, step, steps, peak=1e-3, warmup=100)
        return optimizer.param_groups[0]["lr"]

    assert [rate(s, 1000) for s in (0, 50, 99)] == [rate(s, 7000) for s in (0, 50, 99)]
    assert rate(99, 1000) == pytest.approx(1e-3)
    assert rate(999, 1000) < 1e-7 and rate(550, 1000) == pytest.approx(5e-4, rel=0.01)


def test_model_stage_can_start_from_an_earlier_runs_weights(tmp_path):
    from nextstep_core.demo.train import main

    sizes = ["--size", "vae_ch=16", "--size", "hidden_size=64", "--size", "intermediate_size=128",
             "--size", "head_dim=64", "--size", "head_layers=2", "--size", "num_hidden_layers=2",
             "--size", "num_attention_heads=4"]
    first, second = tmp_path / "first", tmp_path / "second"
    main(["vae", "--out", str(first), "--steps", "1", "--batch-size", "2", "--scenes", "4", "--crop", "32", *sizes])
    main(["model", "--out", str(first), "--steps", "1", "--batch-size", "2", "--scenes", "8", "--edits", "4"])
    second.mkdir()
    for name in ("vae.pt", "spec.json"):
        (second / name).write_bytes((first / name).read_bytes())
    main(["model", "--out", str(second), "--steps", "1", "--batch-size", "2", "--scenes", "8", "--edits", "4",
          "--seed", "1", "--lr", "1e-12", "--init-from", str(first / "model.pt")])
    before = torch.load(first / "model.pt", weights_only=True)["weights"]
    after = torch.load(second / "model.pt", weights_only=True)["weights"]
    # one Adam step of lr 1e-12 moves a weight by ~1e-12 (Adam's update is ~lr per weight), far
    # below 1e-6 (and float32 rounding of weights ~0.1 is ~1e-8); training from scratch, O(1e-2)
    assert torch.allclose(before["image_in_projector.weight"], after["image_in_projector.weight"], atol=1e-6)
    assert "model weights from" in (second / "train.log").read_text()


def tiny_batch(tmp_path, kind="t2i"):
    """A fixed batch of 4 rows (t2i scenes or edit triples) with random tokens, and its tokenizer."""
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    special = SpecialIds.from_tokenizer(tokenizer)
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(4, 16, 64, generator=generator)
    if kind == "t2i":
        examples = [("t2i", cap, target[i], None, (4, 4)) for i, (_, cap) in enumerate(scene_dataset(0, 4))]
    else:
        source = torch.randn(4, 16, 64, generator=generator)
        examples = [("edit", f"<image> {ins}", target[i], source[i], (4, 4))
                    for i, (_, ins, _) in enumerate(edit_dataset(3, 4))]
    return tokenizer, make_batch(tokenizer, special, examples, np.random.default_rng(5))


def test_input_noise_perturbs_only_the_fed_back_tokens(tmp_path):
    from nextstep_core.demo.objective import sequence_embeddings

    tokenizer, batch = tiny_batch(tmp_path)
    model, _ = new_demo_model(tokenizer, small_spec(), seed=0)
    length = batch.input_ids.shape[1]
    noise = torch.randn(4, 15, 64)
    with torch.no_grad():
        clean = sequence_embeddings(model, batch)
        noisy = sequence_embeddings(model, batch, noise)
        expected = model.image_in_projector(batch.target_tokens[:, :-1] + noise)
    assert torch.equal(clean[:, :length], noisy[:, :length])  # the prompt is untouched
    # The same float32 products in other row blockings: each within gamma_n (|b| + sum |w||x|) of
    # the exact value (n = 64 inputs + bias, any order or kernel), so within twice that of each other.
    projector, fed = model.image_in_projector, (batch.target_tokens[:, :-1] + noise).double()
    bound = 2 * gamma(projector.in_features + 1) * (fed.abs() @ projector.weight.double().abs().T
                                                      + projector.bias.double().abs())
    assert ((noisy[:, length:].double() - expected.double()).abs() <= bound).all()
    # the drawn strengths change the loss; no noise is the plain objective, draw for draw
    same = [fixed_losses(model, batch).image.item() for _ in range(2)]
    plain = training_losses(model, batch, generator=torch.Generator().manual_seed(0), head_repeats=2, input_noise=0.0)
    noised = training_losses(model, batch, generator=torch.Generator().manual_seed(0), head_repeats=2, input_noise=0.5)
    assert same[0] == same[1] == plain.image.item() != noised.image.item()


def test_self_feed_trains_on_the_models_own_samples(tmp_path):
    from nextstep_core.demo.objective import own_samples

    tokenizer, batch = tiny_batch(tmp_path)
    model, _ = new_demo_model(tokenizer, small_spec(), seed=0)
    own = own_samples(model, batch, steps=3, generator=torch.Generator().manual_seed(1))
    again = own_samples(model, batch, steps=3, generator=torch.Generator().manual_seed(1))
    assert own.shape == batch.target_tokens.shape and torch.equal(own, again) and not own.requires_grad
    assert not torch.allclose(own, batch.target_tokens, atol=0.1)
    # self_feed 1: every fed-back token is the model's own; the loss still targets the true tokens
    fed = training_losses(model, batch, generator=torch.Generator().manual_seed(0), head_repeats=2, self_feed=1.0)
    assert fed.image.item() != fixed_losses(model, batch).image.item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = fed.image.item()
    for _ in range(5):
        optimizer.zero_grad()
        training_losses(model, batch, head_repeats=2, self_feed=1.0).total.backward()
        optimizer.step()
    after = training_losses(model, batch, generator=torch.Generator().manual_seed(0), head_repeats=2, self_feed=1.0)
    assert after.image.item() < before


@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_bf16_steps_lower_both_losses(tmp_path, kind):
    from nextstep_core.demo.stage import compute_precision

    tokenizer, batch = tiny_batch(tmp_path, kind)
    model, _ = new_demo_model(tokenizer, small_spec(), seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def losses():
        with compute_precision("cpu", True):
            return fixed_losses(model, batch)

    before = losses()
    assert before.image.dtype == torch.float32  # the loss is reduced in float32
    for _ in range(5):
        with compute_precision("cpu", True):
            step = training_losses(model, batch, head_repeats=2, input_noise=0.3)
        optimizer.zero_grad()
        step.total.backward()
        optimizer.step()
    after = losses()
    assert after.image.item() < before.image.item() and after.text.item() < before.text.item()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32


def test_encoded_examples_are_cached_per_tokenizer(tmp_path):
    from nextstep_core.demo.data import cached_examples
    from nextstep_core.demo.stage import save_state

    torch.manual_seed(0)
    vae = ImageTokenizer(vae_config(small_spec())).eval()
    save_state(tmp_path / "vae.pt", weights=vae.state_dict(), optimizer={}, step=0)
    messages = []
    first = cached_examples(tmp_path, vae, 0, 4, 2, messages.append)
    second = cached_examples(tmp_path, vae, 0, 4, 2, messages.append)
    assert "encoded 6 training examples" in messages[0] and messages[1].startswith("loaded 6 encoded")
    assert [e[:2] + e[4:] for e in first] == [e[:2] + e[4:] for e in second]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(first, second))
    assert sum(e[3] is not None for e in second) == 2 and {e[0] for e in second} == {"t2i", "edit"}
    # a changed tokenizer gets its own cache
    save_state(tmp_path / "vae.pt", weights={k: v + 1 for k, v in vae.state_dict().items()}, optimizer={}, step=1)
    cached_examples(tmp_path, vae, 0, 4, 2, messages.append)
    assert messages[2].startswith("encoded") and len(list(tmp_path.glob("examples-*.pt"))) == 2


def test_a_run_can_start_from_an_exported_model_folder(tmp_path):
    from nextstep_core.demo.train import main, run_spec
    from nextstep_core.pipeline import NextStepPipeline

    sizes = ["--size", "vae_ch=16", "--size", "hidden_size=64", "--size", "intermediate_size=128",
             "--size", "head_dim=64", "--size", "head_layers=2", "--size", "num_hidden_layers=2",
             "--size", "num_attention_heads=4"]
    first, exported, second = tmp_path / "first", tmp_path / "exported", tmp_path / "second"
    main(["vae", "--out", str(first), "--steps", "1", "--batch-size", "2", "--scenes", "4", "--crop", "32", *sizes])
    main(["model", "--out", str(first), "--steps", "1", "--batch-size", "2", "--scenes", "8", "--edits", "4"])
    main(["export", "--out", str(first), "--to", str(exported)])
    main(["import", "--out", str(second), "--from", str(exported)])
    assert run_spec(second) == run_spec(first)
    shipped = NextStepPipeline.from_folder(exported)
    imported = torch.load(second / "imported_model.pt", weights_only=True)["weights"]
    assert all(torch.equal(v, imported[k]) for k, v in shipped.model.state_dict().items())
    main(["model", "--out", str(second), "--steps", "1", "--batch-size", "2", "--scenes", "8", "--edits", "4",
          "--init-from", str(second / "imported_model.pt"), "--lr", "1e-12"])
    main(["vae", "--out", str(second), "--steps", "1", "--batch-size", "2", "--scenes", "4", "--crop", "32"])
    assert torch.load(second / "vae.pt", weights_only=True)["step"] == 1  # resumed from the imported step 0
    write_tiny_tokenizer(exported, vocab_size=400)  # another vocabulary than training's (640)
    with pytest.raises(SystemExit, match="text tokenizer"):
        main(["import", "--out", str(tmp_path / "third"), "--from", str(exported)])


def test_edit_share_sets_the_share_of_edit_batches():
    from nextstep_core.demo.data import group_weights

    keys = [("t2i", (4, 4)), ("edit", (4, 4)), ("t2i", (4, 8)), ("edit", (4, 8))]
    sizes = [300, 100, 100, 50]
    assert np.allclose(group_weights(keys, sizes), np.array(sizes) / 550)  # default: by the data
    weights = group_weights(keys, sizes, edit_share=0.7)
    assert np.isclose(weights.sum(), 1.0)
    assert np.isclose(weights[[1, 3]].sum(), 0.7) and np.isclose(weights[1] / weights[3], 2.0)
    assert np.isclose(weights[0] / weights[2], 3.0)
    with pytest.raises(SystemExit, match="--edit-share 1.5 must be between 0 and 1"):
        group_weights(keys, sizes, edit_share=1.5)
    with pytest.raises(SystemExit, match="needs both edit and text-to-image"):
        group_weights(keys[:1], sizes[:1], edit_share=0.5)


def test_edit_share_and_changed_weight_are_checked_before_any_work(tmp_path):
    from nextstep_core.demo.train import main

    with pytest.raises(SystemExit, match="--edit-share -0.5 must be between 0 and 1"):
        main(["model", "--out", str(tmp_path / "run"), "--edit-share", "-0.5"])
    with pytest.raises(SystemExit, match="--changed-weight 0.0 must be above 0"):
        main(["model", "--out", str(tmp_path / "run"), "--changed-weight", "0"])
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_changed_weight_weights_only_the_edited_tokens_of_edit_rows():
    from nextstep_core.demo.objective import TrainingBatch, edited_token_weights

    source = torch.zeros(2, 4, 64)
    target = source.clone()
    target[0, 1] = 1.0  # row 0: token 1 edited
    target[1, 3] = 0.1  # row 1: token 3 barely changed (below the threshold)
    t2i_target = torch.ones(1, 4, 64)  # a text-to-image row: never weighted
    batch = TrainingBatch(torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long),
                          torch.cat([target, t2i_target]), placeholder_id=7, source_tokens=source)
    weights = edited_token_weights(batch, 5.0)
    assert weights.tolist() == [1, 5, 1, 1] + [1, 1, 1, 1] + [1, 1, 1, 1]
    assert edited_token_weights(batch, 1.0) is None
    assert edited_token_weights(TrainingBatch(batch.input_ids, batch.attention_mask, batch.target_tokens), 5.0) is None
    uneven = TrainingBatch(batch.input_ids, batch.attention_mask, torch.zeros(3, 8, 64), 7, source)
    with pytest.raises(ValueError, match="edit sources of the target's size"):
        edited_token_weights(uneven, 5.0)


def test_weighted_flow_loss_is_the_weighted_mean_of_the_rows(tmp_path):
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    model, _ = new_demo_model(tokenizer, small_spec(), seed=0)
    head = model.image_head
    tokens, conditions = torch.randn(3, 64), torch.randn(3, head.net.cond_embed.in_features)

    def loss(weights=None, repeats=1):
        return head.loss(tokens, conditions, generator=torch.Generator().manual_seed(9), weights=weights,
                         repeats=repeats).item()

    rows = [loss(torch.eye(3)[i]) for i in range(3)]  # the same draws, one row at a time
    assert len(set(rows)) == 3
    # Means of nonnegative squared errors: a float32 sum of n nonnegative terms is within gamma_n
    # relative of the exact sum in any order; each side sums at most 2 x 3 x 64 terms plus a few
    # weighting operations (< 200), so the two sides agree within 2 gamma_200 < gamma_400 (2.4e-5).
    # Ignored weights or repeats miss by ~10 %.
    rel = gamma(400)
    assert loss() == pytest.approx(np.mean(rows), rel=rel)
    assert loss(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx((2 * rows[0] + rows[1] + rows[2]) / 4, rel=rel)
    assert loss(torch.tensor([3.0, 3.0, 3.0]), repeats=2) == pytest.approx(loss(repeats=2), rel=rel)


def test_training_losses_pass_the_edited_token_weights_to_the_flow_loss(tmp_path):
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    special = SpecialIds.from_tokenizer(tokenizer)
    model, _ = new_demo_model(tokenizer, small_spec(), seed=0)
    source = torch.randn(4, 16, 64)
    target = source.clone()
    target[:, :3] = torch.randn(4, 3, 64)  # the first 3 tokens of each target edited
    triples = edit_dataset(3, 4)
    examples = [("edit", f"<image> {ins}", target[i], source[i], (4, 4)) for i, (_, ins, _) in enumerate(triples)]
    batch = make_batch(tokenizer, special, examples, np.random.default_rng(5))

    def image_loss(weight):
        return training_losses(model, batch, generator=torch.Generator().manual_seed(0), head_repeats=1,
                               changed_weight=weight).image.item()

    assert image_loss(1.0) != pytest.approx(image_loss(5.0), rel=1e-4)
    plain = make_batch(tokenizer, special, [("t2i", "a red circle", target[0], None, (4, 4))] * 2,
                       np.random.default_rng(0))
    assert training_losses(model, plain, generator=torch.Generator().manual_seed(0), changed_weight=5.0).image.item() \
        == training_losses(model, plain, generator=torch.Generator().manual_seed(0)).image.item()
