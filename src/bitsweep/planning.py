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


def scoring_mb(model: ModelConfig, n_ctx: int) -> float:
    return n_ctx * (model.vocab_size or 0) * SCORING_BYTES_PER_LOGIT / 2**20


def memory_plan(exp: ExperimentConfig) -> dict[str, dict[str, int]]:
    """Model -> stage -> estimated peak MB, for every model whose parameter count is known (a model without one
    is not planned). Stages are rule-like names: download, reference, convert:<format>, check:<format>,
    quantize:<backend>, evaluate:<backend>. Computed once per experiment; the rest of this module reads it."""
    conversions = exp.conversions()
    plan = {}
    for model in exp.models:
        if not model.n_params:
            continue
        logits = scoring_mb(model, exp.eval.n_ctx)
        reference = REFERENCE.mb(model.n_params) + logits
        stages = {"download": DOWNLOAD[model.source.kind].mb(model.n_params), "reference": reference}
        for name in exp.formats_of(model.name):
            stages[f"convert:{name}"] = conversions[name][0].convert_footprint.mb(model.n_params)
            stages[f"check:{name}"] = reference + CHECK_EXTRA_BYTES_PER_PARAM * model.n_params / 2**20
        for backend in exp.backends_for(model.name):
            info = backend_info(backend)
            stages[f"quantize:{backend}"] = info.quantize_footprint.mb(model.n_params)
            stages[f"evaluate:{backend}"] = info.evaluate_footprint.mb(model.n_params) + logits
        plan[model.name] = {stage: int(mb) for stage, mb in stages.items()}
    return plan


def stage_mb(plan: dict[str, dict[str, int]], model: str, stage: str, floor: int = 1000) -> int:
    """The ``mem_mb`` a job of ``stage`` for ``model`` asks for: the estimate, at least ``floor``."""
    return max(floor, plan.get(model, {}).get(stage, floor))


def machine_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


def over_limit(plan: dict[str, dict[str, int]], limit_mb: int) -> list[str]:
    """One line per model with a stage whose estimated peak exceeds ``limit_mb``: its largest such stage."""
    lines = []
    for model, stages in plan.items():
        over = sorted(((mb, stage) for stage, mb in stages.items() if mb > limit_mb), key=lambda o: -o[0])
        if over:
            more = f" (and {len(over) - 1} more of its stages)" if len(over) > 1 else ""
            lines.append(f"model {model}: stage {over[0][1]} needs ~{over[0][0] / 1024:.1f} GB{more}, more "
                         f"than the {limit_mb / 1024:.1f} GB a job may use here (max_mem_mb)")  # fmt: skip
    return lines


def summary(exp: ExperimentConfig, plan: dict[str, dict[str, int]]) -> list[str]:
    """Per model: parameters and its most demanding stage (what the dry run reports)."""
    lines = []
    for model in exp.models:
        stages = plan.get(model.name)
        if not stages:
            lines.append(f"{model.name}: parameter count unknown, memory not planned")
            continue
        worst = max(stages, key=stages.get)
        lines.append(f"{model.name}: {model.n_params / 1e9:.2f} B parameters; peak ~{stages[worst] / 1024:.1f} GB "
                     f"({worst}); reference evaluation ~{stages['reference'] / 1024:.1f} GB")  # fmt: skip
    return lines
