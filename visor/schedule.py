"""Layer roles and budgets: which LM layers see the visual tokens, and how.

Every decoder layer of the language model gets one role:

- ``sa``   an SA *candidate*: when active, the original layer runs on the whole sequence
           [visual; text]; when inactive it acts as a text-only layer.
- ``ca``   a cross-attention layer: text += gate * CrossAttn(norm(text), visual), then the
           original layer runs on the text tokens only.
- ``text`` the original layer on the text tokens only; visual states pass through unchanged.

The *budget* is the number of active SA candidates. ``budget="full"`` makes every layer SA and
skips every CA module: that is the base model, token for token.

Default rule for depth L: n = floor(L / 3) CA layers and n SA candidates. The layers are cut into
n consecutive groups, group g starting at layer floor(g * L / n); in each group the first layer is
an SA candidate, the second a CA layer, the rest text-only. For L = 24 this gives SA candidates
0, 3, ..., 21 and CA layers 1, 4, ..., 22, the paper's |CA| = |SA| = 8 spread uniformly.

Budget k activates the candidates with indices floor(i * n / k) for i = 0..k-1: evenly spread,
always including the first candidate, so visual tokens are contextualised early and every later
CA layer reads refined visual states.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import yaml

from .errors import ConfigError

ROLES = ("sa", "ca", "text")
POSITION_ENCODINGS = ("rope", "conv")
Budget = int | Literal["full"]


@dataclass
class Schedule:
    roles: list[str]
    # "rope": visual tokens keep the RoPE positions of the original sequence (also inside CA);
    # "conv": a 1-D depthwise-separable conv (k=7) adds a positional code to the visual states
    # before the first layer, and CA runs without RoPE (the paper's variant).
    position_encoding: str = "rope"

    def __post_init__(self):
        bad = [r for r in self.roles if r not in ROLES]
        if bad:
            raise ConfigError(f"unknown layer role(s) {sorted(set(bad))}; roles are {', '.join(ROLES)}")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ConfigError(
                f"unknown position encoding {self.position_encoding!r}; choose one of {', '.join(POSITION_ENCODINGS)}"
            )

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def default(cls, n_layers: int, position_encoding: str = "rope") -> Schedule:
        n = n_layers // 3
        if n == 0:
            raise ConfigError(f"the default schedule needs at least 3 LM layers, the model has {n_layers}")
        roles = ["text"] * n_layers
        for g in range(n):
            start = g * n_layers // n
            roles[start], roles[start + 1] = "sa", "ca"
        return cls(roles, position_encoding)

    @classmethod
    def from_spec(cls, spec: str | Path | dict | None, n_layers: int) -> Schedule:
        """A schedule from None (default rule), a dict, a JSON/YAML file, or 'sa,ca,text,...'."""
        if spec is None:
            return cls.default(n_layers)
        if isinstance(spec, (str, Path)) and Path(spec).suffix in (".json", ".yaml", ".yml"):
            path = Path(spec)
            if not path.is_file():
                raise ConfigError(f"schedule file not found: {path}")
            try:
                spec = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
            except yaml.YAMLError as e:
                raise ConfigError(f"schedule file {path} is not valid JSON/YAML: {e}") from None
        if isinstance(spec, str):
            spec = {"roles": [r.strip() for r in spec.split(",") if r.strip()]}
        if not isinstance(spec, dict) or not isinstance(spec.get("roles"), list):
            raise ConfigError("a schedule needs a list 'roles' with one of sa/ca/text per LM layer")
        schedule = cls(list(spec["roles"]), spec.get("position_encoding", "rope"))
        schedule.check_depth(n_layers)
        return schedule

    def check_depth(self, n_layers: int) -> None:
        if len(self.roles) != n_layers:
            raise ConfigError(f"the schedule has {len(self.roles)} roles but the language model has {n_layers} layers")

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return json.dumps(self.to_dict())

    # ---- queries ------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.roles)

    @property
    def sa_candidates(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == "sa"]

    @property
    def ca_layers(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == "ca"]

    @property
    def probe_layers(self) -> int:
        """The layers the budget policy's probe runs (at budget 0) before it chooses: up to and
        including the first CA layer, so that it reads the question after the text has looked at the
        image once (0 without CA layers: it reads the inputs)."""
        return self.ca_layers[0] + 1 if self.ca_layers else 0

    def shares_probe(self, depth: int) -> bool:
        """Whether a probe of ``depth`` layers at budget 0 is the start of every VISOR budget's (0..n)
        prefill (no SA candidate among its layers): then ``auto`` continues from it instead of starting
        again."""
        return all(c >= depth for c in self.sa_candidates)

    @property
    def sa_budgets(self) -> list[int]:
        """The VISOR budgets, cheapest first: 0..n active SA candidates."""
        return list(range(len(self.sa_candidates) + 1))

    @property
    def budgets(self) -> list[Budget]:
        """Every budget: 0..n, then "full" (the base model: every layer SA, no CA)."""
        return [*self.sa_budgets, "full"]

    def parse_budget(self, budget: Budget | str) -> Budget:
        """Normalise a budget from the API or CLI ("2", 2, "full"); raise ConfigError if unknown."""
        if isinstance(budget, str):
            budget = budget.strip().lower()
            if budget.isdigit():
                budget = int(budget)
        n = len(self.sa_candidates)
        if budget == "full" or (isinstance(budget, int) and not isinstance(budget, bool) and 0 <= budget <= n):
            return budget
        raise ConfigError(f"unknown budget {budget!r}: use an integer 0..{n} (active SA layers) or 'full'")

    def active_sa(self, budget: Budget) -> frozenset[int]:
        """The layer indices that run full self-attention at this budget."""
        budget = self.parse_budget(budget)
        if budget == "full":
            return frozenset(range(self.n_layers))
        candidates, n = self.sa_candidates, len(self.sa_candidates)
        return frozenset(candidates[i * n // budget] for i in range(budget))

    def plan(self, budget: Budget) -> list[str]:
        """The role each layer actually plays at this budget: 'sa', 'ca' or 'text'."""
        budget = self.parse_budget(budget)
        if budget == "full":
            return ["sa"] * self.n_layers
        active = self.active_sa(budget)
        return ["sa" if i in active else ("ca" if r == "ca" else "text") for i, r in enumerate(self.roles)]
