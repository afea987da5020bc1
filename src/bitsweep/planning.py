"""Memory planning before any job: each stage's peak resident memory estimated from the model's parameter count,
checked against the memory a job may use, and handed to the scheduler as the job's ``mem_mb`` (so a SLURM job
asks for what it needs and a workstation never runs two jobs that cannot fit together).

A stage's peak is ``base_mb + bytes_per_param × n_params`` (:class:`Footprint`, in the capability data of the
format or backend that runs it), plus, for stages that score windows, the logits of one window
(``n_ctx × vocab × SCORING_BYTES_PER_LOGIT``). ``base_mb`` is the framework's import footprint (measured here:
torch+transformers 0.3 GB, OpenVINO+NNCF 0.36, Olive 0.57, MLX 0.49); ``bytes_per_param`` counts the copies of
the weights each stage holds at its peak, checked against the max RSS Snakemake's benchmark files record for
SmolLM2-135M (sampled, so a lower bound): ONNX export 2.9 GB, ORT quantization 3.1 GB, Olive 3.3 GB. They are
estimates to plan with, deliberately on the high side: a stage refused here would not have fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bitsweep.backends import backend_info
from bitsweep.backends.base import Footprint
from bitsweep.config import ExperimentConfig, ModelConfig

# A hub or local model is copied as it is; the packaged GGUF is dequantized to fp32 by transformers.
DOWNLOAD = {"hf": Footprint(400, 0.5), "local": Footprint(400, 0.5), "gguf_package": Footprint(700, 6.0)}
# torch fp32: the weights (4 B/param) once loaded; transformers' loader holds a second copy of a shard while it
# converts a bf16/fp16 checkpoint (one shard at a time), hence ~5 B/param at the peak of the reference.
REFERENCE = Footprint(700, 5.0)
# Checking a conversion holds the runtime's fp32 model beside torch's.
CHECK_EXTRA_BYTES_PER_PARAM = 4.0
# Per scored position: the runtime's fp32 logits, their float64 log-softmax and the reference's 16-bit row.
SCORING_BYTES_PER_LOGIT = 4 + 8 + 8 + 2


@dataclass(frozen=True)
class Estimate:
    model: str
    stage: (
        str  # rule-like name: download, reference, convert:<format>, quantize:<backend>, evaluate:<backend>
    )
    mb: int


def scoring_mb(model: ModelConfig, n_ctx: int) -> float:
    return n_ctx * (model.vocab_size or 0) * SCORING_BYTES_PER_LOGIT / 2**20


def estimates(exp: ExperimentConfig) -> list[Estimate]:
    """Every stage of every model whose parameter count is known (a model without one is not planned)."""
    out = []
    for model in exp.models:
        if not model.n_params:
            continue
        logits = scoring_mb(model, exp.eval.n_ctx)
        reference = REFERENCE.mb(model.n_params) + logits
        stages = {"download": DOWNLOAD[model.source.kind].mb(model.n_params), "reference": reference}
        for name in exp.formats_of(model.name):
            fmt = exp.conversions()[name][0]
            stages[f"convert:{name}"] = fmt.convert_footprint.mb(model.n_params)
            stages[f"check:{name}"] = reference + CHECK_EXTRA_BYTES_PER_PARAM * model.n_params / 2**20
        for backend in exp.backends_for(model.name):
            info = backend_info(backend)
            stages[f"quantize:{backend}"] = info.quantize_footprint.mb(model.n_params)
            stages[f"evaluate:{backend}"] = info.evaluate_footprint.mb(model.n_params) + logits
        out += [Estimate(model.name, stage, int(mb)) for stage, mb in stages.items()]
    return out


def stage_mb(exp: ExperimentConfig, model: str, stage: str, floor: int = 1000) -> int:
    """The ``mem_mb`` a job of ``stage`` for ``model`` asks for: the estimate, at least ``floor``."""
    for estimate in estimates(exp):
        if (estimate.model, estimate.stage) == (model, stage):
            return max(floor, estimate.mb)
    return floor


def machine_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


def over_limit(exp: ExperimentConfig, limit_mb: int) -> list[str]:
    """One line per model with a stage whose estimated peak exceeds ``limit_mb``: its largest such stage."""
    lines = []
    for model in exp.models:
        over = sorted(
            (e for e in estimates(exp) if e.model == model.name and e.mb > limit_mb), key=lambda e: -e.mb
        )
        if over:
            more = f" (and {len(over) - 1} more of its stages)" if len(over) > 1 else ""
            lines.append(f"model {model.name}: stage {over[0].stage} needs ~{over[0].mb / 1024:.1f} GB{more}, more "
                         f"than the {limit_mb / 1024:.1f} GB a job may use here (max_mem_mb)")  # fmt: skip
    return lines


def summary(exp: ExperimentConfig) -> list[str]:
    """Per model: parameters and its most demanding stage (what the dry run reports)."""
    lines = []
    for model in exp.models:
        mine = [e for e in estimates(exp) if e.model == model.name]
        if not mine:
            lines.append(f"{model.name}: parameter count unknown, memory not planned")
            continue
        worst = max(mine, key=lambda e: e.mb)
        lines.append(f"{model.name}: {model.n_params / 1e9:.2f} B parameters; peak ~{worst.mb / 1024:.1f} GB "
                     f"({worst.stage}); reference evaluation ~{next(e.mb for e in mine if e.stage == 'reference') / 1024:.1f} GB")  # fmt: skip
    return lines
