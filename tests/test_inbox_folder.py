"""The inbox folder itself: deleted and made again, renamed away, missing for a while, missing at
start. The service re-arms its watch and waits; it never exits for it."""

import os
import shutil
import time

import pytest

from bench.harness import ServiceProcess, drop
from tests.conftest import image_bytes

IMG = image_bytes()
QUICK = 5  # seconds: far below the 30 s between full listings, so only the watch or the missing-inbox check can be this fast


@pytest.fixture
def service(tmp_path, tiny_checkpoint):
    svc = ServiceProcess(tmp_path, tiny_checkpoint, intake={"rescan_seconds": 30.0})
    yield svc
    svc.close()


def test_an_inbox_deleted_and_made_again_is_watched_again(service):
    service.start()
    drop(service.inbox, "before.jpg", IMG)
    service.wait_handled(1)
    shutil.rmtree(service.inbox)
    service.inbox.mkdir()
    service.wait_for(lambda: service.events("inbox_replaced") or service.events("inbox_back"), QUICK, "the new inbox noticed")
    drop(service.inbox, "after.jpg", IMG)
    service.wait_handled(2, timeout=QUICK)
    assert sorted(os.listdir(service.done)) == ["after.jpg", "before.jpg"]
    assert service.stop() == 0


def test_an_inbox_renamed_away_and_replaced_is_watched_again(service, tmp_path):
    service.start()
    os.rename(service.inbox, tmp_path / "old-inbox")
    service.inbox.mkdir()
    drop(service.inbox, "new.jpg", IMG)
    service.wait_handled(1, timeout=QUICK)
    drop(tmp_path / "old-inbox", "old.jpg", IMG)  # the folder renamed away is no longer the inbox
    time.sleep(1)
    assert os.listdir(service.done) == ["new.jpg"] and os.listdir(tmp_path / "old-inbox") == ["old.jpg"]
    assert service.stop() == 0


def test_a_missing_inbox_is_waited_for_and_not_fatal(service):
    service.start()
    shutil.rmtree(service.inbox)
    service.wait_for(lambda: service.events("inbox_missing"), QUICK, "inbox_missing")
    time.sleep(2)  # several looks at the missing folder: still running
    assert service.proc.poll() is None and len(service.events("inbox_missing")) == 1
    service.inbox.mkdir()
    drop(service.inbox, "back.jpg", IMG)
    service.wait_handled(1, timeout=QUICK)
    assert service.events("inbox_back")
    assert service.stop() == 0


def test_an_inbox_missing_at_start_is_waited_for(service):
    shutil.rmtree(service.inbox)
    service.start()
    assert service.events("inbox_missing")
    service.inbox.mkdir()
    drop(service.inbox, "late.jpg", IMG)
    service.wait_handled(1, timeout=QUICK)
    assert service.stop() == 0
