"""Smoke training run on generated images, and the data-folder errors."""

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from model import checkpoint as ckpt
from model.decode import open_upright
from model.faces import DetectorSpec, FaceRules
from model.network import GenderNet
from model.pool import DecodePool
from tests.conftest import TINY_ARCH, TINY_CHIP, TINY_SPEC, image_bytes, make_tiny_checkpoint
from train.__main__ import DevSet, initial_weights, parse_args
from train.__main__ import main as train_main
from train.data import TrainingError, find_labeled_images, groups_of, sampling_weights, source_of
from train.evaluate import evaluate_folder
from train.evaluate import main as evaluate_main
from train.metrics import equal_recall_threshold, format_summary, summarize, summarize_groups
from train.photos import main as photos_main
from train.report import draw_contact_sheet, nice_ticks, write_evaluation_report


def make_faces(root, per_class=80, seed=0):
    """Two visibly different classes: warm images with a circle, cool images with a square."""
    rng = random.Random(seed)
    for label, colour in (("female", (200, 80, 80)), ("male", (80, 80, 200))):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(per_class):
            jitter = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in colour)
            img = Image.new("RGB", (rng.randint(40, 90), rng.randint(50, 110)), jitter)
            draw = ImageDraw.Draw(img)
            box = (10, 10, img.width - 10, img.height - 10)
            (draw.ellipse if label == "female" else draw.rectangle)(box, outline=(255, 255, 255), width=4)
            img.save(folder / f"{label}_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_faces(root / "faces")
    (data / "male" / "broken.jpg").write_bytes(b"not an image")
    out = root / "out" / "smoke.pt"
    args = ["--data", str(data), "--out", str(out), "--epochs", "3", "--size", "32", "32", "--widths", "8", "16"]
    args += ["--stem-width", "8", "--batch-size", "32", "--dev", str(data), "--threads", "2"]
    assert train_main(args) == 0
    return root, data, out


def test_smoke_run_writes_a_loadable_checkpoint_and_report(trained):
    _, data, out = trained
    loaded = ckpt.load(out)
    assert loaded.class_names == ["female", "male"] and loaded.spec.height == 32
    report = out.with_name("smoke-report")
    for name in ("summary.json", "summary.md", "curves.png", "confusion.png"):
        assert (report / name).is_file(), name
    summary = json.loads((report / "summary.json").read_text())
    assert summary["sizes"]["train"] + summary["sizes"]["val"] + summary["sizes"]["test"] == 160
    assert len(summary["skipped"]) == 1 and "broken.jpg" in summary["skipped"][0]
    assert len(summary["history"]) == 3 and 1 <= summary["best_epoch"] <= 3
    assert summary["command"].startswith("python -m train --data")
    assert set(summary["test"]) >= {"loss", "all", "female", "male"}  # per file-name source
    assert loaded.meta["test_accuracy"]["all"] == summary["test"]["all"]["accuracy"]
    assert [line.split(":")[0] for line in summary["dev"]["faces"]["unreadable"]] == [str(data / "male" / "broken.jpg")]
    assert Image.open(report / "curves.png").size[0] > 100
    assert all(set(h["dev_acc"]) == {"faces"} for h in summary["history"])  # the dev set drawn at every epoch
    last = summary["history"][summary["best_epoch"] - 1]["dev_acc"]["faces"]
    assert 0 <= last <= 1


def test_curve_ticks_are_round_and_span_the_values():
    assert nice_ticks(0.0775, 0.2505) == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert nice_ticks(0.9308, 0.9778) == [0.92, 0.94, 0.96, 0.98]
    flat = nice_ticks(0.5, 0.5)  # one value: a range around it, not a division by zero
    assert flat[0] < 0.5 < flat[-1]


def test_smoke_run_learns_the_easy_task(trained):
    _, _, out = trained
    assert ckpt.load(out).meta["dev_accuracy"]["faces"] > 0.8


def test_evaluate_prints_accuracy_and_confusion(trained, capsys):
    _, data, out = trained
    assert evaluate_main([str(data), "--checkpoint", str(out)]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "per class: female" in text and "confusion" in text and "broken.jpg" in text


def test_evaluate_report_lists_and_shows_the_mistakes_and_keeps_the_pictures_out_of_git(trained, tmp_path):
    _, data, out = trained
    swapped = tmp_path / "swapped"  # every label wrong: the files the model gets right become mistakes
    for label, other in (("female", "male"), ("male", "female")):
        shutil.copytree(data / label, swapped / other)
    report = tmp_path / "report"
    assert evaluate_main([str(swapped), "--checkpoint", str(out), "--report", str(report)]) == 0
    mistakes = [json.loads(line) for line in (report / "swapped-mistakes.jsonl").read_text().splitlines()]
    assert len(mistakes) > 100 and all(m["truth"] != m["answer"] for m in mistakes)
    assert all(m["box"] and len(m["box"]) == 4 for m in mistakes)
    assert Image.open(report / "swapped-confusion.png").size[0] > 100
    sheet = Image.open(report / "pictures" / "swapped-mistakes.jpg")
    assert sheet.size[0] > 500 and sheet.size[1] > 100
    assert (report / "pictures" / ".gitignore").read_text().splitlines()[-1] == "*"
    assert str(swapped) in (report / "summary.md").read_text()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_the_contact_sheet_shows_a_picture_whose_exif_block_is_damaged(tmp_path, fmt):
    picture = tmp_path / f"face.{fmt.lower()}"
    Image.new("RGB", (60, 40), (200, 100, 50)).save(picture, fmt, exif=b"Exif\x00\x00" + b"\x00" * 32, lossless=True)
    mistake = {"file": str(picture), "truth": "female", "answer": "male", "probability": 0.7, "box": [10, 5, 30, 30]}
    assert draw_contact_sheet([mistake], tmp_path / "sheet.png") == 1
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert (200, 100, 50) in {colour for _count, colour in sheet.convert("RGB").getcolors(1 << 16)}


def test_missing_or_empty_class_folder_is_a_clear_error(tmp_path):
    (tmp_path / "female").mkdir()
    (tmp_path / "female" / "a.jpg").write_bytes(b"x")
    with pytest.raises(TrainingError, match="male is missing"):
        find_labeled_images(tmp_path, ["female", "male"])
    (tmp_path / "male").mkdir()
    with pytest.raises(TrainingError, match="holds no images"):
        find_labeled_images(tmp_path, ["female", "male"])
    with pytest.raises(TrainingError, match="does not exist"):
        find_labeled_images(tmp_path / "nowhere", ["female", "male"])


def test_arguments_that_would_fail_after_training_are_refused_first(tmp_path, capsys):
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "m.pt")]
    (tmp_path / "one_class" / "female").mkdir(parents=True)
    (tmp_path / "one_class" / "female" / "a.jpg").write_bytes(image_bytes())
    for extra, said in [
        (["--dev", str(tmp_path / "nowhere")], "does not exist"),
        (["--dev", str(tmp_path / "one_class")], "male is missing"),
        (["--epochs", "0"], "at least 1"),
        (["--limit", "-5"], "--limit"),
        (["--test-fraction", "-0.1"], "--test-fraction"),
        (["--val-fraction", "0.6", "--test-fraction", "0.4"], "together below 1"),
        (["--lr", "-1"], "--lr must be a number above 0"),
        (["--lr", "nan"], "--lr must be a number above 0"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number of 0 or more"),
        (["--source-exponent", "nan"], "--source-exponent must be a finite number"),
        (["--widths", "0"], "at least 1"),
        (["--stem-width", "-3"], "at least 1"),
        (["--size", "8", "8"], "each side must be from 16 to 1024 for 4 stages"),
        (["--size", "1032", "64"], "each side must be from 16 to 1024"),
        (["--device", "bogus"], "--device bogus"),
        (["--threads", "100000000000000000000"], "--threads must be at most 1024"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(base + extra)
        assert said in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "afile" / "m.pt")])
    assert "not a writable folder" in capsys.readouterr().err
    (tmp_path / "m-report").write_text("x")
    with pytest.raises(SystemExit):
        parse_args(base)
    assert "its report folder" in capsys.readouterr().err


def test_a_class_without_readable_images_stops_training(tmp_path, capsys):
    for name in ("female", "male"):
        (tmp_path / name).mkdir()
    for i in range(4):
        (tmp_path / "female" / f"{i}.jpg").write_bytes(image_bytes(colour=(i * 40, 100, 100)))
        (tmp_path / "male" / f"{i}.jpg").write_bytes(b"not an image")
    assert train_main(["--data", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--batch-size", "2"]) == 1
    assert "error: no readable images of class male" in capsys.readouterr().err


def test_symlinked_training_images_are_read_through_their_targets(tmp_path):
    for name in ("female", "male"):
        (tmp_path / "real" / name).mkdir(parents=True)
        (tmp_path / "links" / name).mkdir(parents=True)
        (tmp_path / "real" / name / "a.jpg").write_bytes(image_bytes())
        os.symlink(tmp_path / "real" / name / "a.jpg", tmp_path / "links" / name / "a.jpg")
    items = find_labeled_images(tmp_path / "links", ["female", "male"])
    assert [p for p, _ in items] == [tmp_path / "real" / "female" / "a.jpg", tmp_path / "real" / "male" / "a.jpg"]


def test_dev_folders_of_the_same_name_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--out", "o.pt", "--dev", "a/test", "--dev", "b/test"])
    assert "repeat" in capsys.readouterr().err


def test_a_class_with_nothing_to_score_is_not_zero_percent():
    summary = summarize([0, 0, 0], [0, 0, 1], ["female", "male"])
    assert summary["per_class"] == {"female": 2 / 3, "male": None}
    assert "male n/a" in format_summary("x", summary, ["female", "male"])
    assert summarize([], [], ["female", "male"])["accuracy"] is None


def test_evaluate_fails_when_nothing_could_be_scored(trained, tmp_path, capsys):
    _, _, out = trained
    for name in ("female", "male"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(b"not an image")
    assert evaluate_main([str(tmp_path), "--checkpoint", str(out)]) == 1
    assert "no readable image" in capsys.readouterr().err


def test_save_refuses_meta_that_load_would_refuse(tmp_path):
    model = GenderNet(stem_width=4, widths=[8, 8])
    with pytest.raises(ValueError, match="would not load"):
        ckpt.save(tmp_path / "m.pt", model, TINY_ARCH, TINY_SPEC, ["f", "m"], {"data": tmp_path}, TINY_CHIP, DetectorSpec())
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize(("exponent", "big_share"), [(0.0, 1 / 2), (0.5, 2 / 3), (1.0, 4 / 5)])
def test_each_source_gets_its_share_of_an_epoch_and_each_class_half_of_it(exponent, big_share):
    # 400 unprefixed (CelebA-like) files, 300 female and 100 male, against 100 UTKFace ones
    paths = [Path(f"female/{i}.jpg") for i in range(300)] + [Path(f"male/{i}.jpg") for i in range(100)]
    paths += [Path(f"x/utk_30_{i % 2}_0_{i}.jpg") for i in range(100)]
    labels = [0] * 300 + [1] * 100 + [i % 2 for i in range(100)]
    weights = sampling_weights(paths, labels, exponent)
    big = [w for p, w in zip(paths, weights.tolist(), strict=True) if source_of(p) != source_of(paths[-1])]
    assert sum(big) == pytest.approx(big_share)
    assert sum(big[:300]) == pytest.approx(sum(big[300:]))  # the classes of a source: equal shares
    assert float(weights.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("name", "groups"),
    [
        ("utk_61_1_1_20170109.jpg", ["black", "age 60+"]),
        ("17_0_2_20170109.jpg.chip.jpg", ["asian", "age under 18"]),  # the UTKFace development set's names
        ("aaf_00543A10.jpg", ["age under 18"]),
        ("01070A18.jpg", ["age 18-29"]),
        ("aaf_12345A59.jpg", ["age 45-59"]),
        ("aaf_00001A29.jpg", ["age 18-29"]),
        ("01070A30.jpg", ["age 30-44"]),
        ("utk_44_0_3_20170109.jpg", ["indian", "age 30-44"]),
        ("utk_45_0_4_20170109.jpg", ["other", "age 45-59"]),
        ("utk_60_1_0_20170109.jpg", ["white", "age 60+"]),
        ("Aaron_Eckhart_0001.jpg", []),  # LFW's names
        ("imfdb_Suryakantham_12.jpg", ["Suryakantham"]),
        ("000123.jpg", []),
        ("scut_AF12.jpg", []),
    ],
)
def test_file_names_tell_race_actor_and_age_band(name, groups):
    assert groups_of(Path("female") / name) == groups


def test_accuracy_by_group_counts_a_file_in_each_of_its_groups():
    # three files: a young Black woman answered right, an older one answered wrong, an unanswered man
    groups = summarize_groups([0, 0, 1], [0, 1, None], [["black", "age 18-29"], ["black", "age 60+"], ["age 60+"]], ["f", "m"])
    assert sorted(groups) == ["age 18-29", "age 60+", "black"]
    assert groups["black"]["accuracy"] == 0.5 and groups["black"]["count"] == 2
    assert groups["age 60+"]["count"] == 2 and groups["age 60+"]["accuracy"] == 0.0
    assert groups["age 18-29"]["accuracy"] == 1.0


def test_equal_recall_threshold():
    # class 0 (female) scores spread to the right: at 0, recall is 2/4 for class 0 and 4/4 for class 1
    margins = [-3.0, -2.0, 0.5, 1.5, 2.0, 3.0, 4.0, 5.0]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    t = equal_recall_threshold(margins, labels)
    assert 1.5 < t < 2.0  # both recalls 4/4
    assert equal_recall_threshold([-1.0, 1.0], [0, 1]) == 0.0  # already equal: no shift


def test_a_diverging_run_stops_and_leaves_the_old_checkpoint(tmp_path, capsys):
    data = make_faces(tmp_path / "faces", per_class=40)
    out = tmp_path / "m.pt"
    out.write_bytes(b"the previous checkpoint")
    args = ["--data", str(data), "--out", str(out), "--epochs", "2", "--size", "32", "32", "--widths", "8", "16"]
    args += ["--stem-width", "8", "--batch-size", "16", "--threads", "1", "--lr", "1e30"]
    assert train_main(args) == 1
    assert "diverged in epoch 1" in capsys.readouterr().err
    assert out.read_bytes() == b"the previous checkpoint"


@pytest.mark.parametrize("module", ["train", "train.evaluate", "train.photos"])
def test_help_gives_defaults_examples_and_exit_codes(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "example" in proc.stdout and "exit status:" in proc.stdout
    assert "(default: None)" not in proc.stdout and "(default: [])" not in proc.stdout
    assert "(default: " in proc.stdout


@pytest.fixture
def start_from(tmp_path):
    path = tmp_path / "start.pt"
    make_tiny_checkpoint(path)
    return path


def test_init_takes_the_version_and_weights_of_a_fitting_checkpoint(start_from):
    payload = initial_weights(start_from, TINY_ARCH)
    assert payload["version"] == ckpt.load(start_from).version
    GenderNet(**TINY_ARCH).load_state_dict(payload["state_dict"])


def test_init_refuses_a_checkpoint_of_other_classes(start_from):
    payload = torch.load(start_from, weights_only=True)
    torch.save(payload | {"class_names": ["male", "female"]}, start_from)  # the same names, swapped
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint {start_from}: .*classes are \['male', 'female'\]"):
        initial_weights(start_from, TINY_ARCH)


def test_init_refuses_weights_that_are_not_finite(start_from):
    payload = torch.load(start_from, weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(payload, start_from)
    with pytest.raises(ckpt.CheckpointError, match=f"not finite numbers: {name}"):
        initial_weights(start_from, TINY_ARCH)


def test_init_names_the_first_weight_that_does_not_fit(start_from):
    payload = torch.load(start_from, weights_only=True)
    name = next(iter(payload["state_dict"]))
    want = tuple(payload["state_dict"][name].shape)
    payload["state_dict"][name] = torch.zeros(7)
    torch.save(payload, start_from)
    with pytest.raises(ckpt.CheckpointError) as info:
        initial_weights(start_from, TINY_ARCH)
    assert f"{name} is (7,) torch.float32, expected {want} torch.float32" in str(info.value)
    assert str(start_from) in str(info.value)


def test_init_reads_the_checkpoint_as_safely_as_loading_does(tmp_path, capsys):
    fifo = tmp_path / "start.pt"
    os.mkfifo(fifo)
    with pytest.raises(ckpt.CheckpointError, match="is a FIFO"):
        initial_weights(fifo, TINY_ARCH)  # torch.load would wait for a writer forever
    with pytest.raises(SystemExit):
        parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--init", str(fifo)])
    assert f"--init: checkpoint {fifo}: is a FIFO" in capsys.readouterr().err


def test_group_figures_leave_out_unreadable_files_as_the_overall_ones_do(tmp_path):
    """Three readable pictures of a group and one that is not an image: the group counts three,
    in evaluation as in the --dev sets of training; a picture without a face counts, as wrong."""
    faces = make_faces(tmp_path / "made", per_class=3)
    folder = tmp_path / "dev"
    for label in ("female", "male"):
        (folder / label).mkdir(parents=True)
    for i, made in enumerate(sorted((faces / "female").iterdir())):
        shutil.copy(made, folder / "female" / f"utk_30_1_1_{i}.jpg")
    Image.new("RGB", (200, 160), (128, 128, 128)).save(folder / "female" / "utk_30_1_1_flat.jpg")  # no face
    (folder / "female" / "utk_30_1_1_broken.jpg").write_bytes(b"not an image")
    shutil.copy(made, folder / "male" / "m.jpg")
    make_tiny_checkpoint(tmp_path / "tiny.pt")
    checkpoint = ckpt.load(tmp_path / "tiny.pt", "float32")
    with DecodePool(1) as pool:
        evaluated = evaluate_folder(folder, checkpoint, pool)
    dev_set = DevSet.load(folder, checkpoint.preprocessing(FaceRules()))
    scored, dev_groups = dev_set.score(checkpoint.model, checkpoint.spec, "float32")
    for overall, groups in ((evaluated, evaluated["groups"]), (scored, dev_groups)):
        assert overall["count"] == 5 and overall["unanswered"] == 1 and len(overall["unreadable"]) == 1
        assert (groups["black"]["count"], groups["black"]["unanswered"]) == (4, 1)
        assert groups["age 30-44"]["count"] == 4


def test_report_tables_have_a_column_for_every_class(tmp_path):
    names = ["a", "b", "c"]
    figures = summarize([0, 1, 2], [0, 2, 2], names)
    results = {"x": figures | {"mistakes": [], "unreadable": [], "groups": {"g": figures}}}
    write_evaluation_report(tmp_path, results, names, "m.pt", "v1")
    lines = (tmp_path / "summary.md").read_text().splitlines()
    tables = [(header, rule) for header, rule in itertools.pairwise(lines) if rule.startswith("|---")]
    assert len(tables) == 2
    for header, rule in tables:
        assert header.count("|") == rule.count("|"), (header, rule)


def test_photos_needs_a_picture_to_measure(tmp_path, capsys):
    with pytest.raises(SystemExit):
        photos_main([str(tmp_path), "--pictures", "0"])
    assert "--pictures must be at least 1" in capsys.readouterr().err


def test_photos_skip_and_list_a_file_that_cannot_be_read(tmp_path, start_from, capsys):
    for name in ("female", "male"):
        (tmp_path / "set" / name).mkdir(parents=True)
        (tmp_path / "set" / name / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "set" / "female" / "broken.jpg").write_bytes(b"hello")
    assert photos_main([str(tmp_path / "set"), "--checkpoint", str(start_from), "--pictures", "3"]) == 0
    out = capsys.readouterr().out
    assert "unreadable, skipped: " in out and "broken.jpg" in out and "pictures without a face given one" in out
    (tmp_path / "set" / "female" / "a.jpg").write_bytes(b"")
    (tmp_path / "set" / "male" / "a.jpg").write_bytes(b"")
    assert photos_main([str(tmp_path / "set"), "--checkpoint", str(start_from), "--pictures", "3"]) == 1
    assert "no readable image to paste" in capsys.readouterr().err


def test_evaluate_refuses_folders_of_one_name_and_a_folder_as_json(tmp_path, capsys):
    for folder in ("a/lfw", "b/lfw"):
        for name in ("female", "male"):
            (tmp_path / folder / name).mkdir(parents=True)
            (tmp_path / folder / name / "x.jpg").write_bytes(image_bytes())
    with pytest.raises(SystemExit):
        evaluate_main([str(tmp_path / "a/lfw"), str(tmp_path / "b/lfw")])
    assert "these repeat one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main([str(tmp_path / "a/lfw"), "--json", str(tmp_path)])
    assert "it is a folder" in capsys.readouterr().err


def test_pasted_faces_are_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees
    Image.new("RGB", (60, 40), (120, 80, 60)).save(tmp_path / "turned.jpg", exif=exif)
    assert open_upright(tmp_path / "turned.jpg").size == (40, 60)
