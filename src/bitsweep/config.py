"""Typed experiment configuration, composed with Hydra from ``configs/``.

Hydra composes YAML; these dataclasses give the result types and check it on construction (``__post_init__``)
so a wrong scheme, bit-width or source fails before any job runs. Paths are not configuration: Snakemake owns
them.

>>> exp = load_experiment("configs", "default")            # doctest: +SKIP
>>> [(v.backend, v.name, v.bits) for v in exp.variants()][:2]  # doctest: +SKIP
[('llamacpp', 'f16', 16), ('llamacpp', 'q8_0', 8)]
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitsweep.backends import BackendSettings, FormatInfo, backend_info
from bitsweep.errors import ConfigError, unknown
from bitsweep.typed import from_dict, to_json

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def _check_name(kind: str, name: str) -> None:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"{kind} name {name!r} must match {NAME_RE.pattern} (it becomes a path and a wildcard)"
        )


@dataclass(frozen=True)
class SourceConfig:
    """Where the full-precision model comes from.

    kind ``hf``: a Hugging Face hub repo at a pinned revision (safetensors only);
    ``gguf_package``: a GGUF file shipped inside an installed Python package, dequantized to fp32;
    ``local``: a Hugging Face model folder on disk.
    """

    kind: str
    repo_id: str | None = None
    revision: str | None = None
    package: str | None = None
    filename: str | None = None
    path: str | None = None
    allow_pickle: bool = False

    KINDS: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "hf": ("repo_id", "revision"),
        "gguf_package": ("package", "filename"),
        "local": ("path",),
    }

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise unknown("model source kind", self.kind, self.KINDS)
        missing = [key for key in self.KINDS[self.kind] if not getattr(self, key)]
        if missing:
            raise ConfigError(f"model source {self.kind!r} needs: {', '.join(missing)}")


@dataclass(frozen=True)
class ModelConfig:
    """One model of a sweep (``configs/model/<name>.yaml``).

    ``architecture`` (Hugging Face ``model_type``), ``n_params`` and ``max_context`` are known before anything
    is downloaded, so an unsupported (architecture, backend) cell, a window longer than the model's context and
    a stage that cannot fit in memory are refused before any job runs. A local folder's are read from its
    ``config.json`` and weights; a hub model's are declared in its YAML and checked against the download.
    """

    name: str
    source: SourceConfig
    trust_remote_code: bool = False
    architecture: str = "llama"
    n_params: int | None = None  # every weight, embeddings included
    max_context: int | None = None  # max_position_embeddings
    vocab_size: int | None = None  # sizes the logits of each scored window
    license: str | None = None
    gated: bool = False  # the hub repo asks for an accepted license and a token (HF_TOKEN)

    def __post_init__(self) -> None:
        _check_name("model", self.name)
        if self.source.kind == "local" and self.source.path:
            from bitsweep.modelinfo import read_folder_facts

            facts = read_folder_facts(Path(self.source.path).expanduser())
            for key, value in facts.items():  # what the folder says wins over a default
                object.__setattr__(self, key, value)


@dataclass(frozen=True)
class TextConfig:
    """Evaluation and calibration text. They never overlap: see bitsweep.text."""

    source: str = "pydoc"  # "pydoc" (ships with Python), "wikitext2" (hub, online), "file"
    path: str | None = None  # for source "file": eval text; calibration is the file at calib_path
    calib_path: str | None = None
    calib_fraction: float = 0.25  # pydoc: share of topics held out for calibration

    SOURCES: typing.ClassVar[tuple[str, ...]] = ("pydoc", "wikitext2", "file")

    def __post_init__(self) -> None:
        if self.source not in self.SOURCES:
            raise unknown("eval text source", self.source, self.SOURCES)
        if self.source == "file" and not (self.path and self.calib_path):
            raise ConfigError("eval text source 'file' needs eval.text.path and eval.text.calib_path")
        if not 0 < self.calib_fraction < 1:
            raise ConfigError(f"eval.text.calib_fraction must be in (0, 1), got {self.calib_fraction}")


@dataclass(frozen=True)
class SpeedConfig:
    """How tokens/s are timed. ``protocol``: ``bitsweep`` (a prompt of ``prompt_tokens``, then ``gen_tokens``
    generated after it, median of ``repeats``) or ``llama-bench`` (llama.cpp's llama-bench: pp512 from an empty
    cache and tg128 from an empty cache, 5 repeats, mean ± sd; its sizes replace the three numbers here)."""

    prompt_tokens: int = 128
    gen_tokens: int = 32
    repeats: int = 3
    protocol: str = "bitsweep"

    PROTOCOLS: typing.ClassVar[tuple[str, ...]] = ("bitsweep", "llama-bench")
    LLAMA_BENCH: typing.ClassVar[tuple[int, int, int]] = (512, 128, 5)  # -p 512 -n 128 -r 5

    def __post_init__(self) -> None:
        if self.protocol not in self.PROTOCOLS:
            raise unknown("eval.speed.protocol", self.protocol, self.PROTOCOLS)
        if self.protocol == "llama-bench":
            for key, value in zip(("prompt_tokens", "gen_tokens", "repeats"), self.LLAMA_BENCH, strict=True):
                object.__setattr__(self, key, value)
        if self.repeats < 3:
            raise ConfigError(f"eval.speed.repeats must be >= 3 for a median and spread, got {self.repeats}")


@dataclass(frozen=True)
class AgreementConfig:
    """Greedy-continuation agreement with the reference: the first ``prompt_tokens`` of each of the first
    ``prompts`` windows, continued greedily for ``new_tokens`` by the reference and by each variant. 0 prompts:
    off."""

    prompts: int = 8
    prompt_tokens: int = 64
    new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.prompts < 0 or self.prompt_tokens < 1 or self.new_tokens < 1:
            raise ConfigError("eval.agreement: prompts >= 0, prompt_tokens >= 1 and new_tokens >= 1")


@dataclass(frozen=True)
class EvalConfig:
    text: TextConfig = field(default_factory=TextConfig)
    n_ctx: int = 512
    n_windows: int = 8
    threads: int = 2
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    agreement: AgreementConfig = field(default_factory=AgreementConfig)
    # lm-eval tasks (loglikelihood / multiple choice) scored on every variant, with flips against the reference:
    # e.g. [hellaswag, arc_easy, piqa, winogrande] (online), or local task YAMLs found under task_paths.
    tasks: list[str] = field(default_factory=list)
    task_paths: list[str] = field(default_factory=list)
    task_limit: int | None = None  # questions per task (None: all)

    def __post_init__(self) -> None:
        for key in ("n_ctx", "n_windows", "threads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        # llama-bench's pp and tg each start from an empty cache; ours generates after the prompt
        need = (max(self.speed.prompt_tokens, 1 + self.speed.gen_tokens) if self.speed.protocol == "llama-bench"
                else self.speed.prompt_tokens + self.speed.gen_tokens)  # fmt: skip
        if need > self.n_ctx:
            raise ConfigError(f"eval.speed ({self.speed.protocol} protocol) needs {need} tokens of context, more "
                              f"than eval.n_ctx={self.n_ctx}")  # fmt: skip
        if self.agreement.prompt_tokens + self.agreement.new_tokens > self.n_ctx:
            raise ConfigError("eval.agreement.prompt_tokens + new_tokens must fit in eval.n_ctx")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project root
    experiment: str | None = None  # MLflow experiment name; None: "bitsweep-<experiment name>"

    URI_SCHEMES: typing.ClassVar[tuple[str, ...]] = ("sqlite", "file", "http", "https", "postgresql", "mysql")

    def __post_init__(self) -> None:
        if self.uri is not None:
            scheme = self.uri.split(":", 1)[0].split("+", 1)[0]
            if scheme not in self.URI_SCHEMES:
                raise unknown("MLflow tracking URI scheme", scheme, self.URI_SCHEMES)


@dataclass(frozen=True)
class ReportConfig:
    """What ``results/<experiment>/report/`` holds besides the tables and plots.

    ``screenshot``: a headless-Chromium PNG of the MLflow UI's run comparison (``mlflow_compare.png``).
    None: taken when chromium is installed, else skipped with a message; True: required; False: never.
    """

    screenshot: bool | None = None


@dataclass(frozen=True)
class SchemeConfig:
    """One quantization scheme = one Hydra option in ``configs/quant/<backend>/<name>.yaml``.

    ``options`` are backend-specific (for llamacpp: ``type``, ``imatrix``); the backend's capability data
    (bitsweep.backends.<backend>.INFO) checks them.
    """

    backend: str
    name: str
    bits: int
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name("scheme", self.name)
        backend_info(self.backend).check_scheme(self.name, self.bits, self.options)

    @property
    def variant(self) -> str:
        return f"{self.backend}/{self.name}"

    @property
    def needs_calibration(self) -> bool:
        """Whether quantization reads calibration data (importance matrix, data-aware or static methods)."""
        return backend_info(self.backend).needs_calibration(self.options)

    def quantize_threads(self, threads: int) -> int:
        """Threads its quantize job claims from the scheduler, given the backend's ``threads`` setting (one where
        the backend's quantizer keeps one core busy, so two such jobs share a 2-core machine)."""
        return backend_info(self.backend).quantize_threads(self.options, threads)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    models: tuple[ModelConfig, ...]  # each gets its own windows and reference (its own tokenizer)
    eval: EvalConfig
    tracking: TrackingConfig
    backends: dict[str, BackendSettings]  # each backend's typed settings (bitsweep.backends.<name>.settings)
    schemes: dict[str, dict[str, SchemeConfig]]
    report: ReportConfig = field(default_factory=ReportConfig)
    # "<model>/<backend>" cells not to run (e.g. an architecture a backend cannot run, in a multi-model sweep)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name("experiment", self.name)
        if not any(self.schemes.values()):
            raise ConfigError(f"experiment {self.name!r} sweeps no scheme (set sweep.<backend>: [schemes])")
        if self.report.screenshot and not self.tracking.enabled:
            raise ConfigError("report.screenshot=true shows the sweep's MLflow runs: it needs tracking on")
        names = [m.name for m in self.models]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"models must name at least one model, each once; got {names}")
        for model in self.models:
            if model.max_context is not None and self.eval.n_ctx > model.max_context:
                raise ConfigError(f"eval.n_ctx={self.eval.n_ctx} is longer than model {model.name}'s context "
                                  f"({model.max_context} tokens)")  # fmt: skip
            for backend in self.backends_for(model.name):
                reason = backend_info(backend).unsupported_architectures.get(model.architecture)
                if reason:
                    raise ConfigError(f"backend {backend} cannot run model {model.name} ({model.architecture}): "
                                      f"{reason}. Leave it out: exclude: [{model.name}/{backend}]")  # fmt: skip
        cells = {f"{m.name}/{b}" for m in self.models for b in self.swept_backends()}
        stray = sorted(set(self.exclude) - cells)
        if stray:
            raise unknown("exclude cell (model/backend)", stray[0], sorted(cells))
        self.conversions()  # backends sharing a format must ask the same of its conversion

    def backends_for(self, model: str) -> list[str]:
        return [b for b in self.swept_backends() if f"{model}/{b}" not in self.exclude]

    def variants_of(self, model: str) -> list[SchemeConfig]:
        """The schemes swept on ``model`` (every variant of a backend not excluded for it)."""
        return [s for b in self.backends_for(model) for s in self.schemes[b].values()]

    def formats_of(self, model: str) -> list[str]:
        """The converted formats ``model``'s variants read."""
        return [name for name, (fmt, _) in self.conversions().items()
                if any(backend_info(b).source_format.name == name for b in self.backends_for(model))]  # fmt: skip

    def swept_backends(self) -> list[str]:
        return [backend for backend, by_name in self.schemes.items() if by_name]

    def conversions(self) -> dict[str, tuple[FormatInfo, dict[str, Any]]]:
        """Format name -> (format, conversion options) for every converted format the sweep reads."""
        plan: dict[str, tuple[FormatInfo, dict[str, Any], str]] = {}
        for backend in self.swept_backends():
            info = backend_info(backend)
            fmt, options = info.source_format, info.convert_options(self.backends[backend])
            if fmt.converter is None:
                continue
            if fmt.name in plan and plan[fmt.name][1] != options:
                raise ConfigError(f"backends {plan[fmt.name][2]} and {backend} read format {fmt.name} converted "
                                  f"differently ({plan[fmt.name][1]} vs {options}); make their settings agree")  # fmt: skip
            plan.setdefault(fmt.name, (fmt, options, backend))
        return {name: (fmt, options) for name, (fmt, options, _) in plan.items()}

    def variants(self) -> list[SchemeConfig]:
        return [s for by_name in self.schemes.values() for s in by_name.values()]

    def scheme(self, backend: str, name: str) -> SchemeConfig:
        by_name = self.schemes.get(backend)
        if by_name is None:
            raise unknown("backend in this sweep", backend, self.schemes)
        if name not in by_name:
            raise unknown(f"{backend} scheme in this sweep", name, by_name)
        return by_name[name]


# ---------------------------------------------------------------------------------------------------------
# Hydra composition


def config_dir_default() -> Path:
    return Path(__file__).resolve().parents[2] / "configs"


def compose_dict(config_dir: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Compose ``config.yaml`` with Hydra's compose API (no output dirs, no chdir) and resolve it."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError("cannot compose the configuration: " + " ".join(str(err).split())) from None
    finally:
        GlobalHydra.instance().clear()


def _group_options(config_dir: Path, group: str) -> list[str]:
    folder = config_dir / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _check_group_choice(config_dir: Path, group: str, overrides: list[str], default: str | None) -> None:
    """Give our one-line 'unknown X; known: ...' error where Hydra would print a page."""
    chosen = default
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") == group:
            chosen = value
    known = _group_options(config_dir, group)
    if chosen is not None and chosen not in known:
        raise unknown(group, chosen, known)


def load_experiment(
    config_dir: str | Path | None = None, experiment: str = "default", overrides: list[str] | tuple = ()
) -> ExperimentConfig:
    """Compose ``experiment`` (+ Hydra ``overrides``) into a checked :class:`ExperimentConfig`."""
    config_dir = Path(config_dir or config_dir_default())
    overrides = [f"experiment={experiment}", *overrides]
    for group in ("experiment", "model", "eval", "tracking"):
        _check_group_choice(config_dir, group, overrides, None)
    base = compose_dict(config_dir, overrides)
    # `models: [a, b]` sweeps several configs/model/*.yaml; without it the one `model` group choice is swept.
    names = base.pop("models", None)
    if names is None:
        base["models"] = [base.get("model")]
    elif not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"models must be a list of model config names, got {names!r}")
    else:
        base["models"] = [_merge_option(config_dir, "model", name, None) for name in names]
    base.pop("model", None)
    sweep = base.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise ConfigError("sweep must map backend names to lists of scheme names")
    # Each swept backend's settings and each scheme's option file, under what the experiment (and the
    # command line: +backends.llamacpp.threads=4, +quant.llamacpp.q4_k_m.options.imatrix=true) says of them.
    backends, schemes = base.get("backends") or {}, base.get("quant") or {}
    full = {**base, "backends": {}, "quant": {}}
    for backend, names in sweep.items():
        backend_info(backend)
        full["backends"][backend] = _merge_option(config_dir, "backend", backend, backends.get(backend))
        known = _group_options(config_dir, f"quant/{backend}")
        full["quant"][backend] = {}
        if not isinstance(names, list | type(None)):
            raise ConfigError(f"sweep.{backend} must be a list of scheme names, got {names!r}")
        twice = sorted({name for name in names or [] if (names or []).count(name) > 1})
        if twice:
            raise ConfigError(f"sweep.{backend} lists {', '.join(twice)} more than once")
        for name in names or []:
            if name not in known:
                raise unknown(f"{backend} scheme", name, known)
            delta = (schemes.get(backend) or {}).get(name)
            full["quant"][backend][name] = _merge_option(config_dir, f"quant/{backend}", name, delta)
    return experiment_from_dict(full)


def _merge_option(config_dir: Path, group: str, option: str, delta: dict | None) -> dict[str, Any]:
    import yaml
    from omegaconf import OmegaConf

    path = config_dir / group / f"{option}.yaml"
    if not path.is_file():
        raise unknown(group.replace("/", " ") + " config", option, _group_options(config_dir, group))
    try:
        merged = OmegaConf.merge(OmegaConf.load(path), delta or {})
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: " + " ".join(str(err).split())) from None
    return OmegaConf.to_container(merged, resolve=True) or {}  # type: ignore[return-value]


def experiment_from_dict(full: dict[str, Any]) -> ExperimentConfig:
    unexpected = set(full) - {
        "name",
        "models",
        "eval",
        "tracking",
        "report",
        "sweep",
        "backends",
        "quant",
        "exclude",
    }
    if unexpected:
        raise ConfigError(f"unknown top-level config keys {sorted(unexpected)}")
    schemes: dict[str, dict[str, SchemeConfig]] = {}
    for backend, by_name in (full.get("quant") or {}).items():
        schemes[backend] = {
            name: from_dict(
                SchemeConfig, {**body, "backend": backend, "name": name}, f"quant.{backend}.{name}"
            )
            for name, body in by_name.items()
        }
    return ExperimentConfig(
        name=str(full.get("name", "")),
        models=tuple(from_dict(ModelConfig, m, "model") for m in full.get("models") or []),
        eval=from_dict(EvalConfig, full.get("eval") or {}, "eval"),
        tracking=from_dict(TrackingConfig, full.get("tracking") or {}, "tracking"),
        report=from_dict(ReportConfig, full.get("report") or {}, "report"),
        backends={
            name: backend_info(name).parse_settings(data)
            for name, data in (full.get("backends") or {}).items()
        },
        schemes=schemes,
        exclude=tuple(full.get("exclude") or ()),
    )


__all__ = [
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "ReportConfig",
    "SchemeConfig",
    "SourceConfig",
    "SpeedConfig",
    "TextConfig",
    "TrackingConfig",
    "from_dict",
    "load_experiment",
    "to_json",
]


def main(argv: list[str]) -> int:
    """``python -m bitsweep.config show [experiment=NAME] [hydra overrides...]``: the composed, checked experiment
    as JSON (every backend's settings with their defaults filled in)."""
    import dataclasses
    import json
    import sys

    if not argv or argv[0] != "show":
        print(main.__doc__, file=sys.stderr)
        return 2
    experiment = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("experiment=")), "default")
    overrides = [a for a in argv[1:] if not a.startswith("experiment=")]
    try:
        exp = load_experiment(None, experiment, overrides)
    except ConfigError as err:
        print(f"bitsweep: {err}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(exp), indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
