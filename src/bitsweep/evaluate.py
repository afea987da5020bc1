"""evaluate: score a Runner on the shared token windows against the shared reference.

Comparability is checked, not assumed: the reference file must have been made on exactly these windows
(sha256 of the ids), and the runner's own tokenizer must turn every window back into the same bytes as the
reference tokenizer (so the runner's ids mean the same tokens).
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitsweep.backends.base import Runner
from bitsweep.config import EvalConfig
from bitsweep.errors import ComparabilityError
from bitsweep.manifest import read_json, write_json
from bitsweep.metrics import QualityAccumulator, ReferenceRows, set_scoring_threads
from bitsweep.stats import intervals
from bitsweep.text import Windows

log = logging.getLogger(__name__)


CODES = "logprobs.npy"  # (n_windows, n_ctx - 1, V) uint16: the 16-bit full-vocabulary log-probs
ROWS = "rows.npz"  # per row: low, scale, top1; and the windows' sha256
SUMS = "per_window.json"  # the reference's own per-window sums, by protocol (for paired intervals)
GREEDY = "greedy.npy"  # (prompts, new_tokens) int32: the reference's greedy continuations
TASKS = "tasks.json"  # the reference's per-question correctness on eval.tasks (for flips)
TOKENIZER = "tokenizer"  # the reference tokenizer: lm-eval tasks are tokenized by it for every runtime


@dataclass(frozen=True)
class Reference:
    """The reference every variant is compared to: a folder with the 16-bit log-probs of every scored position
    (memory-mapped when read), each row's range and top-1 id, and the reference's own per-window sums."""

    codes: np.ndarray
    low: np.ndarray
    scale: np.ndarray
    top1: np.ndarray
    windows_sha256: str
    per_window: dict[str, dict[str, list[float]]]
    greedy: np.ndarray | None = None
    tasks: dict[str, Any] | None = None
    path: Path | None = None

    def window(self, i: int) -> ReferenceRows:
        return ReferenceRows(np.asarray(self.codes[i]), self.low[i], self.scale[i], self.top1[i])

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        path = Path(path)
        with np.load(path / ROWS) as rows:
            greedy = np.load(path / GREEDY) if (path / GREEDY).is_file() else None
            tasks = read_json(path / TASKS) if (path / TASKS).is_file() else None
            return cls(np.load(path / CODES, mmap_mode="r"), rows["low"], rows["scale"], rows["top1"],
                       str(rows["windows_sha256"]), read_json(path / SUMS), greedy, tasks, path)  # fmt: skip


class ReferenceWriter:
    """Writes a :class:`Reference` window by window (the codes go straight to a memory-mapped file)."""

    def __init__(self, path: str | Path, windows: Windows, n_vocab: int) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        shape = (windows.n_windows, windows.n_ctx - 1)
        self.codes = np.lib.format.open_memmap(self.path / CODES, "w+", np.uint16, (*shape, n_vocab))
        self.low, self.scale = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.top1 = np.zeros(shape, np.int32)
        self.windows_sha256 = windows.digest

    def put(self, i: int, rows: ReferenceRows) -> None:
        self.codes[i], self.low[i], self.scale[i], self.top1[i] = rows.codes, rows.low, rows.scale, rows.top1

    def finish(self, per_window: dict[str, dict[str, list[float]]]) -> None:
        self.codes.flush()
        del self.codes
        np.savez(self.path / ROWS, low=self.low, scale=self.scale, top1=self.top1,
                 windows_sha256=self.windows_sha256)  # fmt: skip
        write_json(self.path / SUMS, per_window)


def check_tokenizer(runner: Runner, windows: Windows) -> None:
    for i, ids in enumerate(windows.ids):
        got = hashlib.sha256(runner.detokenize(ids)).hexdigest()
        if got != windows.decoded_sha256[i]:
            raise ComparabilityError(
                f"window {i}: this runner's tokenizer decodes the shared token ids to different text than the "
                "reference tokenizer; its vocabulary differs, so its scores would not be comparable"
            )


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# A speed figure is flagged when other processes kept this much of a core busy while it was timed, or when its
# repeats spread wider than this (sd / mean): it is then no measure of the runtime alone.
BUSY_CORES = 0.25
WIDE_SPREAD = 0.10


class MachineLoad:
    """CPU time other processes used while a block ran (psutil: their user + system time before and after),
    and the load average around it: what says whether a speed figure had the machine to itself."""

    def __enter__(self) -> MachineLoad:
        self.loadavg_before = os.getloadavg()[0]
        self.before = self._cpu_times()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.started
        after = self._cpu_times()
        used = {key: after[key] - self.before[key] for key in after.keys() & self.before.keys()}
        self.other_cores = sum(used.values()) / wall if wall > 0 else 0.0
        self.busiest = [f"{name} ({seconds / wall:.2f} cores)" for (_, name), seconds in
                        sorted(used.items(), key=lambda kv: -kv[1])[:3] if seconds / wall >= 0.05]  # fmt: skip
        self.loadavg_after = os.getloadavg()[0]

    @staticmethod
    def _cpu_times() -> dict[tuple[int, str], float]:
        import psutil

        mine = os.getpid()
        out = {}
        for proc in psutil.process_iter(["pid", "name", "cpu_times"]):
            times = proc.info["cpu_times"]
            if proc.info["pid"] != mine and times is not None:
                out[proc.info["pid"], proc.info["name"] or "?"] = times.user + times.system
        return out

    def record(self) -> dict[str, Any]:
        return {"speed_other_cores": self.other_cores, "speed_busy_processes": ", ".join(self.busiest),
                "speed_loadavg_before": self.loadavg_before, "speed_loadavg_after": self.loadavg_after}  # fmt: skip


def measure_speed(runner: Runner, windows: Windows, cfg: EvalConfig) -> dict[str, Any]:
    """Prompt processing and greedy generation tokens/s, one warm-up, then ``repeats`` timed runs, under the
    configured protocol (:class:`bitsweep.config.SpeedConfig`), with their spread and the machine's load."""
    from bitsweep.quiet import alone

    speed = cfg.speed
    prompt = windows.ids[0][: speed.prompt_tokens]
    pp, tg = [], []
    with alone() as waited:  # the other jobs on this machine end first, new ones wait (bitsweep.quiet)
        runner.generate(prompt[: min(len(prompt), 16)], min(4, speed.gen_tokens))  # warm-up: caches, threads
        with MachineLoad() as load:
            for _ in range(speed.repeats):
                if speed.protocol == "llama-bench":  # pp512 and tg128, each from an empty cache
                    prompt_s, _ = runner.generate(prompt, 0)
                    _, gen_s = runner.generate(prompt[:1], speed.gen_tokens)
                else:
                    prompt_s, gen_s = runner.generate(prompt, speed.gen_tokens)
                pp.append(len(prompt) / prompt_s)
                tg.append(speed.gen_tokens / gen_s)
    centre = statistics.mean if speed.protocol == "llama-bench" else statistics.median
    out: dict[str, Any] = {"threads": cfg.threads, "speed_protocol": speed.protocol} | waited
    for key, values in (("pp_tok_s", pp), ("tg_tok_s", tg)):
        out |= {key: centre(values), f"{key}_min": min(values), f"{key}_max": max(values),
                f"{key}_sd": statistics.stdev(values)}  # fmt: skip
    spread = max(out["pp_tok_s_sd"] / out["pp_tok_s"], out["tg_tok_s_sd"] / out["tg_tok_s"])
    out |= load.record() | {"speed_spread": spread}
    out["speed_flag"] = speed_flag(out)
    return out


def speed_flag(metrics: dict[str, Any]) -> str:
    """Why a speed figure is not a clean measurement ('' when it is)."""
    reasons = []
    if metrics.get("speed_other_cores", 0.0) >= BUSY_CORES:
        busy = metrics.get("speed_busy_processes") or "other processes"
        reasons.append(f"busy machine: {busy} used {metrics['speed_other_cores']:.2f} cores while timed")
    if metrics.get("speed_spread", 0.0) > WIDE_SPREAD:
        reasons.append(f"repeats spread {metrics['speed_spread']:.0%} (sd/mean)")
    return "; ".join(reasons)


def score(
    runner: Runner, windows: Windows, reference: Reference | None, cfg: EvalConfig, keep: Path | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quality over all windows: (metrics, per-window sums by protocol). With ``keep`` (the reference run),
    the runner's log-probs are written there as the reference every variant is compared to."""
    if reference is not None and reference.windows_sha256 != windows.digest:
        raise ComparabilityError(
            "reference logits were computed on other token windows; re-run the reference"
        )
    check_tokenizer(runner, windows)
    set_scoring_threads(runner.threads)
    acc = QualityAccumulator()
    writer = None
    started = time.perf_counter()
    for i, ids in enumerate(windows.ids):
        logits = runner.window_logits(ids)  # read before the next window replaces it
        if logits.shape[0] != len(ids):
            raise ComparabilityError(
                f"runner returned {logits.shape[0]} rows of logits for {len(ids)} tokens"
            )
        logp = acc.add(ids, logits, reference.window(i) if reference is not None else None)
        if keep is not None:
            writer = writer or ReferenceWriter(keep, windows, logits.shape[1])
            writer.put(i, ReferenceRows.from_logp(logp))
        log.info("window %d/%d scored", i + 1, windows.n_windows)
    per_window = acc.per_window()
    metrics = acc.summary(sum(windows.scored_bytes), sum(windows.scored_words))
    metrics |= {"score_seconds": time.perf_counter() - started, "n_windows": windows.n_windows}
    if reference is not None:
        metrics |= intervals(per_window["all"], reference.per_window["all"])
    if writer is not None:
        writer.finish(per_window)
    return metrics, per_window


def agreement_prompts(windows: Windows, cfg: EvalConfig) -> np.ndarray:
    """(prompts, prompt_tokens) ids: the start of each of the first windows (the evaluation text itself)."""
    n = min(cfg.agreement.prompts, windows.n_windows)
    return windows.ids[:n, : cfg.agreement.prompt_tokens]


def continuations(runner: Runner, windows: Windows, cfg: EvalConfig) -> np.ndarray:
    prompts = agreement_prompts(windows, cfg)
    return runner.greedy_many(prompts, cfg.agreement.new_tokens) if len(prompts) else np.empty((0, 0))


def greedy_agreement(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far each greedy continuation follows the reference's: the matching prefix (tokens before the first
    difference) and matching positions, as shares of the continuation length, averaged over prompts."""
    if reference.size == 0 or ours.shape != reference.shape:
        return {}
    same = ours == reference
    prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return {
        "greedy_prefix_match": float(prefix.mean() / same.shape[1]),
        "greedy_token_match": float(same.mean()),
    }


def evaluate_tasks(runner: Runner, cfg: EvalConfig, reference: Reference | None, keep: Path | None) -> dict:
    """lm-eval tasks on this runner; the reference keeps its per-question results, a variant gets flips."""
    from bitsweep.tasks import run_tasks, task_metrics

    tokenizer = (keep if keep is not None else reference.path) / TOKENIZER
    ours = run_tasks(runner, tokenizer, cfg.tasks, cfg.task_paths, cfg.task_limit)
    if keep is not None:
        write_json(keep / TASKS, ours)
    return task_metrics(ours, reference.tasks if reference is not None else None)


def evaluate_runner(
    load_runner, windows: Windows, reference: Reference | None, cfg: EvalConfig, keep: Path | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load (timed, with memory measured), score, time generation. ``load_runner()`` returns a Runner."""
    baseline = rss_mb()
    started = time.perf_counter()
    runner = load_runner()
    load_seconds = time.perf_counter() - started
    try:
        # Speed and memory first: the process's peak RSS then covers loading and generation only, not the
        # metric arrays that scoring allocates.
        metrics = measure_speed(runner, windows, cfg)
        metrics |= {
            "load_seconds": load_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "model_rss_mb": peak_rss_mb() - baseline,
        } | runner.speed_info()
        quality, per_window = score(runner, windows, reference, cfg, keep)
        greedy = continuations(runner, windows, cfg)
        if keep is not None:
            np.save(Path(keep) / GREEDY, greedy.astype(np.int32))
        elif reference is not None and reference.greedy is not None:
            quality |= greedy_agreement(greedy, reference.greedy)
        if cfg.tasks:
            quality |= evaluate_tasks(runner, cfg, reference, keep)
        quality |= runner.scoring_info()
    finally:
        runner.close()
    return quality | metrics, per_window


def comparability(windows: Windows, reference_path: str | Path | None) -> dict[str, Any]:
    from bitsweep.manifest import sha256_file

    return {
        "windows_sha256": windows.digest,
        "eval_text_sha256": windows.text_sha256,
        "n_windows": windows.n_windows,
        "n_ctx": windows.n_ctx,
        "bos": windows.bos,
        "reference_sha256": sha256_file(Path(reference_path) / ROWS) if reference_path else None,
        "tokenizer_check": "decoded bytes identical to the reference tokenizer on every window",
    }
