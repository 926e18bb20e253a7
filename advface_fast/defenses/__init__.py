"""Defenses: attack-as-defense (the paper's D, applied to query and gallery) and the adaptive
attacker who knows it (BPDA + EOT through D)."""

from __future__ import annotations

from advface_fast.defenses.adaptive import DefendedModel, adaptive_attack
from advface_fast.defenses.attack_as_defense import (DEFENSE_ATTACKS, AttackAsDefense, DefendedVerifier,
                                                     as_image_batch, make_defense)

__all__ = ["DEFENSE_ATTACKS", "AttackAsDefense", "DefendedModel", "DefendedVerifier", "adaptive_attack",
           "as_image_batch", "make_defense"]
