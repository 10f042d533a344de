"""python -m watcher.bulk SRC OUT: classify every file of a tree on Ray Data (see watcher.bulk)."""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from watcher import config as configuration
from watcher import log

HELP_EPILOG = """examples:
  python -m watcher.bulk photos/ results/                     a local Ray, one worker per CPU
  python -m watcher.bulk photos/ results/ --resume            add the files not in results/ yet
  python -m watcher.bulk s3://bucket/photos s3://bucket/answers --address auto   on a running cluster

OUT gets one row per face (a failed file: one row with its error), in part files and a
_SUCCESS summary, put in place when the run is done.

exit status:
  0  every file answered
  1  some files failed (each logged with its reason, "no face found" included)
  2  usage, config, source, output or checkpoint error; Ray not installed
  3  the engine failed (Ray stopped the run, or files came back without rows), or an unexpected error
  130  stopped by Ctrl-C or SIGTERM; OUT is left as it was"""

NO_RAY = "bulk mode needs Ray Data: pip install 'gender-watcher[ray]' (in a checkout: .venv/bin/pip install -e '.[ray]')"


def at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m watcher.bulk",
        description="Find every face in every file under SRC and tell female from male, on Ray Data; write the rows to OUT.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=HELP_EPILOG,
    )
    p.add_argument(
        "source", metavar="SRC", help="a folder, or a URI pyarrow opens (s3://bucket/prefix, ...); walked all the way down"
    )
    p.add_argument("output", metavar="OUT", help="the output folder or URI; must not hold output yet, unless --resume")
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default: the config's, else the shipped one)")
    p.add_argument("--config", type=Path, help="YAML config for face rules, batch size and decode limits (default: built-in)")
    p.add_argument("--workers", type=at_least(1), help="classifier actors, each with the model resident (default: one per CPU)")
    p.add_argument("--batch-size", type=at_least(1), help="files per batch (default: the config's batch.max_size, 64)")
    p.add_argument("--address", help="an existing Ray cluster ('auto', or HOST:PORT); default: start Ray here for the run")
    p.add_argument("--format", choices=("parquet", "jsonl"), default="parquet", help="part files' format (default: parquet)")
    p.add_argument("--resume", action="store_true", help="OUT holds earlier output: classify only the files not in it")
    p.add_argument("--object-store-mb", type=at_least(75), default=256, help="a local Ray's object store, MB (default: 256)")
    return p.parse_args(argv)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("ray") is None:
        print(f"error: {NO_RAY}", file=sys.stderr)
        return 2
    if (config := configuration.load_or_report(args.config)) is None:
        return 2
    log.setup(config.logging.level, config.logging.format)
    logger = log.get()
    from model.checkpoint import CheckpointError  # imported here: torch, Ray and pyarrow are slow to import
    from watcher.bulk import engine
    from watcher.bulk.sources import SourceError

    job = engine.BulkRun(
        args.source,
        args.output,
        config,
        args.checkpoint or config.checkpoint,
        args.workers,
        args.batch_size,
        args.address,
        args.format,
        args.resume,
        args.object_store_mb,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl-C, so that staged parts are removed
    try:
        summary = engine.run(job)
    except (SourceError, CheckpointError) as exc:
        logger.error("cannot_start", reason=str(exc))
        return 2
    except engine.EngineError as exc:
        logger.error("engine_failed", reason=str(exc))
        return 3
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the staged parts are removed, OUT is as it was
        logger.warning("stopped", output=args.output)
        return 130
    except Exception as exc:
        logger.exception("fatal", reason=f"{type(exc).__name__}: {exc}")
        return 3
    finally:
        engine.stop_ray()
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
