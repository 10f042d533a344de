"""gender-watcher command line.

    python -m watcher [--config FILE]                       run the inbox service
    python -m watcher --once DIR [--output FILE] [--details FILE] [--config FILE]   classify a folder once
    python -m watcher --once INBOX --move [--config FILE]     one pass of the service over its inbox

Exit status: 0 success; 1 some files could not be classified (--once); 2 usage, config or
checkpoint error; 3 stopped by an unexpected error (a full disk, a failed write or rename), logged
as "fatal".
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from watcher import config as configuration
from watcher import log

HELP_EPILOG = """examples:
  gender-watcher --config config.yaml                 run the inbox service
  gender-watcher --once photos/ --details faces.jsonl  classify a folder once
  gender-watcher --config config.yaml --once inbox --move   one pass of the service (cron)

exit status:
  0  success (--once: every file answered)
  1  --once: some files failed (each reported on stderr with its reason, "no face found" included)
  2  usage, config or checkpoint error, or a journal that cannot be read or lacks answers
  3  stopped by an unexpected error (a full disk, a failed write or rename), logged as "fatal"

Every config key is documented in config.yaml."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gender-watcher",
        description="Find every face in image files and tell female from male (also run as python -m watcher).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=HELP_EPILOG,
    )
    p.add_argument("--config", type=Path, help="YAML config (default: built-in defaults, paths relative to the current folder)")
    p.add_argument("--once", type=Path, metavar="DIR", help="classify every image file in DIR once and exit")
    p.add_argument(
        "--move",
        action="store_true",
        help="with --once: move files to done/ and failed/ and keep rolling results, as the service does",
    )
    p.add_argument("--output", type=Path, help="results file for --once without --move (default: ./process_results.json)")
    p.add_argument(
        "--details",
        type=Path,
        metavar="FILE",
        help="with --once: also write one JSON line per file with every face found (box, score, label, probability)",
    )
    args = p.parse_args(argv)
    if args.once is None:
        for name in ("move", "output", "details"):
            if getattr(args, name):
                p.error(f"--{name} goes with --once")
    elif args.move and (args.output is not None or args.details is not None):
        p.error(
            "--once --move keeps the configured rolling results and journal; --output is for --once alone, and so is --details"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (config := configuration.load_or_report(args.config)) is None:
        return 2
    log.setup(config.logging.level, config.logging.format)
    logger = log.get()
    # Imported here: they import torch (and PIL), which would make --help and config errors slow.
    from model.checkpoint import CheckpointError
    from watcher import once, pipeline, service, startup
    from watcher.results import JournalError

    try:
        if args.once is None:
            return service.Service(config).run()
        if args.move:
            if args.once.resolve() != config.inbox:
                print(f"error: --once --move works on the configured inbox ({config.inbox}), not {args.once}", file=sys.stderr)
                return 2
            with pipeline.decode_pool(config) as pool:
                return once.drain_inbox(config, pool)
        if not args.once.is_dir():
            print(f"error: {args.once} is not a folder", file=sys.stderr)
            return 2
        if not os.access(args.once, os.R_OK | os.X_OK):
            print(f"error: cannot read the folder {args.once} (permission denied)", file=sys.stderr)
            return 2
        output = args.output or Path("process_results.json")
        for target in filter(None, (output, args.details)):
            if problem := _unwritable(target):
                print(f"error: cannot write {target}: {problem}", file=sys.stderr)
                return 2
        with pipeline.decode_pool(config) as pool:
            return once.classify_folder(args.once, output, config, pool, details=args.details)
    except (configuration.ConfigError, CheckpointError, startup.StartupError, JournalError) as exc:
        logger.error("cannot_start", reason=str(exc))  # one message: the log goes to stderr too
        return 2
    except Exception as exc:
        logger.exception("fatal", reason=f"{type(exc).__name__}: {exc}")
        return 3


def _unwritable(target: Path) -> str | None:
    """Why --once could not write its output file `target`, or None."""
    if target.is_dir():
        return "it is a folder"
    if not target.parent.is_dir():
        return f"the folder {target.parent} does not exist"
    if not os.access(target.parent, os.W_OK | os.X_OK):
        return f"the folder {target.parent} is not writable"
    return None


if __name__ == "__main__":
    sys.exit(main())
