from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bitsweep.config import TrackingConfig
from bitsweep.manifest import write_json
from bitsweep.report import aggregate_results
from bitsweep.screenshot import find_chromium
from bitsweep.tracking import check_tracking_reachable, flatten, init_tracking, log_variant


def result(backend: str, scheme: str, bits: int, ppl: float, kld: float, size: float, bpw: float) -> dict:
    metrics = {"ppl": ppl, "kld": kld, "top1": 1 - kld, "size_mb": size, "bpw": bpw, "pp_tok_s": 300.0,
               "tg_tok_s": 100.0 / size, "peak_rss_mb": 900.0, "kld_lo": kld * 0.9, "kld_hi": kld * 1.1}  # fmt: skip
    # 4 windows of 100 positions: KLD per window around the mean, +-5% (a spread the intervals can resolve at
    # 0.004 vs 0.05, not at 0.4 vs 0.41)
    spread = [0.95, 1.05, 1.0, 1.0]
    per_window = {"all": {"n": [100.0] * 4, "kld": [100 * kld * f for f in spread],
                          "nll": [100 * np.log(ppl)] * 4, "top1": [100 * (1 - kld)] * 4}}  # fmt: skip
    return {"model": "m", "backend": backend, "scheme": scheme, "bits": bits, "status": "ok", "metrics": metrics,
            "per_window": per_window, "artifact": {"versions": {"llama_cpp_python": "0.3.36"}}}  # fmt: skip


@pytest.fixture
def results(tmp_path):
    rows = [
        result("reference", "fp32", 32, 15.0, 0.0, 500, 32),
        result("llamacpp", "q8_0", 8, 15.1, 0.004, 140, 8.5),
        result("llamacpp", "q4_k_m", 4, 16.0, 0.05, 100, 6.2),
        result("llamacpp", "q2_k", 2, 21.0, 0.4, 84, 5.1),
        result("llamacpp", "bad", 2, 30.0, 0.9, 90, 5.5),  # dominated by q2_k
        result("llamacpp", "tq1_0", 1, 114044705.765, 9.7, 60, 1.7),  # destroyed
    ]
    return [write_json(tmp_path / f"{r['scheme']}.json", r) for r in rows]


def test_report_tables_and_plots(tmp_path, results):
    rows = aggregate_results(results, tmp_path / "report")
    assert rows[0]["scheme"] == "fp32"
    md = (tmp_path / "report" / "results.md").read_text()
    assert "| llamacpp | q4_k_m | 4 | 6.20 | 100.0 | 16.00 | – | 0.05000 [0.04500, 0.05500] | 95.00 |" in md
    assert "| llamacpp | tq1_0 | 1 | 1.70 | 60.0 | 1.1e+08 |" in md  # not 114044705.765
    assert "How to read this table" in md and "95% paired bootstrap" in md
    # ladder neighbours (by bits/weight): q8_0 -> q4_k_m resolved, q4_k_m -> bad, bad -> q2_k, q2_k -> tq1_0
    assert "| llamacpp | q8_0 | q4_k_m | 0.04600 [" in md and "| yes |" in md
    # the KLD-vs-size front: q8_0 (140 MB) -> q4_k_m -> q2_k -> tq1_0 (bad is dominated)
    assert (
        "| front | llamacpp/q8_0 | llamacpp/q4_k_m |" in md
        and "| front | llamacpp/q2_k | llamacpp/tq1_0 |" in md
    )
    assert "llamacpp/bad" not in md
    csv_text = (tmp_path / "report" / "results.csv").read_text()
    assert csv_text.count("\n") == 7 and "per_window" not in csv_text
    for name in ("kld_vs_size.png", "ppl_vs_bpw.png", "speed_vs_size.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"


def test_flatten_drops_secrets():
    flat = flatten({"a": {"b": 1, "hf_token": "hf_xyz"}, "api_key": "k", "c": [1, 2]})
    assert flat == {"a.b": 1, "c": [1, 2]}


def test_mlflow_parent_and_child_runs_in_a_real_store(tmp_path, results, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = init_tracking(TrackingConfig(uri=uri), "unit", tmp_path / "sweep.json")
    log = tmp_path / "q.log"
    log.write_text("quantize log")
    for path in results[:3]:
        log_variant(tmp_path / "sweep.json", path, [log], {"eval": {"n_ctx": 64}, "token": "secret"},
                    tmp_path / f"{path.stem}.run.json")  # fmt: skip
    # Logging the same variant again replaces its run instead of adding a duplicate.
    log_variant(tmp_path / "sweep.json", results[1], [log], {}, tmp_path / "again.json")
    client = MlflowClient(uri)
    children = client.search_runs(
        [sweep["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{sweep['parent_run_id']}'"
    )
    assert sorted(r.data.tags["bitsweep.variant"] for r in children) == [
        "llamacpp/q4_k_m", "llamacpp/q8_0", "reference/fp32"]  # fmt: skip
    q8 = next(r for r in children if r.info.run_name == "llamacpp/q8_0")
    assert q8.data.metrics["kld"] == pytest.approx(0.004)
    assert q8.data.tags["version.llama_cpp_python"] == "0.3.36"
    q4 = next(r for r in children if r.info.run_name == "llamacpp/q4_k_m")
    assert q4.data.params["eval.n_ctx"] == "64" and "token" not in q4.data.params
    artifacts = {a.path for a in client.list_artifacts(q4.info.run_id)}
    assert {"q4_k_m.json", "logs"} <= artifacts
    assert json.loads((tmp_path / "again.json").read_text())["run_id"] == q8.info.run_id


def test_tracking_disabled_writes_a_marker(tmp_path, results):
    init_tracking(TrackingConfig(enabled=False), "unit", tmp_path / "sweep.json")
    log_variant(tmp_path / "sweep.json", results[0], [], {}, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == {"enabled": False}


def test_a_failed_job_leaves_a_record_that_the_report_lists(tmp_path, results):
    """cli.run writes ``<output>.failed.json`` when a variant's stage fails and removes it when it succeeds;
    the report keeps every finished variant and lists the failed ones with their error."""
    from bitsweep.cli import failure_record_path, run
    from bitsweep.errors import ConfigError
    from bitsweep.report import variant_outcomes

    def quantize(out: Path, fail: int = 0) -> None:
        if fail:
            raise ConfigError("no 2-D weights match layers ['x']")

    out = tmp_path / "quantized" / "bitnet" / "tq2_0"
    with pytest.raises(SystemExit):
        run(quantize, ["--out", str(out), "--fail", "1"])
    record = failure_record_path(out)
    assert json.loads(record.read_text())["error"] == "ConfigError: no 2-D weights match layers ['x']"

    expected = {("m", r.stem, r.stem): [r] for r in results}  # finished variants
    expected["m", "bitnet", "tq2_0"] = [out, tmp_path / "evaluated" / "tq2_0.json"]  # quantize failed
    expected["m", "bitnet", "int4"] = [
        tmp_path / "q" / "int4",
        tmp_path / "evaluated" / "int4.json",
    ]  # never ran
    done, failed = variant_outcomes(expected)
    assert done == results
    assert [(f["scheme"], f["status"], f["stage"]) for f in failed] == [
        ("tq2_0", "failed", "quantize"), ("int4", "not run", None)]  # fmt: skip
    aggregate_results(done, tmp_path / "report", failed)
    md = (tmp_path / "report" / "results.md").read_text()
    assert "| llamacpp | q4_k_m | 4 |" in md and "## Failed variants (2)" in md
    assert "| m | bitnet | tq2_0 | failed | quantize | ConfigError: no 2-D weights match layers ['x'] |" in md

    run(quantize, ["--out", str(out)])  # a later success clears the record
    assert not record.exists()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend store, proxied artifacts)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "2"]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_parallel_jobs_log_to_a_tracking_server(tmp_path, results, mlflow_server):
    """What the workflow does against a server: one init job, then variant jobs logging at the same time."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from bitsweep.usage import USAGE_PREFIX

    check_tracking_reachable(mlflow_server)  # the preflight's probe passes against a real server
    sweep = init_tracking(TrackingConfig(uri=mlflow_server), "served", tmp_path / "sweep.json")
    more = [write_json(tmp_path / f"v{i}.json", {**json.loads(results[1].read_text()), "scheme": f"v{i}"})
            for i in range(6)]  # fmt: skip
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_stage.py"
    jobs = [subprocess.Popen([sys.executable, str(script), "log_variant", "--tracking", str(tmp_path / "sweep.json"),
                              "--result", str(path), "--params", "{}", "--out", str(tmp_path / f"{path.stem}.run.json")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for path in results + more]  # fmt: skip
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), "\n".join(o[-1500:] for o in outputs)
    assert not any("database is locked" in o for o in outputs)
    assert all(o.strip().splitlines()[-1].startswith(USAGE_PREFIX) for o in outputs)  # the time table's cores
    client = MlflowClient(mlflow_server)
    children = client.search_runs(
        [sweep["experiment_id"]], f"tags.mlflow.parentRunId = '{sweep['parent_run_id']}'"
    )
    assert len(children) == len(results) + len(more) == 12
    v3 = next(r for r in children if r.info.run_name == "llamacpp/v3")
    assert v3.data.metrics["kld"] == pytest.approx(0.004)
    assert {a.path for a in client.list_artifacts(v3.info.run_id)} >= {"v3.json"}


@pytest.fixture
def health_server():
    """A tiny HTTP server on 127.0.0.1 that answers GET /health with "OK" (as MLflow's does), 404 elsewhere;
    yields its base URI and the (path, Authorization header) of each request it got."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            ok = self.path == "/health"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"OK" if ok else b"not found")

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
        server.shutdown()


def test_a_tracking_server_that_does_not_answer_is_one_line_naming_the_uri():
    import socket
    import time

    from bitsweep.errors import ConfigError

    with socket.socket() as sock:  # a port that nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_tracking_reachable(f"http://alice:s3cret@127.0.0.1:{port}")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert message.startswith(
        f"MLflow tracking server http://127.0.0.1:{port} does not answer (connection refused);"
    )
    assert "tracking=local" in message and "\n" not in message
    assert "s3cret" not in message and "alice" not in message


def test_a_tracking_server_that_accepts_but_never_answers_times_out():
    import socket
    import time

    from bitsweep.errors import ConfigError

    with socket.socket() as sock:  # the kernel completes the handshake; nobody reads or writes
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"does not answer \(timed out after 0\.5 s\)"):
            check_tracking_reachable(uri, timeout=0.5)
        assert time.monotonic() - start < 3


def test_a_tracking_server_that_answers_health_passes(health_server):
    uri, seen = health_server
    check_tracking_reachable(uri)
    check_tracking_reachable(uri + "/")
    assert seen == [("/health", None), ("/health", None)]


def test_the_probe_sends_the_credentials_mlflow_would_and_never_shows_them(health_server, monkeypatch):
    import base64

    from bitsweep.errors import ConfigError

    uri, seen = health_server
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with_password = uri.replace("http://", "http://alice:s3cret@")
    check_tracking_reachable(with_password)
    assert seen[-1] == ("/health", "Basic " + base64.b64encode(b"alice:s3cret").decode())
    with pytest.raises(ConfigError, match=r"\(HTTP 404 from /health\)") as err:  # not an MLflow server there
        check_tracking_reachable(with_password + "/mlflow")
    assert seen[-1][0] == "/mlflow/health"
    assert f"MLflow tracking server {uri}/mlflow does not answer" in str(err.value)
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize(
    "uri", [None, "sqlite:///mlflow.db", "file:///tmp/mlruns", "postgresql://alice:s3cret@localhost/mlflow"]
)
def test_a_tracking_store_that_is_not_a_server_is_not_probed(uri, monkeypatch):
    import urllib.request

    def no_probe(*args, **kwargs):
        raise AssertionError(f"probed {uri}")

    monkeypatch.setattr(urllib.request, "urlopen", no_probe)
    check_tracking_reachable(uri)


def test_compare_url_is_the_uis_own_route():
    """MLflow 3.17's getCompareRunPageRoute: JSON lists of run and experiment ids in the hash's query."""
    from urllib.parse import unquote

    from bitsweep.screenshot import compare_url

    url = compare_url("http://h:5000/", ["r1", "r2"], ["3"])
    assert unquote(url) == 'http://h:5000/#/compare-runs?runs=["r1","r2"]&experiments=["3"]'
    assert " " not in url and '"' not in url


def test_the_temporary_server_serves_the_workflows_store(tmp_path, monkeypatch):
    """It runs in a temporary folder: a relative sqlite path is resolved first; artifacts: mlruns beside it."""
    from bitsweep.screenshot import server_command

    monkeypatch.chdir(tmp_path)
    cmd = server_command("sqlite:///mlflow.db", 5001)
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert cmd[cmd.index("--default-artifact-root") + 1] == str(tmp_path.resolve() / "mlruns")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "--no-serve-artifacts" in cmd


def test_screenshot_without_chromium_says_how_to_install_it(tmp_path, monkeypatch):
    from bitsweep import screenshot
    from bitsweep.errors import ScreenshotError

    monkeypatch.setattr(screenshot.shutil, "which", lambda name: None)
    assert screenshot.screenshot_wanted(None) is False  # the workflow leaves the rule out, with a message
    assert screenshot.screenshot_wanted(True) is True and screenshot.screenshot_wanted(False) is False
    with pytest.raises(ScreenshotError) as err:
        screenshot.screenshot_mlflow(tmp_path / "sweep.json", tmp_path / "out.png")
    assert "apt-get install chromium" in str(err.value) and "\n" not in str(err.value)


def test_a_page_that_did_not_render_is_refused(tmp_path):
    from PIL import Image

    from bitsweep.errors import ScreenshotError
    from bitsweep.screenshot import WINDOW, check_page

    png = tmp_path / "page.png"
    Image.new("RGB", WINDOW, "white").save(png)
    with pytest.raises(ScreenshotError, match="blank"):
        check_page("<a href='#/experiments/1/runs/r1'>r1</a>", png, ["r1"], WINDOW)
    with pytest.raises(ScreenshotError, match="did not show the runs"):
        check_page("<div>Error while loading compare runs page</div>", png, ["r1"], WINDOW)
    with pytest.raises(ScreenshotError, match="1 of 2 missing"):
        check_page("<a>r1</a>", png, ["r1", "r2"], WINDOW)


@pytest.mark.slow
def test_the_temporary_server_is_stopped_on_error(tmp_path):
    """An error while the UI is served (Chromium crashed, the page did not render): the server is gone after."""
    import urllib.request
    from urllib.parse import urlparse

    from bitsweep.screenshot import mlflow_ui

    with (
        pytest.raises(RuntimeError, match="render failed"),
        mlflow_ui(f"sqlite:///{tmp_path / 'mlflow.db'}") as ui,
    ):
        port = urlparse(ui[0]).port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
        assert _processes_mentioning(str(tmp_path))  # the server, named by its store
        raise RuntimeError("render failed")
    assert not _processes_mentioning(str(tmp_path))


def _processes_mentioning(text: str) -> list[str]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if text in cmdline:
            found.append(f"{proc.pid}: {cmdline[:200]}")
    return found


@pytest.mark.slow
@pytest.mark.skipif(
    find_chromium() is None,
    reason="chromium is not installed (apt-get install chromium; scripts/install.sh does it as root)",
)
def test_screenshot_of_the_compare_view_of_a_real_store(tmp_path, results, monkeypatch):
    """Parent + 2 child runs in a sqlite store: a temporary mlflow server, headless Chromium, a real PNG of the
    compare-runs page (the DOM showed both runs), and afterwards no server or browser process left."""
    import tempfile

    from PIL import Image

    from bitsweep.screenshot import WINDOW, screenshot_mlflow

    monkeypatch.chdir(tmp_path)
    # Temporary folders (the browser profile too) under tmp_path: every process started names tmp_path.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_tracking(TrackingConfig(uri=uri), "shot", tmp_path / "sweep.json")
    for path in (results[1], results[0]):
        log_variant(tmp_path / "sweep.json", path, [], {}, tmp_path / f"{path.stem}.run.json")
    out = tmp_path / "report" / "mlflow_compare.png"
    shot = screenshot_mlflow(tmp_path / "sweep.json", out)
    assert shot["runs"] == ["reference/fp32", "llamacpp/q8_0"]  # the reference first
    assert shot["axes"] == ["bpw", "tg_tok_s", "top1", "kld"]  # ppl_ratio: only the variant has one
    assert "#/compare-runs?runs=" in shot["url"]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == WINDOW
        grey = image.convert("L")
        assert grey.getextrema()[1] - grey.getextrema()[0] > 100  # text on a background, not one colour
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
    assert not list(tmp_path.glob("bitsweep-*")), "temporary folders left behind"
    assert not _processes_mentioning(str(tmp_path)), "an mlflow server or chromium process is still running"


def test_the_report_says_where_the_time_went(tmp_path):
    """Snakemake's benchmark files (its own TSV columns) summed per rule and backend, the costliest first, with
    the cores each kept busy from the usage line that ends each job's log (CPU over wall seconds)."""
    from bitsweep.report import rule_times, time_section
    from bitsweep.usage import USAGE_PREFIX, usage_line

    own = json.loads(usage_line(1.5).removeprefix(USAGE_PREFIX))  # this process's CPU so far
    assert own["wall_s"] == 1.5 and own["cpu_s"] > 0

    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rel, seconds, rss, usage in [("quantize/m/llamacpp/q8_0", 12.5, "900.1", (12.0, 24.0)),
                                     ("quantize/m/llamacpp/q4_0", 30.0, "NA", (30.0, 30.0)),
                                     ("quantize/m/mlx/a4", 10.0, "NA", None),
                                     ("quantize/m/mlx/a8", 4.0, "NA", (4.0, 2.0)),
                                     ("convert/m/onnx", 8.0, "700.0", (8.0, 4.0)),
                                     ("evaluate/m/reference/fp32", 20.0, "1800.0", (20.0, 36.0))]:  # fmt: skip
        path = tmp_path / "benchmarks" / f"{rel}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{seconds}\t0:00:{int(seconds):02d}\t{rss}\t1\t1\t1\t0\t0\t50\t1\n")
        if usage:
            log = tmp_path / "logs" / f"{rel}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            wall_cpu = json.dumps({"wall_s": usage[0], "cpu_s": usage[1]})
            log.write_text(f"INFO something\n{USAGE_PREFIX}{wall_cpu}\n")
    times = rule_times(tmp_path / "benchmarks")
    assert [(t["rule"], t["what"], t["jobs"], t["total_s"], t["max_s"], t["max_rss_mb"]) for t in times][:2] == [
        ("quantize", "llamacpp", 2, 42.5, 30.0, 900.1), ("evaluate", "reference", 1, 20.0, 20.0, 1800.0)]  # fmt: skip
    assert [t["what"] for t in times[2:]] == ["mlx", "onnx"]
    lines = time_section(times)
    # q8_0: 24 CPU s in 12 s of its own, over Snakemake's 12.5 s: 25 s; q4_0 30 s: 55 s of CPU in 42.5 s
    assert "| quantize | llamacpp | 2 | 0.7 | 50% | 30 | 1.29 | 900 |" in lines
    assert (
        "| quantize | mlx | 2 | 0.2 | 17% | 10 | 0.50 | – |" in lines
    )  # a8's log says, a4's has no usage line
    assert "| convert | onnx | 1 | 0.1 | 9% | 8 | 0.50 | 700 |" in lines
    top = tmp_path / "top" / "benchmarks"  # a rule with one job per sweep: benchmarks/<rule>.tsv
    top.mkdir(parents=True)
    (top / "init_tracking.tsv").write_text(header + "3.0\t0:00:03\t289.0\t1\t1\t1\t0\t0\t50\t1\n")
    assert [(t["rule"], t["what"]) for t in rule_times(top)] == [("init_tracking", "")]
    assert rule_times(tmp_path / "nowhere") == [] and time_section([]) == []
