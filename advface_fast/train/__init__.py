"""Adversarial training, the baseline attack-as-defense is weighed against.

``split`` (training identities disjoint from every held-out pair), ``head`` (the CosFace
identity loss), ``adapter`` (the attack classes on the head's loss), ``methods`` (clean /
PGD-AT / FGSM-RS / free AT), ``loop`` (the training loop, logs, weights), ``checkpoint``
(safetensors checkpoints, exact resume), ``evaluate`` (held-out folds through the Table 1
code). The cost comparison of training vs the defense is a report: advface_fast.experiments.cost.
"""

from .loop import TrainConfig, train
from .split import TrainSplit, make_split

__all__ = ["TrainConfig", "TrainSplit", "make_split", "train"]
