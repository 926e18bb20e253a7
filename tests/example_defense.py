"""A user's own defense, loaded by ``create_defense("example_defense:build", model)`` (tests put
this folder on sys.path): a random horizontal shift of the input by up to ``shift`` pixels,
edges replicated — the smallest complete Defense: a transform, randomness from per-image seeds,
settings for the cache key."""

from __future__ import annotations

import torch

from advface_fast.defenses import Defense


class RandomShift(Defense):
    name = "example-random-shift"
    paper = "(a test example)"
    randomized = True

    def __init__(self, model, shift: int = 2, seed: int = 0, batch_size: int = 8):
        super().__init__(model, seed=seed, batch_size=batch_size)
        self.shift = int(shift)

    def settings(self) -> dict:
        return {"shift": self.shift}

    def transform(self, x, seeds):
        out = torch.empty_like(x)
        for i, s in enumerate(seeds):
            k = int(torch.randint(-self.shift, self.shift + 1, (1,), generator=torch.Generator().manual_seed(int(s))))
            padded = torch.nn.functional.pad(x[i : i + 1].detach(), (self.shift, self.shift, 0, 0), mode="replicate")
            out[i] = padded[0, :, :, self.shift - k : self.shift - k + x.shape[-1]]
        return out


class MaskedRounding(Defense):
    """A defense built to mask gradients (a test of the leaderboard's checks, not a defense): the input
    rounded to ``levels`` grey levels per channel, and the rounding itself offered as the BPDA surrogate,
    so the attacker's gradient is zero everywhere while the decision is barely changed."""

    name = "example-masked-rounding"
    surrogate_name = "the rounding itself (gradient withheld)"

    def __init__(self, model, levels: int = 64, seed: int = 0, batch_size: int = 8):
        super().__init__(model, seed=seed, batch_size=batch_size)
        self.levels = int(levels)

    def settings(self) -> dict:
        return {"levels": self.levels}

    def transform(self, x, seeds=()):
        return self.surrogate(x).detach()

    def surrogate(self, x):
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


def masked(model, **params) -> MaskedRounding:
    return MaskedRounding(model, **params)


def build(model, **params) -> RandomShift:
    return RandomShift(model, **params)
