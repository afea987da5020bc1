"""Workflow entry point: ``python scripts/run_stage.py STAGE --arg value ...``.

STAGE is a function of bitsweep.stages (download_model, quantize, evaluate_variant, ...); its arguments are
that function's parameters (``python scripts/run_stage.py quantize --help``).
"""

import sys

from bitsweep.cli import run_named

if __name__ == "__main__":
    run_named(sys.argv[1:])
