import json

import pytest

from visor import ConfigError, Schedule


def test_default_rule_matches_the_paper_for_24_layers():
    s = Schedule.default(24)
    assert s.sa_candidates == list(range(0, 24, 3))
    assert s.ca_layers == list(range(1, 24, 3))
    assert len(s.sa_candidates) == len(s.ca_layers) == 8


@pytest.mark.parametrize("n_layers", [3, 4, 7, 8, 24, 28, 32])
def test_default_rule_any_depth(n_layers):
    s = Schedule.default(n_layers)
    n = n_layers // 3
    assert len(s.roles) == n_layers
    assert len(s.sa_candidates) == len(s.ca_layers) == n
    assert s.sa_candidates[0] == 0
    gaps = {b - a for a, b in zip(s.sa_candidates, s.sa_candidates[1:])}
    assert max(gaps, default=0) - min(gaps, default=0) <= 1  # spread evenly over depth


def test_budgets_map_to_deterministic_subsets():
    s = Schedule.default(24)
    assert s.active_sa(0) == frozenset()
    assert s.active_sa(1) == {0}
    assert s.active_sa(2) == {0, 12}
    assert s.active_sa(8) == set(s.sa_candidates)
    assert s.active_sa("full") == set(range(24))
    for k in range(9):
        assert len(s.active_sa(k)) == k and s.active_sa(k) <= set(s.sa_candidates)
        assert s.active_sa(k) == Schedule.default(24).active_sa(str(k))


def test_plan_roles():
    s = Schedule(["sa", "ca", "text", "sa", "ca", "text"])
    assert s.plan("full") == ["sa"] * 6
    assert s.plan(0) == ["text", "ca", "text", "text", "ca", "text"]
    assert s.plan(1) == ["sa", "ca", "text", "text", "ca", "text"]
    assert s.plan(2) == ["sa", "ca", "text", "sa", "ca", "text"]


@pytest.mark.parametrize("budget", [-1, 3, "3", "many", 1.5, None, True])
def test_unknown_budget(budget):
    with pytest.raises(ConfigError, match="unknown budget"):
        Schedule(["sa", "ca", "text", "sa", "ca", "text"]).parse_budget(budget)


def test_specs_from_string_dict_and_files(tmp_path):
    roles = ["sa", "ca", "text", "text"]
    assert Schedule.from_spec("sa, ca,text,text", 4).roles == roles
    assert Schedule.from_spec({"roles": roles, "position_encoding": "conv"}, 4).position_encoding == "conv"
    (tmp_path / "s.json").write_text(json.dumps({"roles": roles}))
    (tmp_path / "s.yaml").write_text("roles: [sa, ca, text, text]\nposition_encoding: rope\n")
    assert Schedule.from_spec(tmp_path / "s.json", 4).roles == roles
    assert Schedule.from_spec(str(tmp_path / "s.yaml"), 4).roles == roles
    assert Schedule.from_spec(None, 6) == Schedule.default(6)
    assert Schedule.from_spec(Schedule.default(6).to_dict(), 6) == Schedule.default(6)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sa,ca,text", "has 3 roles but the language model has 4"),
        ("sa,xa,text,text", "unknown layer role"),
        ({"roles": "sa"}, "needs a list 'roles'"),
        ({"roles": ["sa"] * 4, "position_encoding": "alibi"}, "unknown position encoding"),
        ("missing.yaml", "schedule file not found"),
    ],
)
def test_invalid_schedules(spec, message):
    with pytest.raises(ConfigError, match=message):
        Schedule.from_spec(spec, 4)


def test_too_shallow_for_the_default():
    with pytest.raises(ConfigError, match="at least 3"):
        Schedule.default(2)
