"""What every backend is made of, and the two small interfaces every framework implements.

A backend is a package ``bitsweep.backends.<name>`` (see bitsweep.backends for the registry):

- ``__init__.py`` holds ``INFO``, a :class:`BackendInfo`: capability data, the typed settings class and the
  format its quantizer reads. Pure data: the planner reads it without importing any framework.
- ``settings.py``: a :class:`BackendSettings` dataclass (defaults live there, and only there).
- ``quantize.py``: ``class Quantizer(BaseQuantizer)``: ``apply()`` makes the quantized files; the common
  sequence (folder, timer, sidecar) is :meth:`BaseQuantizer.quantize`, written once.
- ``runner.py``: ``class Runner(BaseRunner)``: logits for a window, one prefill, one decode step; tokenizer,
  ``detokenize`` and timed generation are :class:`BaseRunner`'s.
- ``convert.py`` when the backend has a format of its own (:class:`FormatInfo`).

Metrics live in bitsweep.evaluate and never see a framework.
"""

from __future__ import annotations

import dataclasses
import importlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bitsweep.errors import ComparabilityError, ConfigError, unknown
from bitsweep.manifest import read_json, write_json

if TYPE_CHECKING:
    from bitsweep.config import SchemeConfig

ARTIFACT_JSON = "artifact.json"
# What a quantized folder needs beside its weights so transformers can rebuild its config and tokenizer.
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")  # fmt: skip


def load_object(path: str) -> Any:
    """``"package.module:name"`` -> the object, importing the module now (and only now)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------------------
# Capability data (no framework imports)


@dataclass(frozen=True)
class Footprint:
    """A stage's peak resident memory as ``base_mb + bytes_per_param × n_params`` (bitsweep.planning)."""

    base_mb: float = 600
    bytes_per_param: float = 16.0

    def mb(self, n_params: int) -> float:
        return self.base_mb + self.bytes_per_param * n_params / 2**20


@dataclass(frozen=True)
class FormatInfo:
    """A converted model format: the ``{format}`` wildcard, the folder ``converted/<model>/<name>``.

    ``converter``: ``"module:function"`` called as ``convert(model_dir, out, options, trust_remote_code)``;
    None for ``hf``, the downloaded folder itself. ``runner``: the runner that checks a conversion against
    torch (max |logit diff| on the first window), ``"module:Class"``. ``runner_threads``: the most cores that
    runner computes on, when fewer than it is given (the check asks the scheduler for no more).
    """

    name: str
    converter: str | None = None
    runner: str | None = None
    convert_footprint: Footprint = field(default_factory=Footprint)
    runner_threads: int | None = None

    def check_threads(self, threads: int) -> int:
        """Threads for the conversion check of this format, ``threads`` at most."""
        return min(threads, self.runner_threads or threads)


HF_FORMAT = FormatInfo("hf")


@dataclass(frozen=True)
class BackendSettings:
    """``backends.<name>`` of an experiment. ``threads`` and ``mem_mb`` are resources: they decide how a job
    runs, not what it makes, so they never reach a job's params (changing them re-runs nothing)."""

    threads: int = 2
    mem_mb: int = 4000

    RESOURCES: ClassVar[tuple[str, ...]] = ("threads", "mem_mb")

    def __post_init__(self) -> None:
        if self.threads < 1 or self.mem_mb < 1:
            raise ConfigError(f"threads and mem_mb must be >= 1, got {self.threads} and {self.mem_mb}")


@dataclass(frozen=True)
class Calibration:
    """Windows of the calibration text (never the evaluation text) a data-aware scheme reads."""

    n_ctx: int = 256
    n_samples: int = 32

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.n_samples < 1:
            raise ConfigError(
                f"calibration: n_ctx and n_samples must be >= 1, got {self.n_ctx}, {self.n_samples}"
            )


@dataclass(frozen=True)
class BackendInfo:
    """What the planner needs to know about a backend without importing it.

    Subclasses override the hooks (``needs_calibration``, ``check_options``, ``convert_options``,
    ``preflight``, ``device_profile_enabled``) where a backend differs from the default.
    """

    name: str
    package: str  # "bitsweep.backends.<name>": quantize:Quantizer and runner:Runner live under it
    settings: type[BackendSettings]
    source_format: FormatInfo  # what its quantizer reads
    type_key: str  # the scheme option naming the format: "type" (llama.cpp), "mode" (NNCF)
    type_bits: dict[str, int]  # format -> bit class
    options: frozenset[str]  # every option a scheme of this backend may set
    group_sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # format -> group sizes it takes
    unavailable: dict[str, str] = field(default_factory=dict)  # option -> why this host cannot run it
    # Hugging Face model_type -> why this backend cannot run it (the framework's own message): refused at config
    # time. Measured on tiny models of each architecture (tests/test_architectures.py, bench/architectures.py).
    unsupported_architectures: dict[str, str] = field(default_factory=dict)
    runner: str = "runner:Runner"  # relative to ``package`` unless it names a module with a dot
    calibration_step: bool = False  # computes its own calibration artifact (llama.cpp: an importance matrix)
    device_profiler: str | None = None  # "module:function"(artifact_dir, settings) -> record (AI Hub)
    quantize_footprint: Footprint = field(default_factory=Footprint)  # peak memory of its quantizer
    evaluate_footprint: Footprint = field(default_factory=Footprint)  # of its runner, before the logits
    # environment of its evaluation jobs (set before the process imports anything; the Snakefile's evaluate rule)
    evaluate_env: dict[str, str] = field(default_factory=dict)
    # Its quantizer keeps about one core busy whatever the threads setting (CPU over wall seconds, the report's
    # time table): its jobs claim one thread, so the scheduler runs two side by side (quantize_threads).
    one_core_quantizer: bool = False

    @property
    def bits(self) -> frozenset[int]:
        return frozenset(self.type_bits.values())

    def evaluate_env_prefix(self) -> str:
        """``env NAME=value ...`` before an evaluation's command line ("" when it pins nothing)."""
        import shlex

        pinned = sorted(self.evaluate_env.items())
        return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in pinned) if pinned else ""

    def kind(self, options: dict[str, Any]) -> str:
        """The scheme's format name in capital letters (``Q4_K_M``, ``INT4_ASYM``)."""
        return str(options.get(self.type_key, "")).upper()

    def check_scheme(self, scheme: str, bits: int, options: dict[str, Any]) -> None:
        """Reject a scheme this backend cannot run, naming what it can."""
        where = f"scheme {self.name}/{scheme}"
        for option, why in self.unavailable.items():
            if options.get(option):
                raise ConfigError(f"{where}: {option} cannot run here: {why}")
        if bits not in self.bits:
            raise ConfigError(
                f"backend {self.name!r} cannot quantize to {bits} bits ({where}); "
                f"it supports: {', '.join(map(str, sorted(self.bits)))}"
            )
        extra = set(options) - self.options
        if extra:
            raise ConfigError(f"{where}: unknown options {sorted(extra)}; known: {sorted(self.options)}")
        kind = self.kind(options)
        if kind not in self.type_bits:
            raise unknown(f"{self.name} {self.type_key}", kind, self.type_bits)
        if self.type_bits[kind] != bits:
            raise ConfigError(
                f"{where}: {self.type_key} {kind} is {self.type_bits[kind]}-bit, config says {bits}"
            )
        groups = self.group_sizes.get(kind)
        given = options.get("group_size")
        if groups is not None and given is not None and given not in groups:
            known = ", ".join(map(str, sorted(groups))) or "(none)"
            raise ConfigError(
                f"{where}: {self.type_key} {kind} takes group_size {known}; config says {given}"
            )
        self.check_options(where, options)

    def check_options(self, where: str, options: dict[str, Any]) -> None:
        """Backend-specific scheme checks beyond the table above."""

    def needs_calibration(self, options: dict[str, Any]) -> bool:
        """Whether quantizing with ``options`` reads the calibration text (or the backend's calibration step)."""
        return bool(options.get("dataset"))

    def quantize_threads(self, options: dict[str, Any], threads: int) -> int:
        """Threads a quantize job of this scheme claims from the scheduler (a resource: the artifact does not
        depend on it). ``threads`` is the backend's setting."""
        return 1 if self.one_core_quantizer else threads

    def convert_options(self, settings: BackendSettings) -> dict[str, Any]:
        """What this backend asks of the conversion to its source format (e.g. llama.cpp's outtype)."""
        return {}

    def preflight(self, settings: BackendSettings) -> None:
        """Checks on this machine before any job runs (credentials a hosted service needs, ...)."""

    def device_profile_enabled(self, settings: BackendSettings) -> bool:
        return False

    def parse_settings(self, data: dict[str, Any] | BackendSettings | None) -> BackendSettings:
        from bitsweep.typed import from_dict

        if isinstance(data, BackendSettings):
            return data
        return from_dict(self.settings, data or {}, f"backends.{self.name}")

    def load(self, attr: str) -> Any:
        """``"quantize:Quantizer"`` (relative to the package) or ``"pkg.mod:Name"`` -> the object."""
        module, _, name = attr.partition(":")
        return load_object(f"{module if '.' in module else f'{self.package}.{module}'}:{name}")


def output_settings(settings: BackendSettings) -> dict[str, Any]:
    """The settings that change what a job makes (everything but resources)."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in settings.RESOURCES}


# ---------------------------------------------------------------------------------------------------------
# Artifacts and quantization


def copy_side_files(src: Path, out: Path) -> None:
    """Copy the HF config and tokenizer files ``src`` has into ``out``."""
    import shutil

    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


@dataclass
class Artifact:
    """A quantized model folder and its sidecar (what produced it, what was actually applied)."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model_file(self) -> Path:
        return self.path / self.meta["model_file"]

    def save(self) -> Path:
        return write_json(self.path / ARTIFACT_JSON, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        path = Path(path)
        return cls(path, read_json(path / ARTIFACT_JSON))


@dataclass(frozen=True)
class QuantizeRequest:
    """Everything a quantization job gets: the converted source, the scheme, the backend's settings, and the
    calibration input a data-aware scheme reads (the calibration text, or the backend's calibration artifact
    folder when it has a calibration step)."""

    src: Path
    scheme: SchemeConfig
    settings: BackendSettings
    out: Path
    calibration: Path | None = None
    threads: int = 2

    def calibration_input(self) -> Path:
        if self.calibration is None:
            raise ConfigError(f"scheme {self.scheme.variant} needs calibration data and got none")
        return self.calibration


@dataclass
class Applied:
    """What :meth:`BaseQuantizer.apply` made: the model file (relative to the artifact folder) and what was
    really applied (measured from the file: tensor types, stored widths, bits per weight...)."""

    model_file: str
    applied: dict[str, Any]


class BaseQuantizer:
    """The common quantize sequence, once: folder, timer, ``apply``, one sidecar schema, save."""

    name: ClassVar[str]

    def versions(self) -> dict[str, str]:
        raise NotImplementedError

    def apply(self, request: QuantizeRequest) -> Applied:
        raise NotImplementedError

    def quantize(self, request: QuantizeRequest) -> Artifact:
        request.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        done = self.apply(request)
        meta = base_meta(request, self.name, self.versions())
        meta |= {"model_file": done.model_file, "quantize_seconds": time.perf_counter() - started,
                 "applied": done.applied}  # fmt: skip
        artifact = Artifact(request.out, meta)
        artifact.save()
        return artifact


def base_meta(request: QuantizeRequest, backend: str, versions: dict[str, str]) -> dict[str, Any]:
    """The part of every artifact sidecar that does not depend on the backend."""
    from bitsweep.manifest import sha256_path

    return {
        "backend": backend,
        "scheme": request.scheme.name,
        "bits": request.scheme.bits,
        "options": request.scheme.options,
        "settings": dataclasses.asdict(request.settings),
        "source": str(request.src),
        "source_sha256": sha256_path(request.src) if request.src.is_file() else None,
        "calibration": str(request.calibration) if request.calibration else None,
        "calibration_sha256": sha256_path(request.calibration) if request.calibration else None,
        "versions": versions,
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------------------------------
# Runners


class BaseRunner:
    """Loads a model folder and answers the only questions evaluation asks.

    Subclasses implement ``logits`` (a window from an empty context), ``_prefill`` (the prompt; returns the
    last position's logits) and ``_step`` (one token on top of what came before; returns its logits). This
    base loads the HF tokenizer from the folder, decodes ids with it, times generation, refuses windows longer
    than ``n_ctx`` and closes itself as a context manager.
    """

    def __init__(self, path: str | Path, threads: int, n_ctx: int) -> None:
        self.path, self.threads, self.n_ctx = Path(path), threads, n_ctx
        self._tokenizer = None
        self._decoder = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def check_length(self, ids: np.ndarray) -> None:
        if len(ids) > self.n_ctx:
            raise ComparabilityError(
                f"{type(self).__name__} was opened for n_ctx={self.n_ctx} and got {len(ids)} tokens"
            )

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits ``(len(ids), n_vocab)`` float32 for one window, evaluated from an empty context."""
        raise NotImplementedError

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        """``logits(ids)`` for scoring, which reads each window once and moves on: the array may be the runner's
        own buffer, valid until its next call. A runner that can hand out its runtime's output in place
        overrides this (llama.cpp: a fresh (512, 49k) float32 array per window cost 0.03-0.29 s of page faults,
        depending on free huge pages: 7-8% of SmolLM2's forward passes over 8 windows)."""
        return self.logits(ids)

    def detokenize(self, ids: np.ndarray) -> bytes:
        """The bytes this runner's own tokenizer makes of ``ids`` (to check the vocabularies agree).

        A folder with a ``tokenizer.json`` is decoded by the ``tokenizers`` library itself, without importing
        transformers (:func:`bitsweep.text.fast_tokenizer`).
        """
        if self._decoder is None:
            from bitsweep.text import fast_tokenizer

            fast = fast_tokenizer(self.path)
            self._decoder = (
                partial(fast.decode, skip_special_tokens=False) if fast is not None
                else partial(self.tokenizer.decode, clean_up_tokenization_spaces=False)
            )  # fmt: skip
        return self._decoder(ids.tolist()).encode()

    def _prefill(self, prompt: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _step(self, token: int) -> np.ndarray:
        raise NotImplementedError

    def greedy(self, prompt: np.ndarray, n_new: int) -> np.ndarray:
        """The ``n_new`` token ids greedy decoding appends to ``prompt`` (untimed)."""
        self.check_length(np.empty(len(prompt) + n_new))
        tokens, last = [], self._prefill(prompt)
        for _ in range(n_new):
            tokens.append(int(np.argmax(last)))
            last = self._step(tokens[-1]) if len(tokens) < n_new else last
        return np.array(tokens, dtype=np.int32)

    def greedy_many(self, prompts: np.ndarray, n_new: int) -> np.ndarray:
        """(prompts, ``n_new``) greedy continuations of equal-length prompts (untimed): one at a time unless a
        runner decodes them as a batch (:meth:`greedy_batch`)."""
        return np.stack([self.greedy(p, n_new) for p in prompts])

    def greedy_batch(
        self,
        prompts: np.ndarray,
        n_new: int,
        prefill: Callable[[np.ndarray], np.ndarray],
        step: Callable[[np.ndarray, int], np.ndarray],
    ) -> np.ndarray:
        """:meth:`greedy_many` as one batch: ``prefill(prompts)`` and ``step(tokens, past)`` (tokens: (batch, 1),
        on top of ``past`` cached positions) return each sequence's next-token logits, (batch, V)."""
        self.check_length(np.empty(prompts.shape[1] + n_new))
        logits = prefill(prompts)
        tokens = np.empty((len(prompts), n_new), np.int64)
        for i in range(n_new):
            tokens[:, i] = np.argmax(logits, axis=-1)
            if i + 1 < n_new:
                logits = step(tokens[:, i : i + 1], prompts.shape[1] + i)
        return tokens.astype(np.int32)

    def generate(self, prompt: np.ndarray, n_new: int) -> tuple[float, float]:
        """Greedy-generate ``n_new`` tokens after ``prompt``; return (prompt seconds, generation seconds)."""
        self.check_length(np.empty(len(prompt) + n_new))
        started = time.perf_counter()
        last = self._prefill(prompt)
        prompt_done = time.perf_counter()
        for _ in range(n_new):
            last = self._step(int(np.argmax(last)))
        return prompt_done - started, time.perf_counter() - prompt_done

    def speed_info(self) -> dict[str, str]:
        """How the timed generation ran where a runner has more than one way (bitnet: fused or transformers)."""
        return {}

    def scoring_info(self) -> dict[str, str | float]:
        """What decided the scored logits beyond the artifact: a scoring path other than the runtime's own
        forward pass (MLX), runtime settings pinned for comparability (OpenVINO, bitnet)."""
        return {}

    def close(self) -> None:
        """Free the model (subclasses drop their framework objects)."""

    def __enter__(self) -> BaseRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Runner = BaseRunner  # the type evaluation talks to
LoadRunner = Callable[[], BaseRunner]
