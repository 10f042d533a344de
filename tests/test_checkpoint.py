import os
import pickle
import stat
import zipfile

import pytest
import torch

from model import checkpoint as ckpt
from model.faces import OUTSIDE, UNRECORDED_DETECTOR_SETTINGS, ChipSpec, DetectorSpec, FaceRules
from model.network import ConvReLU, GenderNet
from model.preprocess import InputSpec
from tests.conftest import TINY_ARCH, TINY_CHIP, TINY_SPEC, make_tiny_checkpoint


def test_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    torch.manual_seed(1)
    model = GenderNet(**TINY_ARCH)
    model(torch.randn(16, 3, 32, 32) * 3 + 1)  # training mode: batch norms learn non-trivial statistics
    model.eval()
    meta = {"data": "x", "test_accuracy": {"all": 0.9}}
    version = ckpt.save(path, model, TINY_ARCH, TINY_SPEC, ["female", "male"], meta, TINY_CHIP, DetectorSpec())
    loaded = ckpt.load(path, "float32")
    assert loaded.version == version and loaded.spec == TINY_SPEC and loaded.class_names == ["female", "male"]
    assert loaded.meta["test_accuracy"] == {"all": 0.9}
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.ReLU)) for m in loaded.model.modules())  # fused
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
        assert torch.allclose(expected, loaded.model(x), atol=1e-5)
        ConvReLU.fused = not ConvReLU.fused  # the other path: plain conv then ReLU, or the oneDNN call
        try:
            assert torch.allclose(expected, loaded.model(x), atol=1e-5)
        finally:
            ConvReLU.fused = not ConvReLU.fused
        in_bfloat16 = ckpt.load(path, "bfloat16")
        assert in_bfloat16.dtype == torch.bfloat16
        assert torch.allclose(expected, in_bfloat16.model(x.to(torch.bfloat16)).float(), atol=0.05)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_version_changes_with_weights(tmp_path):
    assert (
        make_tiny_checkpoint(tmp_path / "a.pt", seed=1).split("-")[-1]
        != make_tiny_checkpoint(tmp_path / "b.pt", seed=2).split("-")[-1]
    )


def _payload(path):
    return torch.load(path, weights_only=True)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.pt"
    make_tiny_checkpoint(path)
    return path


def _refused(path, match):
    with pytest.raises(ckpt.CheckpointError, match=match) as info:
        ckpt.load(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    _refused(tmp_path / "nope.pt", "not found")


def test_truncated(good):
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    _refused(good, "cannot be read")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    path.write_text("hello")
    _refused(path, "cannot be read")
    torch.save([1, 2, 3], path)
    _refused(path, "expected a dict")


def test_missing_and_wrong_keys(good):
    payload = _payload(good)
    del payload["class_names"]
    torch.save(payload, good)
    _refused(good, r"missing keys \['class_names'\]")


def test_wrong_format_and_arch(good):
    payload = _payload(good)
    torch.save(payload | {"format": "other/9"}, good)
    _refused(good, "format")
    torch.save(payload | {"arch": "ResNet9000"}, good)
    _refused(good, "unknown architecture")


def test_values_of_the_wrong_type(good):
    payload = _payload(good)
    torch.save(payload | {"arch": ["GenderNet"]}, good)
    _refused(good, "unknown architecture")
    torch.save(payload | {"state_dict": payload["state_dict"] | {"extra": 3}}, good)
    _refused(good, "not a dict of tensors")
    torch.save(payload | {"meta": [1, 2]}, good)
    _refused(good, "meta must be a dict")


def test_weights_of_another_shape(good):
    payload = _payload(good)
    payload["arch_args"] = {"stem_width": 4, "widths": [8, 16]}
    torch.save(payload, good)
    _refused(good, "do not fit")


def _save_rehashed(payload, path):
    """As a hostile or buggy writer would: the version's hash recomputed for the edited weights."""
    described = {key: payload[key] for key in ("input", "chip", "detector")}
    payload["version"] = "edited-" + ckpt.content_hash(payload["state_dict"], described)
    torch.save(payload, path)


def test_nan_weights(good):
    payload = _payload(good)
    name = next(k for k in payload["state_dict"] if k.endswith("weight"))
    payload["state_dict"][name][...] = float("nan")
    _save_rehashed(payload, good)
    _refused(good, "non-finite")


def test_weights_that_turn_non_finite_as_served_are_refused(good):
    """Left to the fused ReLUs, these give every image the same finite answer."""
    payload = _payload(good)
    var = next(k for k in payload["state_dict"] if k.endswith("running_var"))
    payload["state_dict"][var][0] = -1.0  # folding the batch norm takes its square root
    _save_rehashed(payload, good)
    _refused(good, "non-finite weights")


def test_weights_of_another_dtype_are_refused(good):
    payload = _payload(good)
    for dtype in (torch.float64, torch.bfloat16):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        torch.save(payload | {"state_dict": state}, good)
        _refused(good, "expected .* torch.float32")


def test_a_hostile_state_dict_is_refused_before_its_tensors_are_read(good):
    payload = _payload(good)
    huge = torch.zeros(1).expand(10**12)  # four terabytes as float32, eight bytes on disk
    torch.save(payload | {"state_dict": payload["state_dict"] | {"extra": huge}}, good)
    _refused(good, r"unexpected \['extra'\]")
    torch.save(payload | {"state_dict": payload["state_dict"] | {3: torch.zeros(1)}}, good)
    _refused(good, "unexpected")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"arch_args": {"stem_width": -1, "widths": [8]}}, "bad architecture arguments"),
        ({"arch_args": {"stem_width": 10**5, "widths": [10**5]}}, "do not fit"),  # 360 GB, never allocated
        ({"arch_args": [4]}, "bad architecture arguments"),
        ({"input": torch.zeros(3)}, "bad input spec"),
        ({"input": {"height": 32, "width": 32, "mean": [0.5] * 3, "std": []}}, "implausible input spec"),
        ({"input": {"height": 32, "width": 32, "mean": [0.5] * 2, "std": [0.2] * 3}}, "implausible input spec"),
        ({"input": {"height": 32, "width": 32, "mean": [0.5] * 3, "std": [float("nan")] * 3}}, "implausible input spec"),
        ({"input": {"height": 32, "width": 32, "mean": [float("inf")] * 3, "std": [0.2] * 3}}, "implausible input spec"),
        ({"class_names": ["male", "male"]}, "two different names"),
    ],
)
def test_bad_specs_are_refused_with_what_is_wrong(good, edit, match):
    torch.save(_payload(good) | edit, good)
    _refused(good, match)


def test_a_network_too_deep_for_its_input_fails_its_canary(tmp_path):
    path = tmp_path / "model.pt"
    model = GenderNet(stem_width=4, widths=[8, 8, 8, 8]).eval()  # three 2x2 pools: an 8x8 input is too small
    arch, spec = {"stem_width": 4, "widths": [8, 8, 8, 8]}, InputSpec(8, 8, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="canary forward pass failed"):
        ckpt.save(path, model, arch, spec, ["f", "m"], {}, ChipSpec(8, 8), DetectorSpec())
    state = model.state_dict()
    payload = {"format": ckpt.FORMAT, "arch": "GenderNet", "arch_args": arch, "input": spec.to_dict()}
    payload |= {"chip": ChipSpec(8, 8).to_dict(), "detector": DetectorSpec().to_dict()}
    _save_rehashed(payload | {"class_names": ["f", "m"], "state_dict": state, "meta": {}}, path)
    _refused(path, "canary forward pass failed")


def test_a_constant_model_fails_its_canary(good):
    payload = _payload(good)
    for name, value in payload["state_dict"].items():
        if name.startswith("features") and name.endswith("weight"):
            value.zero_()
    _save_rehashed(payload, good)
    _refused(good, "same output")


def test_save_refuses_what_load_would_refuse_and_keeps_the_good_file(good):
    before = good.read_bytes()
    model = GenderNet(**TINY_ARCH).eval()
    with torch.no_grad():
        model.head[-1].bias[0] = float("nan")  # as a diverged training run leaves it
    with pytest.raises(ValueError, match=r"would not load.*non-finite"):
        ckpt.save(good, model, TINY_ARCH, TINY_SPEC, ["female", "male"], {}, TINY_CHIP, DetectorSpec())
    assert good.read_bytes() == before


def test_edited_weights_fail_the_hash(good):
    payload = _payload(good)
    name = next(k for k in payload["state_dict"] if k.endswith("weight"))
    payload["state_dict"][name] += 0.01
    torch.save(payload, good)
    _refused(good, "hash")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {MARKER}",))


MARKER = None


def test_pickle_that_runs_code_is_never_executed(tmp_path):
    global MARKER
    MARKER = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:  # torch's zip layout with a malicious data.pkl
        z.writestr("evil/data.pkl", pickle.dumps({"state_dict": _Exploit()}, protocol=2))
        z.writestr("evil/version", "3\n")
    _refused(path, "cannot be read")
    path.write_bytes(pickle.dumps(_Exploit(), protocol=2))
    _refused(path, "cannot be read")
    assert not MARKER.exists()


def test_the_chip_geometry_and_detector_are_part_of_the_checkpoint(good):
    payload = _payload(good)
    edited = payload | {"chip": payload["chip"] | {"landmarks": [[x, y * 0.9] for x, y in payload["chip"]["landmarks"]]}}
    torch.save(edited, good)
    _refused(good, "do not match the hash")  # a chip edited after training
    _save_rehashed(payload | {"chip": ChipSpec(48, 48).to_dict()}, good)
    _refused(good, "chip is 48x48 but the model's input is 32x32")
    _save_rehashed(payload | {"chip": payload["chip"] | {"landmarks": [[0.5, 0.5]] * 4}}, good)
    _refused(good, "bad chip geometry")
    for fill in ([128, 300, 128], 128, [128.0, 128, 128]):
        _save_rehashed(payload | {"chip": payload["chip"] | {"fill": fill}}, good)
        _refused(good, "fill must be 3 integers")
    _save_rehashed(payload | {"detector": DetectorSpec(sha256="0" * 64).to_dict()}, good)
    _refused(good, "not the one the checkpoint was trained with")
    _save_rehashed(payload | {"detector": {"name": "other"} | {"unknown": 1}}, good)
    _refused(good, "bad detector settings")
    torch.save(payload | {"format": "gender-watcher/1"}, good)
    _refused(good, "trained on centre crops, not face chips: retrain it")


def test_a_checkpoint_loads_with_its_own_preprocessing(good):
    loaded = ckpt.load(good)
    assert loaded.chip == ChipSpec(32, 32) and loaded.detector == DetectorSpec()
    assert loaded.preprocessing(FaceRules(max_faces=3)).rules.max_faces == 3
    payload = _payload(good)
    _save_rehashed(payload | {"chip": payload["chip"] | {"fill": [0, 10, 20]}}, good)
    assert ckpt.load(good).chip.fill == (0, 10, 20)


def test_a_chip_that_does_not_record_its_fill_was_cut_on_the_default_grey(good):
    payload = _payload(good)
    _save_rehashed(payload | {"chip": {k: v for k, v in payload["chip"].items() if k != "fill"}}, good)
    assert ckpt.load(good).chip.fill == OUTSIDE


def test_a_detector_without_the_settings_recorded_later_loads_with_the_values_it_was_made_with(good):
    payload = _payload(good)
    early = {k: v for k, v in payload["detector"].items() if k not in UNRECORDED_DETECTOR_SETTINGS}
    _save_rehashed(payload | {"detector": early}, good)
    assert ckpt.load(good).detector == DetectorSpec()


def test_a_fifo_or_a_folder_at_the_checkpoint_path_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    _refused(fifo, "is a FIFO, not a regular file")  # returns at once: nobody ever writes to it
    _refused(tmp_path, "is a folder")


def test_a_checkpoint_that_would_unpack_to_gigabytes_is_refused_before_unpacking(good, tmp_path):
    """The shipped layout re-zipped with deflate plus a large zero tensor: a small file that
    torch.load would inflate in memory."""
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as original, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        for entry in original.infolist():
            z.writestr(entry.filename, original.read(entry))
        z.writestr(f"{original.namelist()[0].split('/')[0]}/data/999", bytes(300 * 1024 * 1024))
    assert bomb.stat().st_size < 2 * 1024 * 1024
    _refused(bomb, "would unpack to")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"sha256": None}, r"missing \['sha256'\]"),  # else the bundled detector's hash would be taken
        ({"score_threshold": 2.0}, r"score_threshold must be in \[0.0, 1.0\], found 2.0"),
        ({"close_side": "320"}, "close_side must be an integer"),
    ],
)
def test_a_bad_detector_setting_is_refused_naming_the_file_and_the_key(good, edit, match):
    payload = _payload(good)
    detector = {k: v for k, v in (payload["detector"] | edit).items() if v is not None}
    _save_rehashed(payload | {"detector": detector}, good)
    _refused(good, "bad detector settings .*" + match)


def test_read_payload_reads_any_checkpoint_safely_without_checking_it(good, tmp_path):
    payload = ckpt.read_payload(good)
    assert payload["class_names"] == ["female", "male"] and set(payload) == set(ckpt.REQUIRED_KEYS)
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {fifo}: is a FIFO"):
        ckpt.read_payload(fifo)  # torch.load would wait for a writer forever
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {text}: cannot be read.*not the zip archive"):
        ckpt.read_payload(text)


def test_a_checkpoint_is_written_with_the_usual_mode_and_the_umask_left_alone(tmp_path, monkeypatch):
    """0666 less the umask, as open() gives; the umask is never set, even for a moment, as other
    threads may be creating files."""
    real_umask = os.umask
    before = real_umask(0o027)
    try:

        def no_umask(mask):
            raise AssertionError("write_atomic set the umask")

        monkeypatch.setattr(os, "umask", no_umask)
        make_tiny_checkpoint(tmp_path / "m.pt")
        assert stat.S_IMODE((tmp_path / "m.pt").stat().st_mode) == 0o640
    finally:
        real_umask(before)
