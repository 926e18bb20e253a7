"""advface-fast: a fast, honest benchmark of adversarial attacks and defenses on face verification."""

__version__ = "0.1.0"
