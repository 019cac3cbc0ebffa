"""The budget policy: labelling rule, per-sample choice inside one prefill, FLOPs, persistence."""

import json

import pytest
import torch
from conftest import random_image, set_visor_weights

import visor
from visor.policy import Policy, PolicyTrainConfig, fit_policy, label_budgets, normalise, train_policy


def test_labels_follow_the_rule_on_a_hand_made_table():
    scores = torch.tensor(
        [
            [0.0, 1.0, 1.0],  # needs budget 1
            [1.0, 1.0, 1.0],  # everything works: cheapest
            [0.0, 0.0, 1.0],  # only the largest
            [0.0, 0.0, 0.0],  # nothing works: nothing to gain, cheapest
            [0.50, 0.5945, 0.60],  # likelihoods: 0.5945 >= 0.99 * 0.60 = 0.594
            [0.50, 0.5935, 0.60],  # 0.5935 < 0.594: the largest
            [0.9, 0.7, 0.8],  # non-monotone: budget 0 already beats 99% of the largest
        ]
    )
    assert label_budgets(scores).tolist() == [1, 0, 2, 0, 1, 2, 0]


def test_answer_normalisation():
    assert normalise(" Red.") == normalise("red") == "red"
    assert normalise("Four, 4!") == "four 4"


def test_fit_policy_learns_separable_labels():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(60, 8, generator=gen) * 5 + 100  # far from zero mean: standardisation matters
    labels = (features[:, 0] > 100).long() * 2
    policy = fit_policy(features, labels, 3, PolicyTrainConfig(width=32, epochs=200))
    assert (policy.choose(features) == labels).float().mean() > 0.9
    cheap = policy.choose(features, cost_weight=100.0)
    assert (cheap == 0).all()  # a high cost weight always picks the cheapest budget


def test_the_router_stops_before_it_learns_lucky_labels_by_heart():
    """Two kinds of question; 15% of the second kind labelled budget 0 (a lucky guess at budget 0).
    Stopped where the loss on samples set aside is lowest, the router routes fresh samples by their
    kind better than one fitted for every epoch, which learns the lucky ones by heart."""
    from visor.policy import _fit, stopping_epochs

    gen = torch.Generator().manual_seed(0)

    def draw(n):
        kind = torch.arange(n) % 2
        x = torch.randn(n, 64, generator=gen)
        x[:, :16] += 2 * kind[:, None]
        return x, kind

    x, kind = draw(200)
    labels = kind.clone()
    labels[(torch.rand(200, generator=gen) < 0.15) & (kind == 1)] = 0
    cfg = PolicyTrainConfig(width=64, epochs=300)
    assert 1 < stopping_epochs(x, labels, 2, cfg) < 300
    fresh, fresh_kind = draw(400)
    with torch.no_grad():  # fitting enables gradients itself
        stopped = (fit_policy(x, labels, 2, cfg).choose(fresh) == fresh_kind).float().mean()
        every_epoch = (_fit(x, labels, 2, cfg, 0, 300).choose(fresh) == fresh_kind).float().mean()
    assert stopped >= 0.98 and every_epoch < stopped


@pytest.fixture(scope="module")
def routed(checkpoints, images):
    """A model with random CA weights and a random policy that picks different budgets."""
    model = visor.load(checkpoints["llava-onevision"])
    set_visor_weights(model)
    hidden, n = model.lm.cfg.hidden, len(model.schedule.sa_candidates) + 1
    torch.manual_seed(1)
    for _ in range(50):  # find a random policy that spreads the four test images over budgets
        policy = Policy(hidden, n, width=16, probe_layers=model.schedule.probe_layers)
        with torch.no_grad():
            policy.net[-1].weight.mul_(50)
        model.lm.policy = policy
        chosen = [model.generate(im, "What is shown?", budget="auto", max_new_tokens=1).budget for im in images]
        if len(set(chosen)) > 1:
            return model, chosen
    pytest.fail("no random policy spread the images over budgets")


def test_auto_runs_each_sample_at_its_budget_in_one_batch(routed, images):
    model, chosen = routed
    prompts = ["What is shown?"] * len(images)
    auto = model.generate([[im] for im in images], prompts, budget="auto", max_new_tokens=6)
    assert [g.budget for g in auto] == chosen
    for g, im, budget in zip(auto, images, chosen):
        fixed = model.generate(im, "What is shown?", budget=budget, max_new_tokens=6)
        assert g.token_ids == fixed.token_ids
        # reported FLOPs = the chosen budget's, plus the router's probe in prefill
        router = model.flops(g.n_visual, g.n_text, 0, router=model.lm.policy.config).breakdown["prefill"]["router"]
        assert router > 0 and g.flops["prefill"] == fixed.flops["prefill"] + router
        assert g.flops["decode"] == fixed.flops["decode"]


def test_the_router_reads_the_text_after_the_first_ca_layer(routed, images, tmp_path):
    """The probe = the first layers of a budget-0 pass (up to and including the first CA layer),
    pooled; its FLOPs = what FlopCounterMode counts for the probe and the MLP."""
    from visor.generate import collate
    from visor.policy import Policy

    model, _ = routed
    lm, depth = model.lm, model.schedule.probe_layers
    assert depth == model.schedule.ca_layers[0] + 1 == lm.probe_depth
    samples = model.encode(["What is shown?", "Which colour?"], [[images[0]], [images[1]]])
    tok = collate(samples, model.backbone.image_token_id, "cpu")
    n_layers = lm.cfg.n_layers
    try:  # reference: the same model cut to `depth` layers, run at budget 0 (its text states, unnormed)
        lm.cfg.n_layers = depth
        with torch.no_grad():
            cut = lm.run(tok, [0, 0]).text
    finally:
        lm.cfg.n_layers = n_layers
    with torch.no_grad():
        features = lm.policy_features(tok)
        inputs = lm.policy_features(tok, depth=0)
    v, _, _ = lm.inputs(tok, [0, 0])
    expected = Policy.features(v, cut, tok.visual_valid, tok.text_valid)
    torch.testing.assert_close(features, expected)
    # the text has read the image: same prompt, other image -> other text features after the CA layer,
    # the same ones a layer before it (budget 0 runs that layer on the text alone)
    pictures = [[random_image(tmp_path / f"{i}.png", 40, 30, seed=10 + i)] for i in range(4)]  # one size: one layout
    same, other = (
        collate(model.encode(["What is shown?"] * 2, pair), model.backbone.image_token_id, "cpu")
        for pair in (pictures[:2], pictures[2:])
    )
    with torch.no_grad():
        d = v.shape[-1]
        after = [lm.policy_features(x)[:, d:] for x in (same, other)]
        before = [lm.policy_features(x, depth - 1)[:, d:] for x in (same, other)]
    assert not torch.allclose(after[0], after[1], atol=1e-4)
    torch.testing.assert_close(before[0], before[1])
    assert inputs.shape == features.shape
    from torch.utils.flop_counter import FlopCounterMode

    lm.explicit_attention = True
    try:
        one = collate(samples[:1], model.backbone.image_token_id, "cpu")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            lm.policy(lm.policy_features(one))
    finally:
        lm.explicit_attention = False
    n_visual = samples[0].visual.shape[0]
    report = model.flops(n_visual, len(samples[0].ids) - n_visual, 0, router=lm.policy.config)
    assert report.breakdown["prefill"]["router"] == pytest.approx(counter.get_total_flops(), rel=0.01)


@pytest.mark.parametrize("roles", ["sa,ca,text,sa,ca,text", "ca,sa,ca,sa,ca,text"])
def test_auto_costs_what_the_flop_counter_counts(checkpoints, images, roles):
    """An auto prefill costs the chosen budget's plus the router's FLOPs, as counted (FlopCounterMode):
    the probe and the MLP where an SA candidate comes before the first CA layer; where none does, the
    prefill goes on from the probe's layers and the router is its MLP alone. Same answer either way."""
    from torch.utils.flop_counter import FlopCounterMode

    from visor.generate import collate

    model = visor.load(checkpoints["llava-onevision"], schedule=roles)
    set_visor_weights(model)
    lm = model.lm
    torch.manual_seed(0)
    lm.policy = Policy(
        lm.cfg.hidden, len(model.schedule.sa_budgets), width=16, probe_layers=model.schedule.probe_layers
    )
    assert model.schedule.shares_probe(lm.probe_depth) == roles.startswith("ca")
    samples = model.encode(["What is shown?"], [[images[0]]])
    tok = collate(samples, model.backbone.image_token_id, "cpu")
    lm.explicit_attention = True

    def counted(budget):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = lm.run(tok, [budget])
        return counter.get_total_flops(), out

    try:
        auto_flops, auto = counted("auto")
        chosen = auto.budgets[0]
        fixed_flops, fixed = counted(chosen)
    finally:
        lm.explicit_attention = False
    torch.testing.assert_close(auto.text, fixed.text)
    n_visual = samples[0].visual.shape[0]
    report = model.flops(n_visual, len(samples[0].ids) - n_visual, chosen, router=lm.policy.config)
    router = report.breakdown["prefill"]["router"]
    mlp = 2 * (2 * lm.cfg.hidden * 16 + 16 * len(model.schedule.sa_budgets))
    assert (router == mlp) == roles.startswith("ca")
    assert auto_flops - fixed_flops == pytest.approx(router, rel=0.01)


def test_policy_round_trip_and_missing_policy(routed, images, tmp_path):
    model, chosen = routed
    model.save(tmp_path / "ckpt")
    again = visor.load(tmp_path / "ckpt")
    assert again.default_budget == "auto"  # a checkpoint with a policy routes unless told otherwise
    assert [again.generate(im, "What is shown?", budget="auto", max_new_tokens=1).budget for im in images] == chosen
    base = visor.load(model.backbone.path)
    with pytest.raises(visor.ConfigError, match="needs a trained policy"):
        base.generate(images[0], "What is shown?", budget="auto")
    meta = json.loads((tmp_path / "ckpt" / "visor.json").read_text())
    assert meta["policy"]["probe_layers"] == model.schedule.probe_layers
    del meta["policy"]["probe_layers"]  # a policy saved before the probe: it read the inputs of layer 0
    (tmp_path / "ckpt" / "visor.json").write_text(json.dumps(meta))
    assert visor.load(tmp_path / "ckpt").lm.probe_depth == model.schedule.sa_candidates[0] == 0
    meta["policy"]["probe_layers"] = 99
    (tmp_path / "ckpt" / "visor.json").write_text(json.dumps(meta))
    with pytest.raises(visor.CheckpointError, match="probe runs 99 layers"):
        visor.load(tmp_path / "ckpt")


def test_holdout_split():
    from visor.policy import holdout_split

    fit, held = holdout_split(50, 0.2, seed=3)
    assert len(held) == 10 and sorted(fit.tolist() + held.tolist()) == list(range(50))
    assert torch.equal(holdout_split(50, 0.2, seed=3)[1], held) and not torch.equal(holdout_split(50, 0.2, 4)[1], held)
    assert [len(x) for x in holdout_split(1, 0.5, 0)] == [1, 0]  # one sample: nothing to hold out
    assert [len(x) for x in holdout_split(3, 0.9, 0)] == [1, 2]  # at least one left to fit


def test_train_policy_end_to_end(checkpoints, dataset, tmp_path):
    result = train_policy(checkpoints["llava-onevision"], dataset / "train.jsonl", dataset / "img", tmp_path,
                          PolicyTrainConfig(width=16, epochs=50))  # fmt: skip
    rows = {r["budget"]: r for r in result["rows"]}
    assert (result["n_samples"], result["n_fit"], result["n_held_out"]) == (16, 13, 3)  # 20% held out
    assert result["measured_on"] == "held-out samples" and sum(rows["auto"]["chosen"]) == 3
    assert "Measured on held-out samples: 3 of 16" in (tmp_path / "policy_report.md").read_text()
    flops = [rows[b]["prefill_flops"] for b in (0, 1, 2)]
    assert flops[0] < flops[1] < flops[2] and flops[0] < rows["auto"]["prefill_flops"]  # auto: + the probe's
    model = visor.load(tmp_path / "final")
    assert model.lm.policy.config["probe_layers"] == model.schedule.probe_layers == 2
    assert (tmp_path / "policy_report.md").is_file()
    assert model.lm.policy is not None and model.lm.policy.config["n_budgets"] == 3
    assert not (tmp_path / "final" / "model.safetensors").exists()  # an adapter: the router is all that is new
