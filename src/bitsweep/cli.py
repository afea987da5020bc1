"""Command lines for the stage functions, built from their signatures.

``run(stages.quantize)`` gives ``--src PATH --scheme JSON --settings JSON --out PATH [--imatrix PATH]``:
Path parameters take paths, config dataclasses and dicts take JSON (what Snakemake passes as params).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import sys
import time
import traceback
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bitsweep.errors import BitsweepError
from bitsweep.manifest import failure_record_path, write_json
from bitsweep.typed import from_dict

_IMPORTED = time.perf_counter()  # a job's wall clock starts here (scripts/run_stage.py imports this first)


def _parser_for(hint: Any) -> Callable[[str], Any]:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return lambda text: from_dict(hint, json.loads(text), hint.__name__)
    if hint is dict or typing.get_origin(hint) is dict:
        return json.loads
    if hint is bool:
        raise TypeError("stage parameters are never bool: argparse would read 'False' as true")
    return hint  # Path, str, int, float


def build_parser(stage: Callable[..., Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=stage.__name__, description=(stage.__doc__ or "").strip())
    hints = typing.get_type_hints(stage)
    for name, param in inspect.signature(stage).parameters.items():
        hint = hints[name]
        optional = param.default is not inspect.Parameter.empty
        many = typing.get_origin(hint) is list
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_parser_for(typing.get_args(hint)[0] if many else hint),
            nargs="*" if many else None,
            required=not optional,
            default=param.default if optional else None,
            help=str(hint),
        )
    return parser


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# A variant's stages leave ``<output>.failed.json`` when they fail (what failed and why, for the report) and
# remove it when they succeed: the record sits beside the output, so no rule has to know about it.
FAILURE_RECORDED = {"quantize": "out", "evaluate_variant": "out_json", "evaluate_reference": "out_json"}


def run(stage: Callable[..., Any], argv: list[str] | None = None) -> Any:
    """Parse ``argv`` for ``stage`` and call it; a BitsweepError ends the process with its one-line message."""
    setup_logging()
    record = None
    try:
        args = build_parser(stage).parse_args(argv)
        output = getattr(args, FAILURE_RECORDED.get(stage.__name__, ""), None)
        record = failure_record_path(output) if output else None
        result = stage(**vars(args))
    except BitsweepError as err:
        logging.getLogger("bitsweep").error("%s", err)
        print(f"bitsweep: {type(err).__name__}: {err}", file=sys.stderr)
        _write_failure(record, stage.__name__, err)
        sys.exit(1)
    except Exception as err:
        _write_failure(record, stage.__name__, err)
        raise
    if record:
        record.unlink(missing_ok=True)
    return result


def _write_failure(record: Path | None, stage: str, err: BaseException) -> None:
    if not record:
        return
    message = f"{type(err).__name__}: {err}".strip().splitlines()
    write_json(record, {
        "stage": stage,
        "error": message[0][:500] if message else type(err).__name__,
        "traceback": traceback.format_exception(err)[-6:],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })  # fmt: skip


def run_named(argv: list[str]) -> Any:
    """``STAGE --arg value ...`` for any public function of bitsweep.stages."""
    from bitsweep import stages

    names = sorted(n for n, f in vars(stages).items() if inspect.isfunction(f) and f.__module__ == stages.__name__
                   and not n.startswith("_"))  # fmt: skip
    if not argv or argv[0] not in names:
        print(f"usage: run_stage.py STAGE [--help]; stages: {', '.join(names)}", file=sys.stderr)
        sys.exit(2)
    from bitsweep.quiet import job
    from bitsweep.usage import usage_line

    try:
        with job():  # evaluations time generation with the machine to themselves (bitsweep.quiet)
            return run(getattr(stages, argv[0]), argv[1:])
    finally:
        print(usage_line(time.perf_counter() - _IMPORTED), file=sys.stderr, flush=True)
