"""The budget policy: labelling rule, per-sample choice inside one prefill, FLOPs, persistence."""

import pytest
import torch
from conftest import set_visor_weights

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


@pytest.fixture(scope="module")
def routed(checkpoints, images):
    """A model with random CA weights and a random policy that picks different budgets."""
    model = visor.load(checkpoints["llava-onevision"])
    set_visor_weights(model)
    hidden, n = model.lm.cfg.hidden, len(model.schedule.sa_candidates) + 1
    torch.manual_seed(1)
    for _ in range(50):  # find a random policy that spreads the four test images over budgets
        policy = Policy(hidden, n, width=16)
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
        assert g.flops == fixed.flops  # reported FLOPs = the chosen budget's FLOPs
    assert sum(g.flops["total"] for g in auto) == sum(
        model.generate(im, "What is shown?", budget=b, max_new_tokens=6).flops["total"] for im, b in zip(images, chosen)
    )


def test_policy_round_trip_and_missing_policy(routed, images, tmp_path):
    model, chosen = routed
    model.save(tmp_path / "ckpt")
    again = visor.load(tmp_path / "ckpt")
    assert again.default_budget == "auto"  # a checkpoint with a policy routes unless told otherwise
    assert [again.generate(im, "What is shown?", budget="auto", max_new_tokens=1).budget for im in images] == chosen
    base = visor.load(model.backbone.path)
    with pytest.raises(visor.ConfigError, match="needs a trained policy"):
        base.generate(images[0], "What is shown?", budget="auto")


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
    assert flops[0] < flops[1] < flops[2] and flops[0] <= rows["auto"]["prefill_flops"] <= flops[2]
    assert (tmp_path / "policy_report.md").is_file()
    model = visor.load(tmp_path / "final")
    assert model.lm.policy is not None and model.lm.policy.config["n_budgets"] == 3
    assert not (tmp_path / "final" / "model.safetensors").exists()  # an adapter: the router is all that is new
