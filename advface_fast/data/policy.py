"""The input rules every command shares: what to do with a bad image and with an image without a face.

One frozen ``InputPolicy`` travels from the command line (``--on-bad``, ``--no-face``) or the Python
API through ``prepare_pairs`` to every experiment (verify, Table 1, and later defend / paper /
gallery / advtrain), and is recorded with what it did in every results file.

on_bad (a file that cannot be used as it is):
  "error"   stop with a one-line error naming the file (default);
  "skip"    drop every pair that uses the file and list it in the results;
  "convert" convert grayscale / palette / CMYK / alpha images to RGB (alpha is composited onto
            ``ALPHA_BACKGROUND``, never dropped) and list every conversion; files that cannot be
            decoded at all still stop the run.
no_face (no detector found a face, so only the fixed centre box is left):
  "center"  score the image on the centre box (what the LFW protocol needs to keep every pair),
            and count and list every such image (default);
  "skip"    drop every pair that uses such an image and list it;
  "error"   stop with an error naming the images.
"""

from __future__ import annotations

from dataclasses import dataclass

ON_BAD_CHOICES = ("error", "skip", "convert")
NO_FACE_CHOICES = ("error", "skip", "center")
# Transparent pixels become this colour when an image with alpha is converted (on_bad="convert").
ALPHA_BACKGROUND = (255, 255, 255)


class DataWarning(UserWarning):
    """Something about the input was tolerated (skipped pairs, conversions); the CLI turns these
    into one summary, Python users see them as warnings."""


@dataclass(frozen=True)
class InputPolicy:
    """How bad input is handled: ``on_bad`` in ON_BAD_CHOICES, ``no_face`` in NO_FACE_CHOICES."""

    on_bad: str = "error"
    no_face: str = "center"

    def __post_init__(self):
        if self.on_bad not in ON_BAD_CHOICES:
            raise ValueError(f"on_bad must be one of {ON_BAD_CHOICES}, got {self.on_bad!r}")
        if self.no_face not in NO_FACE_CHOICES:
            raise ValueError(f"no_face must be one of {NO_FACE_CHOICES}, got {self.no_face!r}")

    def to_dict(self) -> dict:
        return {"on_bad": self.on_bad, "no_face": self.no_face,
                "alpha_background": list(ALPHA_BACKGROUND) if self.on_bad == "convert" else None}
