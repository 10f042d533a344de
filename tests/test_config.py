import os
import re
from pathlib import Path

import pytest
import yaml

import model
from tests.conftest import ROOT
from watcher import config as configuration
from watcher.config import ConfigError, check_service_paths


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_config_yaml_documents_the_defaults():
    shipped = configuration.load(ROOT / "config.yaml")
    defaults = configuration.load(None)
    for key in ("batch", "intake", "rotation", "reload", "logging"):
        assert getattr(shipped, key) == getattr(defaults, key), key
    assert shipped.checkpoint == model.DEFAULT_CHECKPOINT.resolve()
    text = (ROOT / "config.yaml").read_text()
    for key, value in configuration.DEFAULTS.items():
        assert f"\n{key}:" in text, f"config.yaml does not document {key}"
        if isinstance(value, dict):
            for sub in value:
                assert f"\n  {sub}:" in text, f"config.yaml does not document {key}.{sub}"


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    cfg = configuration.load(write(tmp_path, "inbox: in\nresults: r/p.json\n"))
    assert cfg.inbox == tmp_path / "in" and cfg.results == tmp_path / "r" / "p.json"


def test_a_checkpoint_symlink_is_kept_as_a_symlink(tmp_path):
    (tmp_path / "v1.pt").write_bytes(b"x")
    os.symlink("v1.pt", tmp_path / "current.pt")
    cfg = configuration.load(write(tmp_path, "checkpoint: ./models/../current.pt\n"))
    assert cfg.checkpoint == tmp_path / "current.pt"  # repointing it is a new checkpoint to reload


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("inbx: x\n", "inbx"),
        ("batch: {max_size: 0}\n", "batch.max_size"),
        ("batch: {max_size: 1.5}\n", "batch.max_size"),
        ("batch: {max_size: true}\n", "batch.max_size"),
        ("batch: 3\n", "batch"),
        ("intake: {settle_seconds: -1}\n", "intake.settle_seconds"),
        ("intake: {rescan_seconds: 0}\n", "intake.rescan_seconds"),  # would make the main loop spin
        ("reload: {poll_seconds: 0}\n", "reload.poll_seconds"),
        ("logging: {level: loud}\n", "logging.level"),
        ("rotation: {max_bytes: 1, keep: 3}\n", "rotation.keep"),
        ("inbox: 5\n", "inbox"),
        ("batch: {decode_seconds: .nan}\n", "batch.decode_seconds"),  # a deadline that never fires
        ("intake: {settle_seconds: .inf}\n", "intake.settle_seconds"),
        ("batch: {decode_memory_mb: 100}\n", "batch.decode_memory_mb"),  # less than a decode process needs idle
        ("batch: {decode_memory_mb: 10000000000000}\n", "batch.decode_memory_mb"),  # past the kernel's limit
        ("batch: {torch_threads: 100000}\n", "batch.torch_threads"),
        ("batch: {decode_processes: 100000}\n", "batch.decode_processes"),
        ('inbox: "in\\0box"\n', "inbox"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        configuration.load(write(tmp_path, text))


def test_a_number_that_yaml_reads_as_text_gets_a_hint(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("found '1e1' (YAML reads a number like 1e3 as text")):
        configuration.load(write(tmp_path, "batch: {decode_seconds: 1e1}\n"))
    assert configuration.load(write(tmp_path, "batch: {decode_seconds: 1.0e+1}\n")).batch.decode_seconds == 10


def test_a_negative_value_where_zero_is_allowed_says_so(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("'intake.settle_seconds' must not be negative")):
        configuration.load(write(tmp_path, "intake: {settle_seconds: -1}\n"))


def test_not_yaml_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        configuration.load(write(tmp_path, "a: [\n"))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("inbox: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        configuration.load(latin1)
    with pytest.raises(ConfigError, match="mapping"):
        configuration.load(write(tmp_path, "- 1\n"))


def test_service_paths_must_exist_and_be_writable(tmp_path, tiny_checkpoint):
    cfg = configuration.load(write(tmp_path, f"checkpoint: {tiny_checkpoint}\n"))
    with pytest.raises(ConfigError, match=r"'inbox' folder .* does not exist"):
        check_service_paths(cfg)
    for name in ("inbox", "done", "failed", "results"):
        (tmp_path / name).mkdir()
    check_service_paths(cfg)
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "done").chmod(0o500)
        with pytest.raises(ConfigError, match=r"'done' folder .* not writable"):
            check_service_paths(cfg)


def test_a_section_with_every_key_commented_out_takes_the_defaults(tmp_path):
    cfg = configuration.load(write(tmp_path, "reload:\n  # poll_seconds: 30.0\n"))
    assert cfg.reload == configuration.ReloadSettings()


@pytest.mark.parametrize(
    "text",
    [
        "done: inbox\n",
        "results: inbox/r.json\n",
        "journal: inbox/j.jsonl\n",
        # a sub-folder too: an uploader can rename it and leave a symlink to anywhere in its place
        "done: inbox/done\n",
        "failed: inbox/failed\n",
        "results: inbox/done/r.json\n",
    ],
)
def test_outputs_in_the_inbox_are_refused(tmp_path, tiny_checkpoint, text):
    for name in ("inbox", "done", "failed", "results", "inbox/done", "inbox/failed"):
        (tmp_path / name).mkdir(exist_ok=True)
    cfg = configuration.load(write(tmp_path, f"checkpoint: {tiny_checkpoint}\n{text}"))
    with pytest.raises(ConfigError, match="the inbox"):
        check_service_paths(cfg)


def test_done_on_another_filesystem_is_refused(tmp_path, tiny_checkpoint):
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem to test with")
    done = Path(os.path.realpath(other)) / f"gw-test-{os.getpid()}"
    done.mkdir()
    try:
        for name in ("inbox", "failed", "results"):
            (tmp_path / name).mkdir()
        cfg = configuration.load(write(tmp_path, yaml.safe_dump({"done": str(done), "checkpoint": str(tiny_checkpoint)})))
        with pytest.raises(ConfigError, match=r"'done' .* another filesystem"):
            check_service_paths(cfg)
    finally:
        done.rmdir()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("results: results\n", r"'results' \(.*results\) is a folder"),
        ("journal: results\n", r"'journal' \(.*results\) is a folder"),
        ("journal: results/same.json\nresults: results/same.json\n", "are the same file"),
        ("failed: done\n", "'done' and 'failed' are the same folder"),
    ],
)
def test_each_output_is_its_own_and_of_its_kind(tmp_path, tiny_checkpoint, text, message):
    for name in ("inbox", "done", "failed", "results"):
        (tmp_path / name).mkdir()
    cfg = configuration.load(write(tmp_path, f"checkpoint: {tiny_checkpoint}\n{text}"))
    with pytest.raises(ConfigError, match=message):
        check_service_paths(cfg)


def test_a_checkpoint_in_the_inbox_is_refused(tmp_path, tiny_checkpoint):
    for name in ("inbox", "done", "failed", "results"):
        (tmp_path / name).mkdir()
    (tmp_path / "inbox" / "model.pt").write_bytes(tiny_checkpoint.read_bytes())
    cfg = configuration.load(write(tmp_path, "checkpoint: inbox/model.pt\n"))
    with pytest.raises(ConfigError, match=r"'checkpoint' .* is inside the inbox"):
        check_service_paths(cfg)
