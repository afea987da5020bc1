"""The MLflow UI's run comparison of one sweep as a PNG (``report/mlflow_compare.png``), by headless Chromium.

The page is MLflow's compare-runs view of the sweep's child runs (one per variant, the reference first):
parallel-coordinates plot, run details, parameters, metrics. The plot's axes are the quality metrics against
bits/weight and speed (:data:`AXES`): the UI starts with three differing parameters and one metric, so bitsweep
drives Chromium through the DevTools protocol (over ``--remote-debugging-pipe``: no port, no extra package) and
sets the plot's selection with the panel's own handlers before it takes the picture. An http(s) tracking URI is opened as it is; any
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
# Chromium reaches the temporary server under this name (mapped to 127.0.0.1): on a localhost address
# MLflow 3.17's UI opens its Assistant side panel on first load, over a fifth of the page.
ALIAS = "bitsweep-mlflow"


# The parallel-coordinates axes, left to right; the last one colours the lines (the UI's choice). Metrics a run
# lacks (the reference has no KLD to itself) leave that run's line out of the plot only.
AXES = ["bpw", "tg_tok_s", "top1", "ppl_ratio", "kld"]
# Selects the parallel-coordinates axes through the React component's own handlers (the class component that
# has handleParamsSelectChange / handleMetricsSelectChange, found by walking up the fibers of the plot's DOM).
SELECT_AXES_JS = """(() => {
  const metrics = %s;
  const starts = [...document.querySelectorAll('.js-plotly-plot'), ...document.querySelectorAll('*')];
  for (const el of starts) {
    const key = Object.keys(el).find((k) => k.startsWith('__reactFiber$'));
    for (let fiber = key && el[key]; fiber; fiber = fiber.return) {
      const panel = fiber.stateNode;
      if (panel && panel.handleMetricsSelectChange && panel.handleParamsSelectChange) {
        panel.handleParamsSelectChange([]);
        panel.handleMetricsSelectChange(metrics);
        return true;
      }
    }
  }
  return false;
})()"""


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
    axes = plotted_axes(info["uri"], list(runs))
    start = time.monotonic()
    with (
        mlflow_ui(info["uri"]) as (base, browser_args),
        tempfile.TemporaryDirectory(prefix="bitsweep-shot-") as tmp,
    ):
        url = compare_url(base, list(runs), [info["experiment_id"]])
        png = Path(tmp) / "page.png"
        dom = render(
            chromium,
            url,
            png,
            window,
            [*browser_args, f"--user-data-dir={Path(tmp) / 'profile'}"],
            list(runs),
            axes,
        )
        check_page(dom, png, list(runs), window)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".tmp")
        shutil.copyfile(png, partial)
        os.replace(partial, out)
    log.info(
        "MLflow compare view of %d runs -> %s in %.1f s: %s", len(runs), out, time.monotonic() - start, url
    )
    return {"url": url, "runs": list(runs.values()), "axes": axes}


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


def plotted_axes(uri: str, run_ids: list[str]) -> list[str]:
    """:data:`AXES` that at least two of the runs logged (a plot axis needs values to spread)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    logged = [set(client.get_run(run_id).data.metrics) for run_id in run_ids]
    return [axis for axis in AXES if sum(axis in keys for keys in logged) >= 2]


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


def chromium_command(chromium: str, window: tuple[int, int], extra: list[str]) -> list[str]:
    # --no-sandbox: Chromium will not run as root with its sandbox; the page is our own local UI.
    # --enable-unsafe-swiftshader: software WebGL for the parallel-coordinates plot (the silent fallback is
    # deprecated). --remote-debugging-pipe: DevTools commands on fd 3, replies on fd 4.
    return [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
            "--hide-scrollbars", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--window-size={window[0]},{window[1]}", "--remote-debugging-pipe", *extra, "about:blank"]  # fmt: skip


class DevTools:
    """The Chrome DevTools Protocol over ``--remote-debugging-pipe``: JSON messages ended by a NUL byte, commands
    written to the browser's fd 3, replies and events read from its fd 4."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def wire_fds() -> None:  # in the child, before exec: the pipe ends become its fds 3 and 4
            os.dup2(commands_read, 3)
            os.dup2(replies_write, 4)

        self.log_path = log_path
        with open(log_path, "wb") as log_file:  # a file, not a pipe: chromium's chatter must never block it
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True, close_fds=False, preexec_fn=wire_fds)  # fmt: skip
        os.close(commands_read)
        os.close(replies_write)
        self._buffer, self._next_id = b"", 0

    def send(
        self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60
    ) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._messages(deadline, method):
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise ScreenshotError(f"chromium: {method}: {reply['error'].get('message')}")
                    return reply.get("result", {})

    def _messages(self, deadline: float, method: str) -> list[dict]:
        import select

        ready, _, _ = select.select([self._replies], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(self._replies, 1 << 20) if ready else b""
        if not chunk:
            raise ScreenshotError(f"chromium did not answer {method}" + ("" if ready else " in time"))
        *complete, self._buffer = (self._buffer + chunk).split(b"\0")
        return [json.loads(part) for part in complete if part]

    def evaluate(self, expression: str, session: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        return result.get("result", {}).get("value")

    def close(self) -> None:
        with contextlib.suppress(OSError, ScreenshotError):
            self.send("Browser.close", timeout=5)
        for fd in (self._commands, self._replies):
            with contextlib.suppress(OSError):
                os.close(fd)
        end_process_group(self.proc, grace=5)


def render(
    chromium: str, url: str, png: Path, window: tuple[int, int], extra: list[str], run_ids: list[str],
    axes: list[str] = AXES, timeout: float = 180,
) -> str:  # fmt: skip
    """Load ``url`` headless, wait until every run is on the page, set the parallel-coordinates axes, write the
    screenshot to ``png`` and return the rendered DOM."""
    browser = DevTools(chromium_command(chromium, window, extra), png.with_suffix(".log"))
    deadline = time.monotonic() + timeout
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": window[0], "height": window[1], "deviceScaleFactor": 1, "mobile": False}, session)  # fmt: skip
        browser.send("Page.navigate", {"url": url}, session)
        dom = _wait_for(
            browser,
            session,
            deadline,
            lambda html: all(r in html for r in run_ids) and "js-plotly-plot" in html,
        )
        if not browser.evaluate(SELECT_AXES_JS % json.dumps(axes), session):
            raise ScreenshotError("the MLflow UI has no parallel-coordinates panel to set the axes of")
        # plotly draws each axis's name as SVG text once the new selection is rendered
        dom = _wait_for(browser, session, deadline, lambda html: all(f">{axis}<" in html for axis in axes))
        time.sleep(1.0)  # let plotly finish its transition before the picture
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session)
        dom = browser.evaluate("document.documentElement.outerHTML", session) or dom
    except ScreenshotError as err:
        lines = (
            browser.log_path.read_text(errors="replace").strip().splitlines()
            if browser.log_path.is_file()
            else []
        )
        raise ScreenshotError(f"{err} (page {url})" + (f": {lines[-1]}" if lines else "")) from None
    finally:
        browser.close()
    import base64

    png.write_bytes(base64.b64decode(shot["data"]))
    return dom


def _wait_for(browser: DevTools, session: str, deadline: float, ready) -> str:
    while True:
        html = browser.evaluate("document.documentElement.outerHTML", session) or ""
        if ready(html):
            return html
        if time.monotonic() > deadline:
            raise ScreenshotError("the MLflow UI did not finish rendering in time")
        time.sleep(0.5)


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
