"""`dl-pipeline <command> --config FILE --set section.key=value ...`

Exit status: 0 success, 2 user error (one line on stderr, no traceback), 1 failure.
The same functions back the console script, ``jobs/*.py`` under spark-submit, and notebooks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

from dl_pipeline.config import Config, load_config
from dl_pipeline.errors import PipelineError, UserError
from dl_pipeline.logs import setup_logging

log = logging.getLogger("dl_pipeline")

COMMANDS = ("prepare", "train", "score", "report")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit(2) with usage, kept one line
        raise UserError(f"{self.prog}: {message}")


def build_parser(prog: str = "dl-pipeline", command: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Distributed deep-learning pipeline on Spark")
    if command is None:
        p.add_argument("command", choices=COMMANDS)
    p.add_argument("--config", "-c", help="YAML file with the keys that differ from the defaults (see conf/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, type-checked; repeatable")
    p.add_argument("--run-date", help="score: the date partition to (re)write, YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--resume", action="store_true", help="train: continue from the latest checkpoint in train.run_dir")
    p.add_argument("--quiet", "-q", action="store_true", help="log warnings only")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "run_date", None):
        overrides.append(f"score.run_date={args.run_date}")
    if getattr(args, "resume", False):
        overrides.append("train.resume=true")
    cfg = load_config(args.config, overrides)
    log.info("resolved config: %s", json.dumps(cfg.to_dict(), sort_keys=True))
    return cfg


def guarded(fn: Callable[[], object]) -> int:
    """Run ``fn`` and map exceptions to exit codes; user errors print one line."""
    try:
        fn()
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_command(command: str, cfg: Config) -> object:
    """Dispatch one pipeline stage: the single library call behind every entry point."""
    if command == "prepare":
        from dl_pipeline.prepare import prepare_dataset
        from dl_pipeline.spark import get_spark

        return prepare_dataset(get_spark(cfg.spark), cfg)
    if command == "train":
        from dl_pipeline.train.driver import train_model

        return train_model(cfg)
    if command == "score":
        from dl_pipeline.score import score_batch
        from dl_pipeline.spark import get_spark

        return score_batch(get_spark(cfg.spark), cfg)
    from dl_pipeline.report import report

    return report(cfg)


def main(argv: Sequence[str] | None = None, command: str | None = None, prog: str = "dl-pipeline") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body():
        args = build_parser(prog, command).parse_args(argv)
        setup_logging(logging.WARNING if args.quiet else logging.INFO)
        cfg = resolve_config(args)
        result = run_command(command or args.command, cfg)
        if isinstance(result, dict) and "text" in result:  # report: lines for people
            print(result["text"])
        elif isinstance(result, dict) and "summary" in result:
            print(json.dumps(result["summary"], sort_keys=True))

    return guarded(body)


if __name__ == "__main__":
    sys.exit(main())
