import io

from model import progress
from model.progress import Progress
from watcher import log


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_line_wipes_the_bar_and_the_bar_is_drawn_again_below_it(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    monkeypatch.setattr(Progress, "shown", None)
    log.setup("info", "json")
    bar = Progress(10, "classifying", min_total=1)
    bar.advance(3)
    log.get().warning("failed", file="a.jpg")
    bar.advance(7)
    written = screen.getvalue()
    first, after = written.split("\n")[:2]
    drawn, log_line = first.split("\x1b[K\r\x1b[K")  # the bar, wiped, then the log line on its own
    assert drawn.startswith("\rclassifying [") and "3/10" in drawn
    assert log_line.startswith("{") and '"event": "failed"' in log_line
    assert after.startswith("classifying [") and "3/10" in after  # drawn again below it
    assert "10/10" in written.rsplit("\r", 1)[1] and written.endswith("\n")  # then finished on its own line
    assert Progress.shown is None and progress.stderr_lines.pending == ""


def test_without_a_bar_log_lines_pass_unchanged(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    monkeypatch.setattr(Progress, "shown", None)
    log.setup("info", "json")
    log.get().info("once_start", files=2)
    assert screen.getvalue().startswith('{"files": 2') and screen.getvalue().count("\n") == 1
