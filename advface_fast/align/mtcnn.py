"""MTCNN face detection + 5 landmarks, and similarity alignment onto a landmark template.

MTCNN (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks", 2016) is a cascade of three small networks:

- P-Net, fully convolutional, on an image pyramid (scale 12 / min_face, then x0.709 while the
  short side is >= 12 px): a face score and a box regression per 12 x 12 window, stride 2;
- R-Net on 24 x 24 crops of the surviving boxes (made square): score + box regression;
- O-Net on 48 x 48 crops: score + box regression + 5 landmarks (eyes, nose, mouth corners).

Between stages: non-maximum suppression (``nms``, IoU "union", and "min" after O-Net), box
regression, squaring. Inputs are RGB, normalised as (x - 127.5) / 128; crops are resized with
area averaging. The weights are facenet-pytorch's ``pnet.pt / rnet.pt / onet.pt`` (MIT, converted
from the original Caffe models), read with ``torch.load(weights_only=True)`` from the installed
wheel without importing the package (its ``__init__`` needs torchvision). The network
definitions follow those state dicts' layer names; R-Net and O-Net flatten their last feature map
in (W, H, C) order, as the converted dense weights expect.

Alignment: ``umeyama`` fits the least-squares similarity transform (rotation, uniform scale,
translation) from the 5 detected landmarks to a template, and ``warp_affine`` resamples the chip
(bilinear, zeros outside the image; pixel centres at integer coordinates, as OpenCV's warpAffine).
Templates: ``"arcface"`` - the standard ArcFace / insightface 112 x 112 five points (also OpenCV's
FaceRecognizerSF::alignCrop), scaled for other sizes; ``"facenet"`` - no landmarks: the MTCNN box
(plus ``margin`` pixels) cropped and resized to ``size`` (160 for FaceNet), as facenet-pytorch does.

Coordinates: boxes are (x1, y1, x2, y2) with inclusive pixel indices, landmarks (x, y) in pixels
with pixel centres at integers, both in the input image.

Example::

    aligner = MtcnnAligner(MtcnnConfig(size=112, template="arcface"))
    chip, path = aligner.align(rgb_uint8_image)  # 112 x 112 x 3 uint8, "mtcnn"
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advface_fast.align.dlib_align import NoFaceError

WEIGHTS_PACKAGE = "facenet_pytorch"
# Bump when the code changes what the aligner produces, so cached chips are not reused.
MTCNN_VERSION = 1

# The ArcFace five-point template for 112 x 112 chips: left eye, right eye, nose tip, left and
# right mouth corners (x, y) in pixels (as seen in the image: "left" is the viewer's left).
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
TEMPLATES = ("arcface", "facenet")


# -- the networks -------------------------------------------------------------------------------

class PNet(nn.Module):
    """12 x 12 windows -> (box regression N x 4 x h x w, face probability N x 2 x h x w)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """N x 3 x 24 x 24 -> (box regression N x 4, face probability N x 2)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """N x 3 x 48 x 48 -> (box regression N x 4, landmarks N x 10 as x1..x5, y1..y5 in box
    fractions, face probability N x 2)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def weights_dir() -> Path:
    """The folder of facenet-pytorch's MTCNN weights, found without importing the package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("MTCNN's weights ship in the facenet-pytorch wheel; install it without its "
                                  "torch/torchvision pins: pip install --no-deps facenet-pytorch==2.6.0")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def weights_identity(folder=None) -> dict[str, str]:
    """sha256 of each MTCNN weight file, keyed by file name (for cache keys)."""
    from advface_fast.fileio import sha256_file

    folder = Path(folder) if folder is not None else weights_dir()
    return {f"{n}.pt": sha256_file(folder / f"{n}.pt") for n in ("pnet", "rnet", "onet")}


# -- boxes ----------------------------------------------------------------------------------------

def box_iou(boxes: torch.Tensor, others: torch.Tensor, mode: str = "union") -> torch.Tensor:
    """Pairwise overlap of inclusive-pixel boxes (x1, y1, x2, y2): intersection over union, or over
    the smaller area ("min"). boxes N x 4, others M x 4 -> N x M."""
    area = lambda b: (b[:, 2] - b[:, 0] + 1).clamp(min=0) * (b[:, 3] - b[:, 1] + 1).clamp(min=0)  # noqa: E731
    lt = torch.maximum(boxes[:, None, :2], others[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:4], others[None, :, 2:4])
    inter = (rb - lt + 1).clamp(min=0).prod(dim=2)
    a, b = area(boxes)[:, None], area(others)[None, :]
    denom = torch.minimum(a, b) if mode == "min" else a + b - inter
    return inter / denom.clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression: indices (into ``boxes``) of the kept boxes, best first.
    A box is dropped when its overlap (``box_iou`` ``mode``) with a kept, better box exceeds
    ``threshold``. Equal scores keep the lower index first."""
    if mode not in ("union", "min"):
        raise ValueError(f"mode must be 'union' or 'min', got {mode!r}")
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores, descending=True, stable=True).indices
    overlap = (box_iou(boxes[order], boxes[order], mode) > threshold).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlap[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes made square around their centre (side = the longer side)."""
    w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    side = torch.maximum(w, h)
    out = boxes.clone()
    out[:, 0] = boxes[:, 0] + (w - side) / 2
    out[:, 1] = boxes[:, 1] + (h - side) / 2
    out[:, 2] = out[:, 0] + side - 1
    out[:, 3] = out[:, 1] + side - 1
    return out


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply MTCNN's box regression: offsets in units of the box width / height."""
    w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    out = boxes.clone()
    out[:, :4] = boxes[:, :4] + reg * torch.stack([w, h, w, h], dim=1)
    return out


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each box's pixels (rounded to whole pixels; zeros outside the image) resized to size x size
    with area averaging: 1 x 3 x H x W float -> N x 3 x size x size."""
    _, _, height, width = image.shape
    out = []
    for x1, y1, x2, y2 in torch.round(boxes[:, :4]).long().tolist():
        x2, y2 = max(x2, x1), max(y2, y1)
        patch = image.new_zeros(1, 3, y2 - y1 + 1, x2 - x1 + 1)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)
        if sx2 >= sx1 and sy2 >= sy1:
            patch[:, :, sy1 - y1:sy2 - y1 + 1, sx1 - x1:sx2 - x1 + 1] = image[:, :, sy1:sy2 + 1, sx1:sx2 + 1]
        out.append(F.interpolate(patch, size=(size, size), mode="area"))
    return torch.cat(out) if out else image.new_zeros(0, 3, size, size)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB from a grey (H x W), RGB or RGBA (alpha dropped) uint8 image."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got shape {image.shape} {image.dtype}")
    return image


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


class MTCNN(nn.Module):
    """The three-stage detector. ``detect(image)`` -> (boxes K x 5 [x1, y1, x2, y2, score],
    landmarks K x 5 x 2), best score first, for one RGB uint8 H x W x 3 image.

    Args: min_face (smallest face side in pixels, 20), thresholds (P/R/O-Net face probabilities,
    (0.6, 0.7, 0.7)), factor (pyramid scale step, 0.709) - the published defaults.
    """

    def __init__(self, min_face: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709):
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        self.min_face, self.thresholds, self.factor = min_face, tuple(thresholds), factor

    def scales(self, height: int, width: int) -> list[float]:
        scale, side, out = 12.0 / self.min_face, min(height, width) * 12.0 / self.min_face, []
        while side >= 12:
            out.append(scale)
            scale, side = scale * self.factor, side * self.factor
        return out

    def _stage1(self, img: torch.Tensor) -> torch.Tensor:
        _, _, height, width = img.shape
        found = []
        for scale in self.scales(height, width):
            h, w = int(height * scale + 1), int(width * scale + 1)
            reg, prob = self.pnet(_normalise(F.interpolate(img, size=(h, w), mode="area")))
            ys, xs = torch.nonzero(prob[0, 1] >= self.thresholds[0], as_tuple=True)
            if len(ys) == 0:
                continue
            x1, y1 = (2 * xs).to(img.dtype) / scale, (2 * ys).to(img.dtype) / scale
            x2, y2 = (2 * xs + 12).to(img.dtype) / scale - 1, (2 * ys + 12).to(img.dtype) / scale - 1
            boxes = torch.stack([x1, y1, x2, y2, prob[0, 1, ys, xs]], dim=1)
            boxes = torch.cat([boxes, reg[0, :, ys, xs].T], dim=1)
            found.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
        if not found:
            return img.new_zeros(0, 5)
        boxes = torch.cat(found)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        return _square(_regress(boxes[:, :5], boxes[:, 5:9]))

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image = as_rgb(image)
        device = self.pnet.conv1.weight.device
        img = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None].to(device)
        boxes = self._stage1(img)
        if len(boxes):
            reg, prob = self.rnet(_normalise(_crops(img, boxes, 24)))
            ok = prob[:, 1] > self.thresholds[1]
            boxes, reg = torch.cat([boxes[ok, :4], prob[ok, 1:]], dim=1), reg[ok]
            keep = nms(boxes[:, :4], boxes[:, 4], 0.7)
            boxes = _square(_regress(boxes[keep], reg[keep]))
        points = img.new_zeros(0, 5, 2)
        if len(boxes):
            reg, marks, prob = self.onet(_normalise(_crops(img, boxes, 48)))
            ok = prob[:, 1] > self.thresholds[2]
            boxes, reg, marks = torch.cat([boxes[ok, :4], prob[ok, 1:]], dim=1), reg[ok], marks[ok]
            w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
            px = boxes[:, :1] + w[:, None] * marks[:, :5]
            py = boxes[:, 1:2] + h[:, None] * marks[:, 5:]
            points = torch.stack([px, py], dim=2)
            boxes = _regress(boxes, reg)
            keep = nms(boxes[:, :4], boxes[:, 4], 0.7, mode="min")
            boxes, points = boxes[keep], points[keep]
        return boxes.cpu().numpy().astype(np.float64), points.cpu().numpy().astype(np.float64)


def load_mtcnn(folder=None, **kwargs) -> MTCNN:
    """MTCNN with facenet-pytorch's weights (``weights_only=True``), eval mode, frozen."""
    folder = Path(folder) if folder is not None else weights_dir()
    model = MTCNN(**kwargs)
    for name in ("pnet", "rnet", "onet"):
        path = folder / f"{name}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"MTCNN weights {path} not found")
        getattr(model, name).load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


# -- alignment ------------------------------------------------------------------------------------

def umeyama(src: np.ndarray, dst: np.ndarray, scale: bool = True) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) taking points ``src`` (K x 2) onto ``dst``
    (K x 2): the 2 x 3 matrix M with dst ~ M @ [x, y, 1]. ``scale=False`` fits a rigid transform."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two K x 2 point sets (K >= 2), got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection: flip the weakest axis
        sign[-1] = -1
    rot = u @ np.diag(sign) @ vt
    var_s = (s0 ** 2).sum() / len(src)
    c = (sig * sign).sum() / var_s if scale else 1.0
    matrix = np.zeros((2, 3))
    matrix[:, :2] = c * rot
    matrix[:, 2] = mu_d - c * rot @ mu_s
    return matrix


def warp_affine(image: np.ndarray, matrix: np.ndarray, size) -> np.ndarray:
    """Resample ``image`` (H x W x 3 uint8) so output pixel (x, y) takes the bilinear value at
    inverse(M) @ (x, y) (M maps input to output pixel centres), zeros outside; size (H, W) or int."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    full = np.vstack([matrix, [0, 0, 1]])
    inv = np.linalg.inv(full)[:2]
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    height, width = image.shape[:2]
    # grid_sample with align_corners=False: -1 / +1 are the outer pixel edges, centres at i + 0.5.
    grid = torch.from_numpy(np.stack([(2 * sx + 1) / width - 1, (2 * sy + 1) / height - 1], -1))[None].float()
    img = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def template_points(size: int) -> np.ndarray:
    """The ArcFace 5-point template for a size x size chip (scaled from 112 about the corner)."""
    return ARCFACE_112 * (size / 112.0)


def align_to_template(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The size x size chip: a similarity transform of the 5 landmarks onto the ArcFace template."""
    return warp_affine(image, umeyama(landmarks, template_points(size)), size)


def crop_box(image: np.ndarray, box, size: int = 160, margin: float = 0.0) -> np.ndarray:
    """FaceNet's chip: the box grown by ``margin`` pixels (of the output size, as facenet-pytorch
    counts it), clipped to the image, resized to size x size (bilinear, antialiased)."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    mx = margin * (x2 - x1) / max(size - margin, 1)
    my = margin * (y2 - y1) / max(size - margin, 1)
    left, top = int(max(x1 - mx / 2, 0)), int(max(y1 - my / 2, 0))
    right, bottom = int(min(x2 + mx / 2, width)), int(min(y2 + my / 2, height))
    patch = torch.from_numpy(np.array(image[top:bottom, left:right], dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@dataclass(frozen=True)
class MtcnnConfig:
    """How MTCNN chips are made; ``key()`` names every setting (for chip-cache keys)."""

    size: int = 112
    template: str = "arcface"
    margin: float = 0.0  # "facenet" template only
    min_face: int = 20
    thresholds: tuple = (0.6, 0.7, 0.7)
    factor: float = 0.709

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.size < 1 or self.min_face < 12 or not 0 < self.factor < 1 or len(self.thresholds) != 3:
            raise ValueError(f"bad MTCNN settings: size={self.size}, min_face={self.min_face}, "
                             f"factor={self.factor}, thresholds={self.thresholds}")

    def key(self) -> str:
        key = (f"mtcnn-v{MTCNN_VERSION}-{self.template}-size{self.size}-min{self.min_face}-"
               f"th{','.join(f'{t:g}' for t in self.thresholds)}-f{self.factor:g}")
        return key + (f"-margin{self.margin:g}" if self.template == "facenet" else "")


class NoFaceFound(NoFaceError):
    """MTCNN found no face in the image (a ``NoFaceError``, like the dlib aligner's)."""


class MtcnnAligner:
    """Image -> chip: MTCNN, the face nearest the image centre (LFW centres its subject), then the
    template (see the module docstring). ``align(image)`` -> (chip size x size x 3 uint8, "mtcnn");
    ``locate(image)`` -> (box [x1, y1, x2, y2, score], landmarks 5 x 2); both raise
    ``NoFaceFound`` when there is no face."""

    def __init__(self, config: MtcnnConfig | None = None, weights=None):
        self.config = config or MtcnnConfig()
        c = self.config
        self.detector = load_mtcnn(weights, min_face=c.min_face, thresholds=c.thresholds, factor=c.factor)

    def locate(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes, points = self.detector.detect(image)
        if len(boxes) == 0:
            raise NoFaceFound("MTCNN found no face")
        height, width = image.shape[:2]
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
        best = int(np.argmin(((centres - [(width - 1) / 2, (height - 1) / 2]) ** 2).sum(1)))
        return boxes[best], points[best]

    def align(self, image: np.ndarray) -> tuple[np.ndarray, str]:
        image = as_rgb(image)
        box, points = self.locate(image)
        if self.config.template == "facenet":
            return crop_box(image, box, self.config.size, self.config.margin), "mtcnn"
        return align_to_template(image, points, self.config.size), "mtcnn"


__all__ = ["ARCFACE_112", "MTCNN", "as_rgb", "MtcnnAligner", "MtcnnConfig", "NoFaceFound", "ONet", "PNet", "RNet",
           "align_to_template", "box_iou", "crop_box", "load_mtcnn", "nms", "template_points", "umeyama",
           "warp_affine", "weights_dir", "weights_identity"]
