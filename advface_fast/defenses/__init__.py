"""Test-time defenses behind one protocol (:class:`~advface_fast.defenses.base.Defense`), one
file per family, each registering itself: ``none``, ``attack-as-defense`` (the paper's D on query
and gallery), ``jpeg``, ``bit-depth``, ``median``, ``gaussian-smoothing``, ``counter-attack`` (TTC's
tau-gated counter-attack, with its gate-aware attacker); a user's own through
``create_defense("package.module:factory", model, ...)``. The adaptive attacker (BPDA + EOT) is
written once against the protocol (:mod:`.adaptive`).
"""

from __future__ import annotations

from advface_fast.defenses.adaptive import DefendedModel, adaptive_attack
from advface_fast.defenses.attack_as_defense import DEFENSE_ATTACKS, AttackAsDefense, make_defense
from advface_fast.defenses.base import Defense, DefendedVerifier, as_image_batch
from advface_fast.defenses.bit_depth import BitDepth
from advface_fast.defenses.counter_attack import CounterAttack, GateAwareModel
from advface_fast.defenses.jpeg import JPEG
from advface_fast.defenses.median import MedianFilter
from advface_fast.defenses.none import NoDefense
from advface_fast.defenses.registry import (check_defense, create_defense, defense_from_spec, list_defenses, parse_defense,
                                           register_defense, resolve_defense)
from advface_fast.defenses.smoothing import GaussianSmoothing

__all__ = ["DEFENSE_ATTACKS", "JPEG", "AttackAsDefense", "BitDepth", "CounterAttack", "DefendedModel", "DefendedVerifier", "Defense",
           "GateAwareModel", "GaussianSmoothing", "MedianFilter", "NoDefense", "adaptive_attack", "as_image_batch", "check_defense", "create_defense", "defense_from_spec",
           "list_defenses", "make_defense", "parse_defense", "register_defense", "resolve_defense"]
