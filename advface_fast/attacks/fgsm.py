"""FGSM: one signed-gradient step of size eps."""

from __future__ import annotations

from advface_fast.attacks.base import Attack
from advface_fast.kernels import pgd_step


class FGSM(Attack):
    r"""
    FGSM in the paper 'Explaining and Harnessing Adversarial Examples'
    (Goodfellow et al., ICLR 2015) [https://arxiv.org/abs/1412.6572], on face verification.

    Distance Measure : Linf

    One step ``x0 + eps * sign(grad)`` of the objective's ``ascent_loss`` from the clean query,
    clamped to [0, 1] (the same fused ``pgd_step`` kernel as PGD). Deterministic by default
    (``seed`` unused). NaN gradient entries are set to 0 (those pixels stay put).

    ``random_start=True``: FGSM with a random initialisation ('Fast is better than free', Wong
    et al., ICLR 2020, with step eps): start uniformly in the eps-box (seeded like PGD's start),
    take the step of size eps from there, project onto the eps-box. Needed for objectives whose
    gradient vanishes at the clean image: the label-free "away-from-self" similarity is maximal
    there, so its gradient at x0 is float noise (measured on dlib-resnet, lfw_ci chips: L1 norm
    ~1e-6 per image at x0 vs ~1 at a uniform start within eps 4), and a plain FGSM step would
    follow the sign of rounding errors.

    Arguments:
        model (nn.Module): embedding model, N x 3 x H x W in [0, 1] -> N x D.
        eps (float): L-inf budget and step size, 0-255 pixel units. (Default: 4)
        objective (Objective | str | dict): what to ascend. (Default: verification, cosine)
        seed (int | None): seed of the random start (unused without it). (Default: 0)
        round_output (bool): deliver the uint8-grid image. (Default: True)
        random_start (bool): start uniformly in the eps-box (see above). (Default: False)

    Shape:
        - queries: (N, 3, H, W) in [0, 1], on the uint8 grid when rounding.
        - target: (N, D) gallery embeddings (verification) or None (label-free objectives),
          is_same: (N,) bool (verification), thresholds: (N,) or None (unused).
        - output: (N, 3, H, W) float32.

    Examples::
        >>> attack = FGSM(model, eps=4)
        >>> x_adv = attack(queries, gallery_embeddings, is_same, thresholds)
    """

    name = "fgsm"

    def __init__(self, model, eps: float = 4, objective=None, seed: int | None = 0, round_output: bool = True,
                 precision: str = "fp32", random_start: bool = False):
        super().__init__(model, eps, objective, seed, round_output, precision)
        self.random_start = bool(random_start)

    def _config(self) -> dict:
        return {"random_start": True} if self.random_start else {}  # only when on: default configs unchanged

    def perturb(self, x0, target, is_same, thresholds, noise):
        lo, hi = self._eps_box(x0)
        x = self._start(x0, lo, hi, noise)
        grad, _ = self._ascent_gradient(x, target, is_same)
        # Forward + backward image passes computed, and what the full attack costs (the same).
        self.last_stats = {"image_steps": x0.shape[0], "image_steps_full": x0.shape[0]}
        pgd_step(x, grad, lo, hi, self.eps / 255.0, overwrite_grad=True)
        return x
