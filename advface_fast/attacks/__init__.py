"""Adversarial attacks on face verification, one per file (torchattacks style).

Every attack perturbs the query of a (query, gallery) pair and is called as
``x_adv = attack(queries, gallery_embeddings, is_same, thresholds, sample_seeds=None)``;
see :class:`~advface_fast.attacks.base.Attack`. What they optimise lives in one swappable
:class:`~advface_fast.attacks.objective.VerificationObjective`.
"""

from __future__ import annotations

from advface_fast.attacks.base import Attack, check_on_uint8_grid, round_to_uint8_grid
from advface_fast.attacks.cw import CW, CWL2
from advface_fast.attacks.fgsm import FGSM
from advface_fast.attacks.noise import Noise
from advface_fast.attacks.objective import VerificationObjective
from advface_fast.attacks.pgd import PGD

ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "pgd": PGD,
    "cw": CW,
    "cw-l2": CWL2,
    "noise": Noise,
}


def list_attacks() -> list[str]:
    return sorted(ATTACKS)


def make_attack(name: str, model, metric: str | None = None, **config) -> Attack:
    """Build a registered attack: ``make_attack("pgd", model, eps=4, steps=40, metric="cosine")``.

    ``metric`` is a shorthand for ``objective=VerificationObjective(metric)``, so
    ``make_attack(model=model, **attack.config())`` rebuilds an equal attack.
    """
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise KeyError(f"unknown attack '{name}'; available: {', '.join(list_attacks())}") from None
    if metric is not None:
        if config.get("objective") is not None:
            raise ValueError("give either metric or objective, not both")
        config["objective"] = VerificationObjective(metric)
    return cls(model, **config)


__all__ = [
    "ATTACKS",
    "CW",
    "CWL2",
    "FGSM",
    "PGD",
    "Attack",
    "Noise",
    "VerificationObjective",
    "check_on_uint8_grid",
    "list_attacks",
    "make_attack",
    "round_to_uint8_grid",
]
