"""Adversarial attacks on face verification, one per file (torchattacks style).

Every attack perturbs queries and is called as
``x_adv = attack(queries, target=None, is_same=None, thresholds=None, sample_seeds=None)``;
see :class:`~advface_fast.attacks.base.Attack`. What they push lives in one swappable
:class:`~advface_fast.attacks.objective.Objective`: the verification objective of a
(query, gallery) pair (the default), or a label-free one ("away-from-self",
"random-direction") that an attack-as-defense uses. Every gradient goes through one hook,
:meth:`~advface_fast.attacks.base.Attack.loss_and_grad`, which BPDA / EOT wrappers substitute.
"""

from __future__ import annotations

from advface_fast.attacks.base import DEFAULT_ATTACK_BATCH, Attack, check_on_uint8_grid, eval_mode, round_to_uint8_grid
from advface_fast.attacks.cw import CW, CWL2
from advface_fast.attacks.fgsm import FGSM
from advface_fast.attacks.noise import Noise
from advface_fast.attacks.objective import (
    OBJECTIVES,
    AwayFromSelf,
    Objective,
    RandomDirection,
    VerificationObjective,
    make_objective,
)
from advface_fast.attacks.pgd import PGD
from advface_fast.attacks.square import Square

ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "pgd": PGD,
    "cw": CW,
    "cw-l2": CWL2,
    "noise": Noise,
    "square": Square,
}


def list_attacks() -> list[str]:
    return sorted(ATTACKS)


def make_attack(name: str, model, metric: str | None = None, objective=None, **config) -> Attack:
    """Build a registered attack: ``make_attack("pgd", model, eps=4, steps=40, objective="away-from-self")``.

    ``objective`` is a spec: a name, a config dict (``{"name": "verification", "metric": "l2"}``)
    or an :class:`Objective`. ``metric`` is a shorthand for ``objective={"name": "verification",
    "metric": metric}``. ``make_attack(model=model, **attack.config())`` rebuilds an equal attack.
    """
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise KeyError(f"unknown attack '{name}'; available: {', '.join(list_attacks())}") from None
    if metric is not None:
        if objective is not None:
            raise ValueError("give either metric or objective, not both")
        objective = VerificationObjective(metric)
    return cls(model, objective=make_objective(objective), **config)


__all__ = [
    "DEFAULT_ATTACK_BATCH",
    "ATTACKS",
    "CW",
    "CWL2",
    "FGSM",
    "OBJECTIVES",
    "PGD",
    "Attack",
    "AwayFromSelf",
    "Noise",
    "Objective",
    "RandomDirection",
    "Square",
    "VerificationObjective",
    "check_on_uint8_grid",
    "eval_mode",
    "list_attacks",
    "make_attack",
    "make_objective",
    "round_to_uint8_grid",
]
