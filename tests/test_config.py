from __future__ import annotations

import re

import pytest

from bitsweep.backends import REGISTRY, backend_info
from bitsweep.backends.llamacpp import LLAMACPP_TYPES
from bitsweep.config import EvalConfig, SchemeConfig, SourceConfig, TrackingConfig, load_experiment
from bitsweep.errors import ConfigError
from bitsweep.preflight import check_before_run, check_paths
from bitsweep.typed import from_dict

from .conftest import CONFIGS

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    exp = load_experiment(CONFIGS, experiment)
    assert exp.name == experiment
    assert exp.variants(), "an experiment must sweep something"
    for scheme in exp.variants():
        assert scheme.backend in REGISTRY


@pytest.mark.parametrize("backend", sorted(REGISTRY))
def test_every_scheme_file_is_valid(backend):
    names = sorted(p.stem for p in (CONFIGS / "quant" / backend).glob("*.yaml"))
    exp = load_experiment(CONFIGS, "default", [f"sweep.{backend}=[{','.join(names)}]"])
    schemes = [s for s in exp.variants() if s.backend == backend]
    assert sorted(s.name for s in schemes) == names
    info = backend_info(backend)
    for scheme in schemes:
        assert info.type_bits[scheme.options[info.type_key].upper()] == scheme.bits
        if backend == "llamacpp" and LLAMACPP_TYPES[scheme.options["type"]].needs_imatrix:
            assert scheme.options["imatrix"] is True


def test_default_sweep_covers_every_bit_width_from_1_to_8():
    bits = {s.bits for s in load_experiment(CONFIGS, "default").variants()}
    assert {1, 2, 3, 4, 5, 6, 8} <= bits


def test_experiment_deltas_and_overrides_apply():
    smoke = load_experiment(CONFIGS, "smoke", ["eval.n_windows=2", "+quant.llamacpp.q2_k.options.pure=true"])
    assert smoke.eval.n_windows == 2
    assert smoke.backends["llamacpp"].imatrix.chunks == 8  # experiment delta over the settings' default
    assert smoke.scheme("llamacpp", "q2_k").options == {"type": "Q2_K", "imatrix": False, "pure": True}


@pytest.mark.parametrize(
    ("experiment", "overrides", "message"),
    [
        ("nope", [], "unknown experiment 'nope'; known: bitnet-native, default, edge-formats, smoke"),
        (
            "default",
            ["model=gpt5"],
            "unknown model 'gpt5'; known: bitnet-b1.58-2b-4t, gemma-3-1b, gemma-3-270m",
        ),
        ("default", ["eval=imagenet"], "unknown eval 'imagenet'"),
        ("default", ["sweep.llamacpp=[q4_k_m,q9_k]"], "unknown llamacpp scheme 'q9_k'; known: f16, iq1_m"),
        ("default", ["+sweep.onnx=[int8]"], "unknown backend 'onnx'; known: bitnet, llamacpp, mlx"),
        ("default", ["+quant.openvino.nf4_g64.options.mode=NF5"], "unknown openvino mode 'NF5'; known: FP4"),
        (
            "default",
            ["+quant.openvino.int8_asym.options.mode=INT4_ASYM"],
            "mode INT4_ASYM is 4-bit, config says 8",
        ),
        ("default", ["eval.n_ctx=abc"], "eval.n_ctx: expected int"),
        ("default", ["eval.n_windows=0"], "eval.n_windows must be >= 1"),
        (
            "default",
            ["+quant.llamacpp.iq2_xxs.options.imatrix=false"],
            "IQ2_XXS requires an importance matrix",
        ),
        ("default", ["+quant.llamacpp.q4_0.bits=3"], "type Q4_0 is 4-bit, config says 3"),
        ("default", ["+quant.llamacpp.q4_0.options.typo=1"], "unknown options ['typo']"),
        ("default", ["tracking.uri=ftp://x"], "unknown MLflow tracking URI scheme 'ftp'"),
        ("default", ["tracking=off", "report.screenshot=true"], "MLflow runs: it needs tracking on"),
        ("default", ["report.screenshot=maybe"], "report.screenshot: expected bool, got 'maybe'"),
        (
            "default",
            [
                "sweep.llamacpp=[]",
                "sweep.openvino=[]",
                "sweep.mlx=[]",
                "sweep.bitnet=[]",
                "sweep.onnxruntime=[]",
                "sweep.olive=[]",
                "sweep.qnn=[]",
            ],
            "sweeps no scheme",
        ),
        (
            "default",
            ["+quant.bitnet.int4_g64.options.format=int5"],
            "unknown bitnet format 'INT5'; known: BINARY",
        ),
        ("default", ["+quant.bitnet.tq2_0.bits=3"], "format TQ2_0 is 2-bit, config says 3"),
        (
            "default",
            ["+backends.openvino.calibration.n_sampels=8"],
            "backends.openvino.calibration: unknown keys ['n_sampels']; known: n_ctx, n_samples",
        ),
        (
            "default",
            ["+backends.openvino.calibration.n_samples=many"],
            "backends.openvino.calibration.n_samples: expected int, got 'many'",
        ),
        (
            "default",
            ["+backends.llamacpp.imatrix=32"],
            "backends.llamacpp.imatrix: expected a mapping, got int",
        ),
        ("default", ["+backends.mlx.threads=0"], "threads and mem_mb must be >= 1"),
        (
            "default",
            ["+backends.llamacpp.convert_outtype=q8"],
            "unknown backends.llamacpp.convert_outtype 'q8'",
        ),
        ("default", ["sweep.llamacpp=[q8_0,q4_0,q8_0]"], "sweep.llamacpp lists q8_0 more than once"),
    ],
)
def test_bad_input_fails_with_one_clear_message(experiment, overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_experiment(CONFIGS, experiment, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_partial_nested_setting_keeps_the_backends_own_defaults():
    """qnn's calibration default (512 tokens) is not the Calibration class's (256): overriding n_samples alone
    must keep qnn's n_ctx."""
    alone = load_experiment(CONFIGS, "default", ["+backends.qnn.calibration.n_samples=2"])
    assert (alone.backends["qnn"].calibration.n_ctx, alone.backends["qnn"].calibration.n_samples) == (512, 2)
    smoke = load_experiment(CONFIGS, "smoke")
    assert smoke.backends["onnxruntime"].calibration.n_ctx == 128
    assert smoke.backends["openvino"].calibration == type(smoke.backends["openvino"].calibration)(256, 16)


def test_resources_never_reach_a_jobs_params():
    from bitsweep.backends.base import output_settings

    exp = load_experiment(CONFIGS, "smoke", ["+backends.qnn.mem_mb=9000", "+backends.qnn.threads=1"])
    assert exp.backends["qnn"].mem_mb == 9000 and exp.backends["qnn"].threads == 1
    assert output_settings(exp.backends["qnn"]) == output_settings(
        load_experiment(CONFIGS, "smoke").backends["qnn"]
    )
    assert "threads" not in output_settings(exp.backends["qnn"])


def test_one_core_quantizers_claim_one_thread_so_two_share_the_machine():
    """Quantize jobs claim the cores their quantizer keeps busy (measured: the report's time table): NNCF's data-free
    compression and the ONNX family's quantizers one, llama.cpp and NNCF's data-aware methods the threads setting."""
    exp = load_experiment(
        CONFIGS, "default", ["+backends.llamacpp.threads=4", "+backends.openvino.threads=4"]
    )
    threads = {s.variant: s.quantize_threads(exp.backends[s.backend].threads) for s in exp.variants()}
    assert threads["llamacpp/q4_k_m"] == threads["llamacpp/iq1_s"] == 4
    assert threads["openvino/int4_asym_gptq"] == threads["openvino/int8_static"] == 4  # data-aware
    assert threads["openvino/int4_asym_g128"] == threads["openvino/int8_sym"] == 1
    for backend in ("bitnet", "mlx", "olive", "onnxruntime", "qnn"):
        assert {n for v, n in threads.items() if v.startswith(f"{backend}/")} == {1}, backend


def test_bits_a_backend_lacks_are_rejected():
    with pytest.raises(ConfigError, match="cannot quantize to 7 bits"):
        SchemeConfig(backend="llamacpp", name="x", bits=7, options={"type": "Q8_0"})


def test_from_dict_names_known_keys():
    with pytest.raises(ConfigError, match="unknown keys \\['n_windowz'\\]; known: .*n_windows"):
        from_dict(EvalConfig, {"n_windowz": 3})


def test_source_kinds_need_their_fields():
    with pytest.raises(ConfigError, match="needs: revision"):
        SourceConfig(kind="hf", repo_id="org/model")
    with pytest.raises(ConfigError, match="unknown model source kind 's3'"):
        SourceConfig(kind="s3")


def test_tracking_uri_schemes():
    assert TrackingConfig(uri="sqlite:///x.db").uri
    assert TrackingConfig(uri="postgresql+psycopg2://u@h/db").uri
    with pytest.raises(ConfigError):
        TrackingConfig(uri="mongodb://h")


def test_missing_files_are_reported_before_any_job(tmp_path):
    exp = load_experiment(CONFIGS, "smoke", ["eval.text.source=file", f"eval.text.path={tmp_path}/e.txt",
                                             f"eval.text.calib_path={tmp_path}/c.txt"])  # fmt: skip
    with pytest.raises(ConfigError, match="eval.text.path: .*e.txt does not exist"):
        check_paths(exp)
    (tmp_path / "e.txt").write_text("x")
    (tmp_path / "c.txt").write_text("y")
    check_paths(exp)


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("experiment/broken.yaml", "name: broken\nsweep: {llamacpp: [q8_0\n"),
        ("quant/bitnet/int4_g64.yaml", "bits: [4\n"),
    ],
)
def test_malformed_yaml_is_one_clear_error(tmp_path, path, text):
    import shutil

    shutil.copytree(CONFIGS, tmp_path / "configs")
    (tmp_path / "configs" / path).write_text(text)
    experiment = "broken" if path.startswith("experiment") else "smoke"
    with pytest.raises(ConfigError) as err:
        load_experiment(tmp_path / "configs", experiment)
    assert path.split("/")[-1] in str(err.value) and "\n" not in str(err.value)


def _bad_inputs(tmp_path, monkeypatch):
    """The kinds of bad input issue 7 lists, each as (what, call that must fail, expected message)."""
    from bitsweep.text import make_windows

    broken = tmp_path / "configs"
    if not broken.exists():
        import shutil

        shutil.copytree(CONFIGS, broken)
        (broken / "experiment" / "broken.yaml").write_text("name: broken\nsweep: {llamacpp: [q8_0\n")
    (tmp_path / "results").write_text("a file where the results folder should be")
    monkeypatch.delenv("QAIHUB_API_TOKEN", raising=False)
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "no-client.ini"))
    smoke = load_experiment(CONFIGS, "smoke")

    def preflight_with(name: str, value: str):
        def call():
            with monkeypatch.context() as env:
                env.setenv(name, value)
                check_before_run(smoke, tmp_path / "ok")

        return call

    return [
        ("unknown backend", lambda: load_experiment(CONFIGS, "smoke", ["+sweep.tensorrt=[int8]"]),
         "unknown backend 'tensorrt'; known: bitnet, llamacpp, mlx, olive, onnxruntime, openvino, qnn"),
        ("unknown scheme", lambda: load_experiment(CONFIGS, "smoke", ["sweep.olive=[rtn_int3]"]),
         "unknown olive scheme 'rtn_int3'; known: fp32, int8_dynamic"),
        ("unknown model", lambda: load_experiment(CONFIGS, "smoke", ["model=llama-9000"]),
         "unknown model 'llama-9000'; known: bitnet-b1.58-2b-4t"),
        ("bits a backend lacks", lambda: load_experiment(CONFIGS, "smoke", ["+quant.onnxruntime.int4_g32_sym.bits=3",
                                                                             "+quant.onnxruntime.int4_g32_sym.options.format=BLOCK_INT3"]),
         "backend 'onnxruntime' cannot quantize to 3 bits \\(scheme onnxruntime/int4_g32_sym\\); it supports: 2, 4, 8, 32"),
        ("malformed YAML", lambda: load_experiment(broken, "broken"), "cannot compose the configuration"),
        ("missing model files", lambda: check_paths(load_experiment(CONFIGS, "smoke", ["model.source.kind=local",
                                                                            f"+model.source.path={tmp_path}/none"])),
         "model smollm2-135m: source.path: " + str(tmp_path / "none") + " does not exist"),
        ("eval text too short", lambda: make_windows(list(range(100)), 512, 8),
         "eval text has 100 tokens: too short for one window of n_ctx=512"),
        ("non-writable output dir", lambda: check_before_run(smoke, tmp_path / "results" / "smoke"),
         "results folder .*results/smoke cannot be written"),
        ("unknown MLflow URI scheme", lambda: load_experiment(CONFIGS, "smoke", ["tracking.uri=mongodb://db/x"]),
         "unknown MLflow tracking URI scheme 'mongodb'; known: file, http, https, mysql, postgresql, sqlite"),
        ("AI Hub with no token", lambda: check_before_run(load_experiment(CONFIGS, "smoke", ["+backends.qnn.aihub.enabled=true"]),
                                                          tmp_path / "ok"),
         "Qualcomm AI Hub is enabled but no API token is configured: set \\$QAIHUB_API_TOKEN"),
        ("a kernel instruction set typo", preflight_with("BITSWEEP_KERNEL_ISA", "avx512"),
         "BITSWEEP_KERNEL_ISA='avx512': known: auto, avx512vnni, avx512bw, avxvnni, avx2, portable"),
        ("a prefetch policy typo", preflight_with("BITSWEEP_KERNEL_PREFETCH", "4k"),
         "BITSWEEP_KERNEL_PREFETCH='4k': 0, 1 \\(this host's default\\) or BYTES:L1 / BYTES:L2"),
        ("a huge pages typo", preflight_with("BITSWEEP_HUGE_PAGES", "yes"), "BITSWEEP_HUGE_PAGES='yes': 0 or 1"),
        ("a group size MLX lacks", lambda: load_experiment(CONFIGS, "smoke", ["+quant.mlx.mxfp4.options.group_size=64"]),
         "mode MXFP4 takes group_size 32; config says 64"),
    ]  # fmt: skip


def test_thirteen_kinds_of_bad_input_each_give_one_clear_line(tmp_path, monkeypatch):
    """Every kind fails with one line naming what is wrong (and what is known) before any job could start.
    Corrupt GGUF files are a run-time fault of that job alone: tests/test_llamacpp.py."""
    cases = _bad_inputs(tmp_path, monkeypatch)
    assert len(cases) >= 13
    for what, call, message in cases:
        with pytest.raises(ConfigError) as err:
            call()
        assert "\n" not in str(err.value), what
        assert re.search(message, str(err.value)), (what, str(err.value))
