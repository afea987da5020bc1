"""Task accuracy through lm-eval (as a library), on any backend, and flips against the reference.

:class:`RunnerLM` is an lm-eval ``LM`` over a bitsweep runner: lm-eval builds each task's requests and scores
them; the runner only computes logits. Text is tokenized by the *reference* tokenizer (the model folder's), so
every runtime sees the same ids for every question, as for perplexity. Any lm-eval loglikelihood or
multiple-choice task runs (hellaswag, arc_easy, piqa, winogrande, ... online; local task YAMLs over JSON files
offline, ``eval.task_paths``).

Flips: per task, the questions whose answer changed against the reference, right -> wrong and wrong -> right
counted separately (a variant can keep its accuracy and still change many answers).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from bitsweep.backends.base import BaseRunner
from bitsweep.errors import ConfigError
from bitsweep.metrics import log_softmax

log = logging.getLogger(__name__)


def runner_lm(runner: BaseRunner, tokenizer_dir: Path):
    """An lm-eval ``TemplateLM`` scoring with ``runner`` (class built here: lm-eval is imported when used)."""
    from lm_eval.api.model import TemplateLM
    from transformers import AutoTokenizer

    class RunnerLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.runner = runner
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.eot_token_id

        def tok_encode(self, string: str, add_special_tokens: bool = False, **kwargs) -> list[int]:
            return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            out = []
            for _, context, continuation in requests:
                ids = np.asarray([*context, *continuation], dtype=np.int64)[-runner.n_ctx :]
                n = len(continuation)
                logits = runner.logits(ids)[-n - 1 : -1]  # the positions predicting the continuation
                logp = log_softmax(logits)
                target = np.asarray(continuation)
                out.append(
                    (float(logp[np.arange(n), target].sum()), bool((logits.argmax(-1) == target).all()))
                )
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise ConfigError("rolling log-likelihood tasks are bitsweep's perplexity protocols (eval.text)")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise ConfigError("generation tasks are not run here; choose loglikelihood/multiple-choice tasks")

    return RunnerLM()


def run_tasks(runner: BaseRunner, tokenizer_dir: Path, tasks: list[str], paths: list[str],
              limit: int | None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each task's accuracy and per-question correctness (in lm-eval's document order)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    include = [str(Path(p).resolve()) for p in paths] or None
    # Indexing lm-eval's thousands of built-in task YAMLs takes most of a minute: only when a task needs them.
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include)
    missing = [t for t in tasks if t not in set(manager.all_tasks)]
    if missing:
        raise ConfigError(f"unknown lm-eval tasks {missing} (eval.task_paths adds local task YAMLs)")
    results = lm_eval.simple_evaluate(model=runner_lm(runner, tokenizer_dir), tasks=list(tasks),
                                      task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0)  # fmt: skip
    out = {}
    for task in tasks:
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        correct = [float(s["acc"]) for s in samples]
        out[task] = {"acc": float(np.mean(correct)), "correct": correct, "n": len(correct)}
    return out


def task_metrics(
    ours: dict[str, dict[str, Any]], reference: dict[str, dict[str, Any]] | None
) -> dict[str, float]:
    """Flat metrics: ``task.<name>.acc`` with a 95% bootstrap interval over questions, and against the reference
    the accuracy difference and the flips (shares of questions whose answer went right -> wrong, wrong -> right)."""
    from bitsweep.stats import interval

    out: dict[str, float] = {}
    for task, result in ours.items():
        correct = np.asarray(result["correct"])
        sums = {"n": [1.0] * len(correct), "acc": list(correct)}
        lo, hi = interval(sums, "acc")
        out |= {f"task.{task}.acc": result["acc"], f"task.{task}.acc_lo": lo, f"task.{task}.acc_hi": hi}
        if reference is not None and task in reference:
            ref = np.asarray(reference[task]["correct"])
            if len(ref) != len(correct):
                raise ConfigError(f"task {task}: {len(correct)} questions here, {len(ref)} in the reference")
            out |= {f"task.{task}.flips_right_to_wrong": float(((ref == 1) & (correct == 0)).mean()),
                    f"task.{task}.flips_wrong_to_right": float(((ref == 0) & (correct == 1)).mean()),
                    f"task.{task}.acc_delta": float(correct.mean() - ref.mean())}  # fmt: skip
    return out
