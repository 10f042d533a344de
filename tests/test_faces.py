"""Finding and aligning faces in whole pictures: small faces in big photos, several faces, turned
heads, pictures without a face, face-sized crops, and the one code path that training, evaluation
and serving share."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from model.decode import ImageError, decode_faces, decode_file
from model.faces import (
    BOX_LANDMARKS,
    CHIP_LANDMARKS,
    NO_FACE,
    UNRECORDED_DETECTOR_SETTINGS,
    ChipSpec,
    DetectorSpec,
    FaceRules,
    Preprocessing,
    cut_chip,
    detect,
    find_faces,
)
from model.preprocess import to_batch
from tests.conftest import SHARED_DATA, needs_shared_data
from train.data import TRAINING_RULES, load_dataset
from train.photos import background, compose

SERVING = Preprocessing(ChipSpec(64, 64), DetectorSpec(), FaceRules())


def jpeg(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def shared_faces(count: int, folder: str = "lfw", seed: int = 0) -> list[Image.Image]:
    paths = sorted((SHARED_DATA / "other" / folder).rglob("*.jpg"))
    return [Image.open(p).convert("RGB") for p in random.Random(seed).sample(paths, count)]


def centre_inside(face, box) -> bool:
    x, y = face.box[0] + face.box[2] / 2, face.box[1] + face.box[3] / 2
    return box[0] <= x <= box[0] + box[2] and box[1] <= y <= box[1] + box[3]


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of the middle of two chips (the face, whatever surrounds it): near 1 for the same
    face aligned alike."""
    a, b = (c[20:52, 16:48].astype(np.float64).ravel() for c in (a, b))
    return float(np.corrcoef(a, b)[0, 1])


@needs_shared_data
@pytest.mark.parametrize("count", [1, 2, 3])
def test_every_face_of_a_big_photo_is_found_where_it_was_pasted(count):
    rng = random.Random(count)
    for trial in range(4):
        img, boxes = compose(shared_faces(count, seed=10 * count + trial), rng)
        faces = decode_faces(jpeg(img), SERVING)
        assert len(faces) == count, (trial, [f.box for f in faces], boxes)
        for box in boxes:
            assert sum(centre_inside(f, box) for f in faces) == 1
        assert [f.box[2] * f.box[3] for f in faces] == sorted((f.box[2] * f.box[3] for f in faces), reverse=True)
        assert all(f.how == "detected" and f.score >= SERVING.detector.score_threshold for f in faces)


@needs_shared_data
def test_a_small_face_in_a_big_photo_gives_the_chip_of_the_crop():
    (crop,) = shared_faces(1, "portraits", seed=3)
    as_crop = decode_faces(jpeg(crop), SERVING)[0].chip
    img, _ = compose([crop], random.Random(0), (3000, 2000))
    (in_photo,) = decode_faces(jpeg(img), SERVING)
    assert similarity(as_crop, in_photo.chip) > 0.85


@needs_shared_data
@pytest.mark.parametrize("angle", [-25, 25])
def test_a_turned_head_is_found(angle):
    """Turned by 25 degrees within the picture, each face is still found (how it is aligned is
    test_the_chip_puts_the_landmarks_on_the_template)."""
    for crop in shared_faces(4, "portraits", seed=5):
        turned = crop.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(128, 128, 128))
        (face, *_) = decode_faces(jpeg(turned), SERVING)
        assert face.how == "detected"


def test_a_picture_without_a_face_fails_with_the_reason():
    rng = random.Random(0)
    pictures = [background((1600, 1200), rng) for _ in range(3)]
    pictures += [Image.new("RGB", (200, 160), (128, 128, 128))]  # a plain canvas, face-sized
    noise = np.random.default_rng(0).integers(0, 256, (120, 100, 3), dtype=np.uint8)
    pictures += [Image.fromarray(noise)]  # random noise, face-sized
    for img in pictures:
        with pytest.raises(ImageError, match=NO_FACE):
            decode_faces(jpeg(img), SERVING)


def test_answer_anyway_classifies_the_whole_picture():
    answer = Preprocessing(SERVING.chip, SERVING.detector, FaceRules(no_face="answer"))
    (face,) = decode_faces(jpeg(background((1600, 1200), random.Random(1))), answer)
    assert face.how == "whole_image" and face.box == (0.0, 0.0, 1600.0, 1200.0) and face.chip.shape == (64, 64, 3)


@needs_shared_data
def test_a_face_sized_crop_is_answered_even_where_the_detector_is_unsure():
    """The tightest crops of the development sets, cut tighter still: each is still a face."""
    answered = {"detected": 0, "weak_detection": 0, "whole_image": 0}
    for img in shared_faces(40, "imfdb", seed=1):
        w, h = img.size
        tight = img.crop((w // 6, h // 6, w - w // 6, h - h // 6))
        (face,) = decode_faces(jpeg(tight), SERVING)
        answered[face.how] += 1
    assert sum(answered.values()) == 40 and answered["detected"] > 20


@needs_shared_data
def test_face_rules_smallest_face_and_most_faces():
    img, _ = compose(shared_faces(3, seed=7), random.Random(7))
    all_faces = decode_faces(jpeg(img), SERVING)
    assert len(all_faces) == 3
    two = Preprocessing(SERVING.chip, SERVING.detector, FaceRules(max_faces=2))
    assert [f.box for f in decode_faces(jpeg(img), two)] == [f.box for f in all_faces[:2]]
    smallest = min(min(f.box[2], f.box[3]) for f in all_faces)
    large_only = Preprocessing(SERVING.chip, SERVING.detector, FaceRules(min_face_pixels=int(smallest) + 1))
    assert len(decode_faces(jpeg(img), large_only)) == 2


def test_boxes_are_in_the_pictures_own_pixels_when_decoded_at_reduced_scale():
    """find_faces on a picture decoded at half scale reports boxes twice as large."""
    rgb = np.asarray(background((800, 600), random.Random(2)))
    rules = FaceRules(no_face="answer")
    (at_full,) = find_faces(rgb, 1.0, SERVING.chip, SERVING.detector, rules)
    (at_half,) = find_faces(rgb, 0.5, SERVING.chip, SERVING.detector, rules)
    assert at_half.box == tuple(2 * v for v in at_full.box)


def test_the_chip_puts_the_landmarks_on_the_template():
    """A picture with a bright dot on each of five landmark positions: cut_chip maps them onto
    the chip's template, turned and scaled as they were."""
    chip = ChipSpec(64, 64)
    rgb = np.zeros((400, 400, 3), np.uint8)
    angle = np.radians(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (np.array(chip.landmarks) - 0.5) * 150 @ rotation.T + 200
    for x, y in points:
        rgb[round(y) - 2 : round(y) + 3, round(x) - 2 : round(x) + 3] = 255
    out = cut_chip(rgb, points, chip)[:, :, 0].astype(float)
    for fx, fy in chip.landmarks:
        x, y = fx * 64, fy * 64
        window = out[int(y) - 3 : int(y) + 4, int(x) - 3 : int(x) + 4]
        assert window.max() > 60, (fx, fy)


def test_the_chip_takes_its_fill_beyond_the_picture():
    """A small white picture in the middle of a large chip: the chip's corners are its fill."""
    rgb = np.full((40, 40, 3), 255, np.uint8)
    points = np.array(CHIP_LANDMARKS) * 160 - 60  # the chip spans 160 px about the picture's centre
    for fill in ((128, 128, 128), (10, 200, 30)):
        out = cut_chip(rgb, points, ChipSpec(64, 64, fill=fill))
        assert tuple(out[32, 32]) == (255, 255, 255)
        assert tuple(out[0, 0]) == tuple(out[-1, -1]) == fill


@needs_shared_data
def test_training_evaluation_and_serving_cut_the_same_chips(tmp_path):
    """One code path: the chips train.data caches are those the service's decode workers make."""
    folder = tmp_path / "faces"
    for label in ("female", "male"):
        (folder / label).mkdir(parents=True)
    img, _ = compose(shared_faces(2, seed=9), random.Random(9))
    img.save(folder / "female" / "two.jpg", quality=92)
    for i, face in enumerate(shared_faces(3, "utkface", seed=11)):
        face.save(folder / "male" / f"{i}.jpg", quality=92)
    items = [(p, 0) for p in sorted((folder / "female").iterdir())] + [(p, 1) for p in sorted((folder / "male").iterdir())]
    training = Preprocessing(SERVING.chip, SERVING.detector, TRAINING_RULES)
    cached, _ = load_dataset(items, training)
    served = [decode_file(p, SERVING) for p, _ in items]
    assert torch.equal(cached.images, to_batch([d.faces[0].chip for d in served]))
    assert len(served[0].faces) == 2  # serving answers both; training takes the main face


@needs_shared_data
def test_a_face_under_min_face_pixels_counts_only_as_the_whole_of_a_tiny_crop():
    """A face 20 px wide pasted into a face-sized picture: the detector finds it, mostly above the
    score threshold, but its box is under min_face_pixels, so it is neither a face nor the
    picture's best weaker find. The same face as a crop of its own is that crop's face."""
    rules = FaceRules()
    small_found = 0
    for i, crop in enumerate(shared_faces(6, "portraits", seed=3)):
        tiny = crop.resize((20, round(20 * crop.height / crop.width)))
        img = background((200, 200), random.Random(i))
        img.paste(tiny, (70, 60))
        rgb = np.asarray(img)
        small_found += any(min(row[2:4]) < rules.min_face_pixels for row in detect(rgb, SERVING.detector))
        faces = find_faces(rgb, 1.0, SERVING.chip, SERVING.detector, rules)
        assert all(f.how == "whole_image" or min(f.box[2:]) >= rules.min_face_pixels for f in faces), faces
        (alone,) = find_faces(np.asarray(tiny), 1.0, SERVING.chip, SERVING.detector, rules)
        assert alone.how == "detected" and min(alone.box[2:]) < rules.min_face_pixels, alone
    assert small_found >= 4  # the case is there to be tested


def test_detector_settings_round_trip():
    spec = DetectorSpec(score_threshold=0.5, close_side=256, pad_colour=(0, 0, 0), top_k=5, crop_side=300)
    assert DetectorSpec.from_dict(spec.to_dict()) == spec
    moved = DetectorSpec(crop_face_share=0.25, box_landmarks=((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.75), (0.65, 0.75)))
    assert DetectorSpec.from_dict(moved.to_dict()) == moved
    whole_numbers = DetectorSpec.from_dict(spec.to_dict() | {"score_threshold": 1, "pad": 0})
    assert whole_numbers.score_threshold == 1.0 and isinstance(whole_numbers.pad, float)


def test_specs_built_with_lists_equal_the_loaded_ones_and_key_the_detector_cache():
    points = [list(p) for p in BOX_LANDMARKS]
    spec = DetectorSpec(pad_colour=[0, 0, 0], box_landmarks=points)
    assert spec == DetectorSpec.from_dict(spec.to_dict()) and hash(spec) == hash(DetectorSpec.from_dict(spec.to_dict()))
    from_numpy = ChipSpec(64, 64, landmarks=np.array(CHIP_LANDMARKS), fill=[0, 0, 0])
    assert hash(from_numpy) == hash(ChipSpec(64, 64, CHIP_LANDMARKS, (0, 0, 0)))
    assert type(from_numpy.landmarks[0][0]) is float
    assert detect(np.full((100, 100, 3), 128, np.uint8), spec).shape == (0, 15)  # the cached detector takes it


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"sha256": None}, r"missing \['sha256'\]"),
        ({"close_side": None, "score_threshold": None}, r"missing \['score_threshold', 'close_side'\]"),
        ({"extra": 1}, r"unexpected \['extra'\]"),
        ({"name": 3}, "name must be a string"),
        ({"sha256": "ABC"}, "sha256 must be 64 lowercase hex digits"),
        ({"score_threshold": 1.5}, r"score_threshold must be in \[0.0, 1.0\], found 1.5"),
        ({"weak_threshold": "0.3"}, "weak_threshold must be a number"),
        ({"nms_threshold": -0.1}, "nms_threshold must be in"),
        ({"nms_threshold": float("nan")}, "nms_threshold must be in"),
        ({"close_side": 0}, "close_side must be at least 1, found 0"),
        ({"far_side": 640.0}, "far_side must be an integer"),
        ({"far_side": True}, "far_side must be an integer"),
        ({"pad": -0.1}, "pad must be at least 0.0"),
        ({"pad": float("inf")}, "pad must be at least 0.0"),
        ({"pad_colour": [128, 128]}, "pad_colour must be 3 integers in"),
        ({"pad_colour": [128, 128, 256]}, "pad_colour must be 3 integers in"),
        ({"top_k": 0}, r"top_k must be in \[1, 10000\], found 0"),
        ({"crop_side": -1}, "crop_side must be at least 0, found -1"),
        ({"crop_face_share": 1.5}, r"crop_face_share must be in \[0.0, 1.0\]"),
        ({"box_landmarks": [[0.5, 0.5]] * 4}, "landmarks must be 5 points"),
        ({"box_landmarks": "eyes"}, "box_landmarks must be 5 points"),
        ({"box_landmarks": [["0.3", 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.75], [0.65, 0.75]]}, "box_landmarks must be"),
        ({"top_k": 2**31}, r"top_k must be in \[1, 10000\]"),
    ],
)
def test_detector_settings_with_a_key_missing_or_wrong_are_refused_by_name(edit, match):
    d = DetectorSpec().to_dict() | edit
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        DetectorSpec.from_dict(d)


def test_detector_settings_a_checkpoint_leaves_out_take_the_values_it_was_made_with():
    omitted = {k: v for k, v in DetectorSpec().to_dict().items() if k not in UNRECORDED_DETECTOR_SETTINGS}
    assert DetectorSpec.from_dict(omitted) == DetectorSpec()  # the defaults are those values
    recorded = DetectorSpec.from_dict(omitted | {"top_k": 7})
    assert recorded.top_k == 7 and recorded.crop_side == 512


def test_the_detector_spec_says_which_pictures_may_be_face_crops():
    """A face-sized picture with no face is taken whole as one; with crop_side below its size it
    is a picture without a face."""
    rgb = np.asarray(background((400, 300), random.Random(3)))
    (whole,) = find_faces(rgb, 1.0, SERVING.chip, SERVING.detector, FaceRules())
    assert whole.how == "whole_image"
    expected = cut_chip(rgb, np.array(SERVING.detector.box_landmarks) * (400, 300), SERVING.chip)
    assert np.array_equal(whole.chip, expected)
    not_a_crop = DetectorSpec(crop_side=399)
    assert find_faces(rgb, 1.0, SERVING.chip, not_a_crop, FaceRules()) == []


@pytest.mark.parametrize(("width", "height"), [(5000, 1), (2000, 20), (1000, 30), (800, 40), (700, 20)])
def test_a_banner_gets_no_face_and_no_impossible_box(width, height):
    """YuNet on an input under 32 px high returns stale rows (scores near 1, boxes of inf)."""
    rng = np.random.default_rng(0)
    banner = (np.linspace(0, 255, width)[None, :, None] + rng.integers(0, 40, (height, width, 3))).clip(0, 255)
    banner = banner.astype(np.uint8)
    for _ in range(5):
        detect(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8), DetectorSpec())  # an ordinary pass first
        found = detect(banner, DetectorSpec())
        centre_x, centre_y = found[:, 0] + found[:, 2] / 2, found[:, 1] + found[:, 3] / 2
        assert np.isfinite(found).all() and ((centre_x >= 0) & (centre_x <= width)).all(), found
        assert ((centre_y >= 0) & (centre_y <= height)).all(), found
        with pytest.raises(ImageError, match="no face found"):
            decode_faces(png_bytes(Image.fromarray(banner)), SERVING)


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()
