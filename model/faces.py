"""Finding every face in a picture and cutting each into the model's chip.

    RGB array -> YuNet (cv2.FaceDetectorYN): a padded pass for close-ups and crops, a larger one
    for small faces in big photos, merged by NMS -> faces (box, 5 landmarks, score)
              -> similarity transform from the landmarks onto the chip's template -> uint8 chip

A face-sized picture (a crop: DetectorSpec.crop_side) in which no face passes both the score
threshold and FaceRules.min_face_pixels is still taken as one: its best weaker detection of that
size, or else the whole picture, unless it is flat or pure noise. Torch-free, like model.decode,
so that the decode worker processes run it. The detector is YuNet from the OpenCV model zoo (MIT
licence, see YUNET-LICENSE beside this file).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np

DETECTOR_FILE = Path(__file__).with_name("face_detection_yunet_2023mar.onnx")
DETECTOR_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
NO_FACE = "no face found"
NO_FACE_CHOICES = ("fail", "answer")
# Where the eyes, the nose tip and the mouth corners land in the chip, as fractions of its width
# and height: the usual 5-point face template, widened so that the chip holds the hair about the
# face and the chin (eye line at 0.42, eyes 0.27 of the width apart).
CHIP_LANDMARKS = ((0.3656, 0.4208), (0.6330, 0.4193), (0.5002, 0.5499), (0.3904, 0.7294), (0.6121, 0.7281))
# YuNet's landmarks relative to its own box (fractions of the box's width and height), averaged
# over detections on face crops: how a whole picture taken as one face is aligned.
BOX_LANDMARKS = ((0.284, 0.384), (0.731, 0.382), (0.51, 0.586), (0.317, 0.739), (0.699, 0.738))
# The default colour of the detector's padding and of the chip beyond the picture's edges.
OUTSIDE = (128, 128, 128)


def _checked_landmarks(name: str, value: object) -> tuple[tuple[float, float], ...]:
    """5 (x, y) points as fractions of a width and height, the left eye left of the right one."""
    pairs = list(value) if isinstance(value, (list, tuple)) else []
    numbers = [v for p in pairs if isinstance(p, (list, tuple)) and len(p) == 2 for v in p]
    valid = len(pairs) == 5 and len(numbers) == 10
    valid = valid and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in numbers)
    if not valid or numbers[0] >= numbers[2]:
        raise ValueError(f"{name} must be 5 points (x, y) in [0, 1], the left eye left of the right one: {value!r}")
    return tuple((float(x), float(y)) for x, y in pairs)


def _checked_colour(name: str, value: object) -> tuple[int, int, int]:
    if not (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        raise ValueError(f"{name} must be 3 integers in [0, 255], found {value!r}")
    return tuple(value)


def _freeze(spec: object, *names: str) -> None:
    """Lists given for these fields become tuples, so that a spec built in code compares equal to
    the same one loaded, and can key a cache."""
    for name in names:
        value = getattr(spec, name)
        value = value.tolist() if isinstance(value, np.ndarray) else value  # numbers, not numpy scalars
        frozen = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        object.__setattr__(spec, name, frozen)


@dataclass(frozen=True)
class ChipSpec:
    """The face chip the model takes: its size, where the five landmarks land in it, and its
    colour (RGB) where it reaches beyond the picture."""

    height: int
    width: int
    landmarks: tuple[tuple[float, float], ...] = CHIP_LANDMARKS
    fill: tuple[int, int, int] = OUTSIDE

    def __post_init__(self) -> None:
        _freeze(self, "landmarks", "fill")

    def to_dict(self) -> dict:
        landmarks = [list(p) for p in self.landmarks]
        return {"height": self.height, "width": self.width, "landmarks": landmarks, "fill": list(self.fill)}

    @classmethod
    def from_dict(cls, d: dict) -> ChipSpec:
        points = _checked_landmarks("landmarks", d["landmarks"])
        fill = _checked_colour("fill", d.get("fill", [128, 128, 128]))  # the grey of checkpoints that do not record it
        return cls(int(d["height"]), int(d["width"]), points, fill)


# DetectorSpec's numeric settings: their type and the range a checkpoint's may take.
DETECTOR_SETTINGS = (
    ("score_threshold", float, 0.0, 1.0),
    ("weak_threshold", float, 0.0, 1.0),
    ("nms_threshold", float, 0.0, 1.0),
    ("close_side", int, 1, math.inf),
    ("far_side", int, 1, math.inf),
    ("pad", float, 0.0, math.inf),
    ("top_k", int, 1, 10_000),
    ("crop_side", int, 0, math.inf),
    ("crop_face_share", float, 0.0, 1.0),
)
# The DetectorSpec keys that a checkpoint of this format may omit (the shipped one does), with the
# values such checkpoints were made with: written out here, not taken from the defaults, which may change.
UNRECORDED_DETECTOR_SETTINGS = {
    "pad_colour": [128, 128, 128],
    "top_k": 100,
    "crop_side": 512,
    "crop_face_share": 0.5,
    "box_landmarks": [[0.284, 0.384], [0.731, 0.382], [0.51, 0.586], [0.317, 0.739], [0.699, 0.738]],
}


@dataclass(frozen=True)
class DetectorSpec:
    """The detector and how it is run; part of the preprocessing a checkpoint was trained with."""

    name: str = "yunet-2023mar"
    sha256: str = DETECTOR_SHA256
    score_threshold: float = 0.6  # 0.9 loses turned and dark faces, 0.5 finds faces in blurred backgrounds
    weak_threshold: float = 0.3  # what a face-sized picture settles for when nothing passes score_threshold
    nms_threshold: float = 0.3
    close_side: int = 320  # longest side of the padded pass (YuNet sees faces of about 10-300 px)
    far_side: int = 640  # longest side of the pass for small faces in big photos (it sees faces from about 2 % of the width)
    pad: float = 0.3  # border added around the picture for the close pass, as a fraction of its longer side
    pad_colour: tuple[int, int, int] = OUTSIDE  # RGB of that border (repeating the edges would repeat a face)
    top_k: int = 100  # most detections YuNet keeps from one pass
    crop_side: int = 512  # a picture at most this many pixels on its longer side may be a face crop
    # A face's box in a crop also counts, smaller than FaceRules.min_face_pixels, when its shorter
    # side is at least this share of the picture's: in a crop of 13-40 px the face is 11-20 px.
    crop_face_share: float = 0.5
    box_landmarks: tuple[tuple[float, float], ...] = BOX_LANDMARKS  # how a whole picture taken as a face is aligned

    def __post_init__(self) -> None:
        _freeze(self, "pad_colour", "box_landmarks")

    def to_dict(self) -> dict:
        d = asdict(self)
        return d | {"pad_colour": list(self.pad_colour), "box_landmarks": [list(p) for p in self.box_landmarks]}

    @classmethod
    def from_dict(cls, d: dict) -> DetectorSpec:
        """Exactly the fields to_dict writes, each of its type and in its range: a key left out
        would silently take this code's default, even the detector's SHA-256. Only the keys of
        UNRECORDED_DETECTOR_SETTINGS may be absent, and mean the values written there. The
        ValueError names the key that is wrong."""
        if not isinstance(d, dict):
            raise TypeError(f"a dict is needed, found {type(d).__name__}")
        d = UNRECORDED_DETECTOR_SETTINGS | d
        names = [f.name for f in fields(cls)]
        missing, unexpected = [k for k in names if k not in d], sorted(set(d) - set(names), key=str)
        if missing or unexpected:
            raise ValueError(f"missing {missing}, unexpected {unexpected}: the keys must be {names}")
        if not isinstance(d["name"], str):
            raise ValueError(f"name must be a string, found {d['name']!r}")
        if not (isinstance(d["sha256"], str) and re.fullmatch("[0-9a-f]{64}", d["sha256"])):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, found {d['sha256']!r}")
        for name, kind, low, high in DETECTOR_SETTINGS:
            value, allowed = d[name], f"in [{low}, {high}]" if math.isfinite(high) else f"at least {low}"
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'} {allowed}, found {value!r}")
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{name} must be {allowed}, found {value!r}")
        checked = {name: kind(d[name]) for name, kind, _, _ in DETECTOR_SETTINGS}
        pad_colour = _checked_colour("pad_colour", d["pad_colour"])
        box_landmarks = _checked_landmarks("box_landmarks", d["box_landmarks"])
        return cls(**(d | checked | {"pad_colour": pad_colour, "box_landmarks": box_landmarks}))


@dataclass(frozen=True)
class FaceRules:
    """The serving choices: which faces count, and what a picture without one gets."""

    min_face_pixels: int = 20  # shorter side of a face's box in the picture's own pixels (see DetectorSpec.crop_face_share)
    max_faces: int = 10  # the largest ones are kept
    no_face: str = "fail"  # "answer": classify the whole picture as one face instead


@dataclass(frozen=True)
class Face:
    """One face of a picture: where it is (in the picture's own pixels), how it was found, its chip."""

    box: tuple[float, float, float, float]  # left, top, width, height
    score: float  # the detector's; 0 for a whole picture taken as the face
    how: str  # "detected", "weak_detection" (a face-sized picture's best weaker find) or "whole_image"
    chip: np.ndarray  # uint8 (height, width, 3)


@dataclass(frozen=True)
class Preprocessing:
    """Everything the decode workers need to turn a picture into chips."""

    chip: ChipSpec
    detector: DetectorSpec
    rules: FaceRules


class DetectorMissing(RuntimeError):
    """The detector file is absent or not the one the checkpoint was trained with."""


def check_detector(spec: DetectorSpec, path: Path = DETECTOR_FILE) -> None:
    """Raise DetectorMissing unless `path` is the detector `spec` names (by SHA-256)."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise DetectorMissing(f"face detector {path} cannot be read: {exc.strerror}") from None
    if digest != spec.sha256:
        raise DetectorMissing(
            f"face detector {path} is not the one the checkpoint was trained with "
            f"({spec.name}, sha256 {spec.sha256[:12]}..., found {digest[:12]}...)"
        )


@functools.cache
def _detector(spec: DetectorSpec) -> cv2.FaceDetectorYN:
    check_detector(spec)
    cv2.setNumThreads(1)  # one decode process per core: threads inside each would only fight
    size = (spec.close_side, spec.close_side)
    return cv2.FaceDetectorYN.create(str(DETECTOR_FILE), "", size, spec.weak_threshold, 1.0, spec.top_k)


# YuNet's coarsest feature map has a stride of 32; on a shorter input it returns rows of stale
# memory (scores near 1, boxes of inf or 1e13), so no input side is shorter than this.
MIN_INPUT_SIDE = 64


def _run_pass(rgb: np.ndarray, side: int, pad: float, spec: DetectorSpec) -> np.ndarray:
    """Detections (N, 15: box, 5 landmarks, score) in `rgb`'s pixels, from the picture scaled so
    that, once padded by `pad` of its longer side in spec.pad_colour, its longer side is `side`."""
    height, width = rgb.shape[:2]
    scale = side / ((1 + 2 * pad) * max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    border = round(pad * max(size))
    # An input side under MIN_INPUT_SIDE (a banner's) is filled out below and to the right.
    extra_height, extra_width = (max(0, MIN_INPUT_SIDE - (n + 2 * border)) for n in (size[1], size[0]))
    padded = cv2.copyMakeBorder(
        small, border, border + extra_height, border, border + extra_width, cv2.BORDER_CONSTANT, value=spec.pad_colour
    )
    detector = _detector(spec)
    detector.setInputSize((padded.shape[1], padded.shape[0]))
    # YuNet takes BGR; cvtColor, as numpy's strided copy cost 6 % of a crop's decode
    _, found = detector.detect(cv2.cvtColor(padded, cv2.COLOR_RGB2BGR))
    if found is None:
        return np.empty((0, 15), np.float32)
    found = found.astype(np.float32)
    centre_x, centre_y = found[:, 0] + found[:, 2] / 2, found[:, 1] + found[:, 3] / 2
    sane = (
        np.isfinite(found).all(axis=1)
        & (found[:, 2] > 0)
        & (found[:, 3] > 0)
        & (centre_x >= 0)
        & (centre_x <= padded.shape[1])
        & (centre_y >= 0)
        & (centre_y <= padded.shape[0])
    )
    found = found[sane]  # a face's box may reach past the input, never lie outside it
    found[:, [0, *range(4, 14, 2)]] -= border  # the box's left and the landmarks' x
    found[:, [1, *range(5, 14, 2)]] -= border  # the box's top and the landmarks' y
    found[:, :14] /= scale
    return found


def detect(rgb: np.ndarray, spec: DetectorSpec) -> np.ndarray:
    """Every detection at or above spec.weak_threshold, both passes merged by NMS, best first."""
    passes = [_run_pass(rgb, spec.close_side, spec.pad, spec)]
    if max(rgb.shape[:2]) > 1.5 * spec.close_side:
        passes.append(_run_pass(rgb, min(spec.far_side, max(rgb.shape[:2])), 0.0, spec))
    found = np.concatenate(passes)
    if len(found) > 1:
        keep = cv2.dnn.NMSBoxes(found[:, :4].tolist(), found[:, 14].tolist(), spec.weak_threshold, spec.nms_threshold)
        found = found[np.asarray(keep, dtype=int).reshape(-1)]
    return found[np.argsort(-found[:, 14], kind="stable")]


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 rotation + uniform scale + shift that maps the points `src` onto `dst` with the least
    squared error (Umeyama's method, reflections excluded)."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    s, d = src - src_mean, dst - dst_mean
    u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(sigma) @ sign) / s.var(0).sum())
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def cut_chip(rgb: np.ndarray, landmarks: np.ndarray, chip: ChipSpec) -> np.ndarray:
    """The chip for a face whose 5 landmarks (in `rgb`'s pixels) are given. A face much larger than
    the chip is first shrunk by area averaging, so that the chip is not aliased."""
    target = np.array(chip.landmarks) * (chip.width, chip.height)
    matrix = _similarity(landmarks.astype(np.float64), target)
    scale = float(np.hypot(*matrix[:, 0]))
    if scale < 0.5:
        # cut the chip's footprint (with a margin) out of the picture and shrink it to twice the chip's scale
        corners = np.array([[0, 0], [chip.width, 0], [0, chip.height], [chip.width, chip.height]], np.float64)
        inverse = cv2.invertAffineTransform(matrix)
        source = corners @ inverse[:, :2].T + inverse[:, 2]
        left, top = np.floor(source.min(0)).astype(int) - 2
        right, bottom = np.ceil(source.max(0)).astype(int) + 2
        height, width = rgb.shape[:2]
        left, top, right, bottom = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
        if right - left >= 2 and bottom - top >= 2:
            factor = 2 * scale
            region = rgb[top:bottom, left:right]
            size = (max(1, round(region.shape[1] * factor)), max(1, round(region.shape[0] * factor)))
            fx, fy = size[0] / region.shape[1], size[1] / region.shape[0]
            # a pixel (u, v) of the shrunk region is the picture's ((u + 0.5) / fx - 0.5 + left, ...)
            to_picture = np.array([[1 / fx, 0, 0.5 / fx - 0.5 + left], [0, 1 / fy, 0.5 / fy - 0.5 + top], [0, 0, 1]])
            matrix = matrix @ to_picture
            rgb = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
    # Beyond the picture's edge the chip is its fill: repeating the edge would draw, say, a forehead
    # running up to the chip's top, a bald head where a tight crop cut off the hair.
    return cv2.warpAffine(
        rgb, matrix, (chip.width, chip.height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=chip.fill
    )


def _looks_like_a_picture(rgb: np.ndarray) -> bool:
    """False for a flat picture and for noise: photos vary, and are smooth from one pixel to the next."""
    grey = rgb.astype(np.float32).mean(2)
    spread = float(grey.std())
    if spread < 4:
        return False
    step = float(np.abs(np.diff(grey, axis=1)).mean() + np.abs(np.diff(grey, axis=0)).mean()) / 2
    return step < 0.5 * spread


def find_faces(rgb: np.ndarray, scale: float, chip: ChipSpec, spec: DetectorSpec, rules: FaceRules) -> list[Face]:
    """The faces of a picture decoded at `scale` of its own size, largest first; [] for none.
    Boxes are in the picture's own pixels (divided by `scale`)."""
    height, width = rgb.shape[:2]
    found = detect(rgb, spec)
    face_sized = max(height, width) / scale <= spec.crop_side

    def box_of(row: np.ndarray) -> tuple[float, ...]:
        return tuple(float(v) / scale for v in row[:4])

    def detected(row: np.ndarray, how: str) -> Face:
        return Face(box_of(row), round(float(row[14]), 4), how, cut_chip(rgb, row[4:14].reshape(5, 2), chip))

    smallest = rules.min_face_pixels
    if face_sized:
        smallest = min(smallest, spec.crop_face_share * min(height, width) / scale)
    big_enough = [row for row in found if min(box_of(row)[2:]) >= smallest]
    faces = [detected(row, "detected") for row in big_enough if row[14] >= spec.score_threshold]
    if not faces and face_sized and big_enough:
        # the best of them, below score_threshold: every one above it is in `faces` already
        faces.append(detected(big_enough[0], "weak_detection"))
    if not faces and (rules.no_face == "answer" or (face_sized and _looks_like_a_picture(rgb))):
        points = np.array(spec.box_landmarks) * (width, height)
        faces.append(Face((0.0, 0.0, width / scale, height / scale), 0.0, "whole_image", cut_chip(rgb, points, chip)))
    faces.sort(key=lambda f: f.box[2] * f.box[3], reverse=True)
    return faces[: rules.max_faces]
