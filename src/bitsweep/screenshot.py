"""The MLflow UI's run comparison of one sweep as a PNG (``report/mlflow_compare.png``), by headless Chromium.

The page is MLflow's compare-runs view of the sweep's child runs (one per variant, the reference first):
parallel-coordinates plot, run details, parameters, metrics. An http(s) tracking URI is opened as it is; any
other store (sqlite, file, a database) is served by a temporary ``mlflow server`` on 127.0.0.1 that is stopped
afterwards, on error too. The PNG is written only once Chromium's DOM shows every run and the image is not
blank, so a failed render never looks like a finished output.

>>> screenshot_mlflow(Path("results/default/tracking/sweep.json"), Path("shot.png"))  # doctest: +SKIP
{'url': 'http://bitsweep-mlflow:41234/#/compare-runs?runs=...', 'runs': ['reference/fp32', ...]}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from bitsweep.errors import ScreenshotError
from bitsweep.manifest import read_json

log = logging.getLogger(__name__)

CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = "chromium not found: install it with `apt-get install chromium` (scripts/install.sh does so)"
WINDOW = (1600, 2100)  # tall enough for the plots, run details, parameters and metrics sections
# Virtual time runs ahead while the page is idle and waits while requests are pending, so a generous budget
# costs little wall time; the wall-clock limit is the real bound.
VIRTUAL_TIME_MS = 20_000
# Chromium reaches the temporary server under this name (mapped to 127.0.0.1): on a localhost address
# MLflow 3.17's UI opens its Assistant side panel on first load, over a fifth of the page.
ALIAS = "bitsweep-mlflow"


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def screenshot_wanted(setting: bool | None) -> bool:
    """``report.screenshot``: True or False as given; None: whether chromium is installed."""
    return find_chromium() is not None if setting is None else setting


def screenshot_mlflow(tracking: Path, out: Path, window: tuple[int, int] = WINDOW) -> dict[str, Any]:
    """PNG of the compare-runs page for the sweep in ``tracking`` (the file ``init_tracking`` writes)."""
    chromium = find_chromium()
    if chromium is None:
        raise ScreenshotError(INSTALL_HINT)
    info = read_json(tracking)
    if not info.get("enabled"):
        raise ScreenshotError(f"{tracking}: tracking was off for this sweep; there are no runs to show")
    runs = child_runs(info["uri"], info["experiment_id"], info["parent_run_id"])
    start = time.monotonic()
    with (
        mlflow_ui(info["uri"]) as (base, browser_args),
        tempfile.TemporaryDirectory(prefix="bitsweep-shot-") as tmp,
    ):
        url = compare_url(base, list(runs), [info["experiment_id"]])
        png = Path(tmp) / "page.png"
        dom = render(chromium, url, png, window, [*browser_args, f"--user-data-dir={Path(tmp) / 'profile'}"])
        check_page(dom, png, list(runs), window)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".tmp")
        shutil.copyfile(png, partial)
        os.replace(partial, out)
    log.info(
        "MLflow compare view of %d runs -> %s in %.1f s: %s", len(runs), out, time.monotonic() - start, url
    )
    return {"url": url, "runs": list(runs.values())}


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """{run id: run name} of the sweep's variant runs (deleted ones left out), the reference first."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri=uri).search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000
    )
    if not found:
        raise ScreenshotError(f"parent run {parent_run_id} at {uri} has no child runs to compare")
    found.sort(key=lambda r: (r.data.tags.get("bitsweep.backend") != "reference", r.info.run_name or ""))
    return {r.info.run_id: r.info.run_name or r.info.run_id for r in found}


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The UI's own route (``getCompareRunPageRoute``): JSON lists in the hash's query string."""
    runs, experiments = (quote(json.dumps(ids, separators=(",", ":"))) for ids in (run_ids, experiment_ids))
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


@contextlib.contextmanager
def mlflow_ui(uri: str) -> Iterator[tuple[str, list[str]]]:
    """(UI base URL, extra Chromium flags): the tracking server itself, or a temporary one over the store."""
    if urlparse(uri).scheme in ("http", "https"):
        yield uri, []
        return
    port, start = _free_port(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bitsweep-mlflow-ui-") as workdir:
        server = _start_server(uri, port, Path(workdir))
        try:
            _wait_healthy(server, f"http://127.0.0.1:{port}/health", Path(workdir) / "server.log")
            log.info("temporary mlflow server on 127.0.0.1:%d up in %.1f s", port, time.monotonic() - start)
            flags = [f"--host-resolver-rules=MAP {ALIAS} 127.0.0.1", "--no-proxy-server"]
            yield f"http://{ALIAS}:{port}", flags
        finally:
            end_process_group(server, grace=20)


def server_command(uri: str, port: int) -> list[str]:
    """``mlflow server`` over the store at ``uri``, reachable only from this machine, artifacts not served."""
    return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", _absolute_store_uri(uri), "--default-artifact-root", _artifact_root(uri),
            "--no-serve-artifacts", "--workers", "1", "--allowed-hosts", f"{ALIAS}:{port},127.0.0.1:{port}",
            "--cors-allowed-origins", f"http://{ALIAS}:{port}"]  # fmt: skip


def _absolute_store_uri(uri: str) -> str:
    """The server runs in a temporary folder: a relative sqlite or file path must not move there with it."""
    scheme, sep, path = uri.partition(":///") if uri.startswith("sqlite") else uri.partition("://")
    if scheme in ("sqlite", "file") and sep and path and not path.startswith("/"):
        return f"{scheme}{sep}{Path(path).resolve()}"
    return uri


def _artifact_root(uri: str) -> str:
    """Where the workflow keeps this store's artifacts (``init_tracking``: ``mlruns`` beside mlflow.db)."""
    absolute = _absolute_store_uri(uri)
    if absolute.startswith("sqlite:///"):
        return str(Path(absolute.removeprefix("sqlite:///")).parent / "mlruns")
    if absolute.startswith("file:"):
        return urlparse(absolute).path
    return str(Path.cwd() / "mlruns")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(uri: str, port: int, workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(workdir / "server.log", "wb") as server_log:
        return subprocess.Popen(
            server_command(uri, port),
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_healthy(server: subprocess.Popen, url: str, server_log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            tail = " | ".join(server_log.read_text(errors="replace").strip().splitlines()[-3:])
            raise ScreenshotError(f"the temporary mlflow server did not answer {url}: {tail}")
        time.sleep(0.3)


def chromium_command(
    chromium: str, url: str, png: Path, window: tuple[int, int], extra: list[str]
) -> list[str]:
    # --no-sandbox: Chromium will not run as root with its sandbox; the page is our own local UI.
    # --enable-unsafe-swiftshader: software WebGL for the parallel-coordinates plot (the silent fallback is
    # deprecated).
    return [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
            "--hide-scrollbars", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--window-size={window[0]},{window[1]}", f"--virtual-time-budget={VIRTUAL_TIME_MS}",
            f"--screenshot={png}", "--dump-dom", *extra, url]  # fmt: skip


def render(
    chromium: str, url: str, png: Path, window: tuple[int, int], extra: list[str], timeout: float = 180
) -> str:
    """Load ``url`` headless; write the screenshot to ``png`` and return the rendered DOM."""
    command = chromium_command(chromium, url, png, window, extra)
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        dom, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ScreenshotError(f"chromium did not finish rendering {url} in {timeout:.0f} s") from None
    finally:
        end_process_group(proc, grace=5)
    if proc.returncode != 0 or not png.is_file():
        tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
        raise ScreenshotError(f"chromium failed on {url} (exit {proc.returncode}): {tail}")
    return dom.decode(errors="replace")


def check_page(dom: str, png: Path, run_ids: list[str], window: tuple[int, int]) -> None:
    """The page shows every run (their links are in the DOM) and the image is a full, non-blank window."""
    from PIL import Image

    missing = [run_id for run_id in run_ids if run_id not in dom]
    if "Error while loading" in dom or missing:
        raise ScreenshotError(
            f"the MLflow UI did not show the runs ({len(missing)} of {len(run_ids)} missing)"
        )
    with Image.open(png) as image:
        size, colours = image.size, image.convert("RGB").getcolors(maxcolors=4096)
    if size != window:
        raise ScreenshotError(f"screenshot is {size[0]}x{size[1]}, expected {window[0]}x{window[1]}")
    if colours is not None and len(colours) < 16:  # None: more than 4096 colours
        raise ScreenshotError(f"screenshot is blank ({len(colours)} colours)")


def end_process_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the group ``proc`` leads (mlflow + uvicorn, chromium + helpers); SIGKILL after ``grace`` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader: a zombie would keep the group alive
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
