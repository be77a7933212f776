"""Drive the course notebooks in JupyterLab in a real browser: a JupyterLab server on a temporary copy of
notebooks/, and the steps a learner takes on one notebook (open, clear, Run All, look, change an explorer).

Every check collects what went wrong into a list of problems instead of raising, so that one notebook's run still
ends with its screenshot and timings whatever failed; the tests assert that the list is empty.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout

from mini_deepseek.explorer import CONTROL_CLASS, EXPLORER_CLASS, OUTPUT_CLASS

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUNS: list[NotebookRun] = []  # every notebook run of this pytest session, for the summary table (conftest.py)
# JupyterLab settings for the test server: no autosave (nothing is written behind our back) and no news or
# update pop-ups over the notebook.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def run_timeout_s() -> float:
    """How long Run All may take per notebook: quick mode's 3 min budget with room for the browser and a busy
    machine, unless $MINI_DEEPSEEK_BROWSER_TIMEOUT says otherwise."""
    return float(os.environ.get("MINI_DEEPSEEK_BROWSER_TIMEOUT", "600"))


def find_chromium() -> str | None:
    """The Chromium to drive: $MINI_DEEPSEEK_CHROMIUM, else Debian's `chromium` on PATH (Playwright's own browser
    download is never used)."""
    explicit = os.environ.get("MINI_DEEPSEEK_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JupyterLabServer:
    """`jupyter lab` from this Python's environment on a free local port with a random token, serving a copy of
    notebooks/ in `workdir`, in quick mode, with PYTHONPATH so that its kernels import this checkout's package.

    Its configuration, data, runtime, IPython and settings folders all live in workdir, so the learner's own
    Jupyter setup (kernelspecs, settings, startup files) plays no part. The log (server and kernels) is
    workdir/jupyter.log.
    """

    def __init__(self, workdir: Path, notebooks: Path = NOTEBOOK_DIR):
        self.workdir = workdir
        self.root = workdir / "notebooks"
        shutil.copytree(notebooks, self.root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        self.token = secrets.token_hex(16)
        self.port = 0
        self.log_path = workdir / "jupyter.log"
        self.process: subprocess.Popen | None = None
        for relative, values in LAB_SETTINGS.items():
            path = workdir / "settings" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env["MINI_DEEPSEEK_QUICK"] = "1"
        for name, folder in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                             ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")]:
            env[name] = str(self.workdir / folder)
        env.pop("JUPYTER_PATH", None)
        return env

    def start(self, timeout_s: float = 180, attempts: int = 3) -> None:
        for _ in range(attempts):  # another program may take the free port between our probe and the bind
            self.port = free_port()
            command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                       f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                       f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
                       "--ServerApp.terminals_enabled=False", "--LabApp.expose_app_in_browser=True",
                       f"--LabApp.user_settings_dir={self.workdir / 'settings'}",
                       f"--LabApp.workspaces_dir={self.workdir / 'workspaces'}"]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                command.append("--allow-root")  # CI runs as root
            with open(self.log_path, "ab") as log:
                # a session of its own, so that stop() can end the server's process group and nothing else
                self.process = subprocess.Popen(command, cwd=self.root, env=self.environment(), stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    self.api("GET", "status")
                    return
                except OSError:
                    time.sleep(0.5)
            if self.process.poll() is None:
                self.stop()
                raise RuntimeError(f"jupyter lab did not answer within {timeout_s:.0f} s; log {self.log_path}:\n"
                                   + self.log_tail())
        raise RuntimeError(f"jupyter lab exited with code {self.process.returncode}; log {self.log_path}:\n"
                           + self.log_tail())

    def api(self, method: str, path: str, timeout_s: float = 10) -> object:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"},
                                         data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
        return json.loads(body) if body else None

    def url(self, notebook: str) -> str:
        # a workspace of its own per notebook, so that opening one never restores another (and starts its kernel)
        workspace = re.sub(r"[^A-Za-z0-9_-]", "-", Path(notebook).stem)
        return f"http://127.0.0.1:{self.port}/lab/workspaces/{workspace}/tree/{notebook}?token={self.token}"

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def log_tail(self, n_chars: int = 4000) -> str:
        return self.log_since(max(0, self.log_size() - n_chars))

    def stop(self) -> None:
        """Shut the kernels and the server down through the REST API; end the server's process group if it is
        still there after 20 s (kernels run in sessions of their own, which is why they go first)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            for kernel in self.api("GET", "kernels"):
                self.api("DELETE", f"kernels/{kernel['id']}", timeout_s=30)
            self.api("POST", "shutdown")
        except (OSError, urllib.error.HTTPError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


# --- JavaScript run in the page; window.jupyterapp is there because of --LabApp.expose_app_in_browser ------------

# Finds the open notebook once its kernel is idle, keeps it as window.__mdPanel, and starts collecting the errors the
# kernel reports while it handles widget messages: a callback that raises inside an Output widget shows there, but
# one that raises outside (an observer) sends an error that no cell shows.
FIND_PANEL_JS = """(path) => {
  const app = window.jupyterapp;
  if (!app || !app.shell) return false;
  for (const w of app.shell.widgets('main')) {
    if (w.context && w.context.path === path && w.sessionContext && w.sessionContext.session
        && w.sessionContext.session.kernel && w.sessionContext.session.kernel.status === 'idle'
        && w.content && w.content.widgets.length > 0) {
      window.__mdPanel = w;
      window.__mdWidgetErrors = [];
      w.sessionContext.session.kernel.iopubMessage.connect((_, msg) => {
        if (!msg.parent_header || msg.parent_header.msg_type !== 'comm_msg') return;
        if (msg.header.msg_type === 'error') window.__mdWidgetErrors.push(msg.content.ename + ': ' + msg.content.evalue);
        if (msg.header.msg_type === 'stream' && msg.content.name === 'stderr'
            && /Traceback|Exception in comm_msg/.test(msg.content.text)) window.__mdWidgetErrors.push(msg.content.text);
      });
      return true;
    }
  }
  return false;
}"""

START_RUN_ALL_JS = """async () => {
  const app = window.jupyterapp;
  app.shell.activateById(window.__mdPanel.id);
  await app.commands.execute('notebook:clear-all-cell-outputs');
  window.__mdRunAll = 'running';
  app.commands.execute('notebook:run-all-cells').then(
    (ok) => { window.__mdRunAll = ok ? 'done' : 'stopped'; },
    (err) => { window.__mdRunAll = 'failed: ' + err; });
}"""

RUN_ALL_FINISHED_JS = """() => {
  const status = window.__mdPanel.sessionContext.session.kernel.status;
  return (window.__mdRunAll !== 'running' && status === 'idle') || status === 'dead';
}"""

KERNEL_IDLE_JS = "() => window.__mdPanel.sessionContext.session.kernel.status === 'idle'"

CELLS_JS = """() => window.__mdPanel.content.widgets.map((cell, index) => ({
  index, type: cell.model.type,
  executionCount: cell.model.type === 'code' ? cell.model.executionCount : null,
  prompt: cell.model.type === 'code' ? (cell.node.querySelector('.jp-InputPrompt') || {}).textContent || '' : '',
  source: cell.model.sharedModel.getSource().slice(0, 80),
  errors: cell.model.type === 'code' ? cell.model.outputs.toJSON().filter(o => o.output_type === 'error')
                                            .map(o => o.ename + ': ' + o.evalue) : [],
}))"""

# Run code in the notebook's kernel on the side: the request is ours, so no cell shows its output, and
# store_history=False leaves the execution counter alone.
KERNEL_EXEC_JS = """async (code) => {
  const future = window.__mdPanel.sessionContext.session.kernel.requestExecute(
      {code, silent: false, store_history: false});
  let text = '';
  future.onIOPub = (msg) => {
    if (msg.header.msg_type === 'stream') text += msg.content.text;
    if (msg.header.msg_type === 'error') text += 'KERNEL ERROR ' + msg.content.ename + ': ' + msg.content.evalue;
  };
  await future.done;
  return text;
}"""

# What the kernel holds: every live widget that has a view (ipywidgets.DOMWidget: controls, boxes, outputs, tqdm's
# bars; not Layout or Style models, which never render on their own), the controls among them, and the error
# outputs that Output widgets caught (an explorer whose callback raised).
KERNEL_WIDGETS_CODE = """
def __md_widget_report():
    import json
    import ipywidgets
    from ipywidgets.widgets.widget import _instances  # ipywidgets 8's registry of live widgets
    passive = (ipywidgets.FloatProgress, ipywidgets.IntProgress, ipywidgets.HTML, ipywidgets.HTMLMath,
               ipywidgets.Label, ipywidgets.Valid)
    live = {key: w for key, w in list(_instances.items()) if isinstance(w, ipywidgets.DOMWidget)}
    print(json.dumps({
        "views": {key: [type(w).__name__, str(getattr(w, "description", "") or "")] for key, w in live.items()},
        "controls": sorted(str(getattr(w, "description", "") or type(w).__name__) for w in live.values()
                           if isinstance(w, ipywidgets.ValueWidget) and not isinstance(w, passive)),
        "errors": [o.get("ename", "?") + ": " + o.get("evalue", "")
                   for w in live.values() if isinstance(w, ipywidgets.Output)
                   for o in w.outputs if o.get("output_type") == "error"],
    }))
__md_widget_report()
del __md_widget_report
"""

# For each widget model id: how many of its views are attached to the page. The frontend's widget manager is
# reached through a widget output renderer in the notebook (its _manager); each model keeps its views by id.
VIEWS_JS = """async (ids) => {
  const stack = [window.__mdPanel];
  let manager = null;
  while (stack.length && !manager) {
    const widget = stack.pop();
    if (widget.mimeType === 'application/vnd.jupyter.widget-view+json' && widget._manager && widget._manager.promise) manager = await widget._manager.promise;
    else for (const child of widget.children()) stack.push(child);
  }
  const counts = {};
  for (const id of ids) {
    counts[id] = 0;
    if (!manager || !manager.has_model(id)) continue;
    const model = await manager.get_model(id);
    const views = await Promise.all(Object.values(model.views || {}));
    counts[id] = views.filter(view => view && view.el && view.el.isConnected).length;
  }
  return {managerFound: !!manager, counts,
          errorText: [...window.__mdPanel.node.querySelectorAll('.jupyter-widgets')]
                        .filter(el => el.textContent.startsWith('Error displaying widget')).length};
}"""

# What an explorer's output shows: its text, and a digest of its images (a redrawn plot changes no text).
OUTPUT_SIGNATURE_JS = """(el) => {
  let digest = 0;
  for (const img of el.querySelectorAll('img')) for (let i = 0; i < img.src.length; i++)
    digest = (digest * 31 + img.src.charCodeAt(i)) | 0;
  return el.innerText.trim() + ' [images ' + el.querySelectorAll('img, svg').length + ' #' + digest + ']';
}"""

# what the server or a kernel writes to the log when something raised where no cell shows it
ERROR_IN_LOG = re.compile(r"Traceback \(most recent call last\)|Exception in comm_msg|Exception opening comm")


@dataclass(frozen=True)
class Probe:
    """One explorer of a notebook that does not build it with mini_deepseek.explorer.explorer(): the control to
    change (found by its description label) and the element, within the control's cell, that must change."""

    control: str  # the description label of the control, e.g. "batch"
    output: str = ".widget-output"  # CSS selector, inside the control's cell, of what must show something new


@dataclass
class NotebookRun:
    """What happened to one notebook in the browser: timings, widgets counted, problems found."""

    name: str
    problems: list[str] = field(default_factory=list)
    open_s: float = 0.0  # from loading the page to the notebook open with an idle kernel
    run_s: float = 0.0  # Run All, until every cell ran and the kernel went idle
    probe_s: float = 0.0  # changing one control per explorer and watching its output
    widget_models: int = 0  # live DOM widget models in the kernel after Run All
    widget_views: int = 0  # their views attached to the page
    explorers: list[str] = field(default_factory=list)  # one line per explorer probed: what changed
    screenshot: Path | None = None
    console_errors: list[str] = field(default_factory=list)


class NotebookSession:
    """One notebook in its own browser page: open, clear outputs, Run All, then the checks."""

    def __init__(self, browser, server: JupyterLabServer, name: str, run_timeout_s: float,
                 change_timeout_s: float = 60):
        self.server = server
        self.name = name
        self.run_timeout_s = run_timeout_s
        self.change_timeout_s = change_timeout_s
        self.result = NotebookRun(name)
        self.first_error_cell: int | None = None
        self.output_errors_seen: set[str] = set()
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.on("pageerror", self.on_page_error)
        self.page.on("console", self.on_console)
        self.log_offset = server.log_size()

    def on_page_error(self, error) -> None:
        self.result.problems.append(f"uncaught error in the page: {error}")

    def on_console(self, message) -> None:
        if message.type == "error":  # kept for the report; JupyterLab logs some harmless ones (e.g. a 404)
            self.result.console_errors.append(message.text[:300])

    # --- steps ----------------------------------------------------------------------------------------------------

    def open(self, timeout_s: float = 180) -> None:
        start = time.perf_counter()
        self.page.goto(self.server.url(self.name), timeout=timeout_s * 1000)
        self.page.wait_for_function(FIND_PANEL_JS, arg=self.name, timeout=timeout_s * 1000, polling=250)
        self.result.open_s = time.perf_counter() - start

    def run_all(self) -> bool:
        """Clear every output, Run All, wait (bounded) until the run ends and the kernel is idle."""
        start = time.perf_counter()
        self.page.evaluate(START_RUN_ALL_JS)
        try:
            self.page.wait_for_function(RUN_ALL_FINISHED_JS, timeout=self.run_timeout_s * 1000, polling=500)
        except PlaywrightTimeout:
            running = [c for c in self.cells() if c["prompt"].strip() == "[*]:"]
            where = f"cell {running[0]['index']} ({running[0]['source']!r})" if running else "no cell shows [*]"
            self.result.problems.append(f"Run All did not finish within {self.run_timeout_s:.0f} s; still running: "
                                        f"{where}")
            return False
        finally:
            self.result.run_s = time.perf_counter() - start
        status = self.page.evaluate("() => window.__mdPanel.sessionContext.session.kernel.status")
        if status == "dead":
            self.result.problems.append(f"the kernel died during Run All (see {self.server.log_path})")
            return False
        return True

    def cells(self) -> list[dict]:
        return self.page.evaluate(CELLS_JS)

    def kernel_widgets(self) -> dict:
        """The kernel's widget report (KERNEL_WIDGETS_CODE), run on the side of the notebook's own cells."""
        text = self.page.evaluate(KERNEL_EXEC_JS, KERNEL_WIDGETS_CODE)
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise RuntimeError(f"the kernel's widget report is not JSON: {text[:500]!r}") from error

    # --- checks ---------------------------------------------------------------------------------------------------

    def check_cells(self) -> None:
        """No cell has an error output and every code cell ran."""
        for cell in self.cells():
            if cell["errors"]:
                self.first_error_cell = cell["index"] if self.first_error_cell is None else self.first_error_cell
                self.result.problems.append(f"cell {cell['index']} ({cell['source']!r}) has an error output: "
                                            + "; ".join(cell["errors"]))
            elif cell["type"] == "code" and cell["executionCount"] is None and cell["source"].strip():
                self.result.problems.append(f"cell {cell['index']} ({cell['source']!r}) did not run")

    def check_widget_views(self, settle_s: float = 30) -> dict:
        """Every DOM widget the kernel holds has a view attached to the page. Returns the kernel's report.

        Method: the kernel lists its live ipywidgets.DOMWidget models by model id (controls, boxes, Output
        widgets, tqdm's bars; not Layout or Style models, which never render on their own); the page's widget
        manager gives each model's views, and a view counts when its element is attached to the document. Views
        render asynchronously, so this waits up to settle_s for the last ones. A widget output that reads "Error
        displaying widget" is a problem too.
        """
        report = self.kernel_widgets()
        ids = list(report["views"])
        deadline = time.monotonic() + settle_s
        while True:
            found = self.page.evaluate(VIEWS_JS, ids)
            missing = [i for i in ids if found["counts"][i] == 0]
            if (not missing and not found["errorText"]) or time.monotonic() > deadline:
                break
            time.sleep(1)
        self.result.widget_models = len(ids)
        self.result.widget_views = sum(found["counts"].values())
        if ids and not found["managerFound"]:
            self.result.problems.append(f"the kernel holds {len(ids)} widgets but the page has no widget "
                                        "renderer (is @jupyter-widgets/jupyterlab-manager installed?)")
        elif missing:
            names = ", ".join(f"{report['views'][i][0]}({report['views'][i][1]!r})" for i in missing)
            self.result.problems.append(f"{len(missing)} of {len(ids)} widgets have no view on the page: {names}")
        if found["errorText"]:
            self.result.problems.append(f"{found['errorText']} widget output(s) read 'Error displaying widget'")
        self.check_output_widget_errors(report)
        return report

    def check_output_widget_errors(self, report: dict | None = None) -> None:
        """Errors that Output widgets caught (an explorer callback that raised); each reported once."""
        for error in (report or self.kernel_widgets())["errors"]:
            if error not in self.output_errors_seen:
                self.output_errors_seen.add(error)
                self.result.problems.append(f"an Output widget shows an error: {error}")

    def probe_explorers(self, probes: list[Probe], controls: list[str]) -> None:
        """Change one control of every explorer through the page and check that its output changed: the first
        control of each `md-explorer` on the page, then each Probe of the notebook's table."""
        start = time.perf_counter()
        targets = []  # (what, control locator, output locator)
        explorers = self.page.locator(f".{EXPLORER_CLASS}")
        for i in range(explorers.count()):
            box = explorers.nth(i)
            targets.append((f"explorer {i + 1}", box.locator(f".{CONTROL_CLASS}").first,
                            box.locator(f".{OUTPUT_CLASS}")))
        for probe in probes:
            control = self.control_by_label(probe.control)
            if control is not None:
                cell = control.locator("xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), "
                                       "' jp-Cell ')][1]")
                targets.append((f"probe {probe.control!r}", control, cell.locator(probe.output)))
        if controls and not targets and not probes:
            self.result.problems.append(
                f"the notebook shows controls ({', '.join(controls[:6])}) but no explorer is probed: build it with "
                "mini_deepseek.explorer.explorer() or add a Probe in tests/browser/explorer_probes.py")
        for what, control, output in targets:
            self.probe_one(what, control, output)
        self.check_output_widget_errors()
        self.result.probe_s = time.perf_counter() - start

    def control_by_label(self, label: str):
        """The one control whose description label reads `label` (controls carry .widget-inline-hbox; boxes
        do not), or None with a problem noted."""
        labels = self.page.locator(".widget-label, .widget-label-basic",
                                   has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))
        controls = self.page.locator(".widget-inline-hbox").filter(has=labels)
        if controls.count() != 1:
            self.result.problems.append(f"probe: {controls.count()} controls are labelled {label!r} (need one)")
            return None
        return controls.first

    def probe_one(self, what: str, control, output) -> None:
        """Change `control`; the output's text or images must differ once the kernel is idle again."""
        if output.count() != 1:
            self.result.problems.append(f"{what}: {output.count()} outputs to watch (need one)")
            return
        control.scroll_into_view_if_needed()
        before = output.evaluate(OUTPUT_SIGNATURE_JS)
        try:
            action = change_control(control)
        except ValueError as error:
            self.result.problems.append(f"{what}: {error}")
            return
        try:
            self.page.wait_for_function(f"([el, before]) => ({OUTPUT_SIGNATURE_JS})(el) !== before",
                                        arg=[output.element_handle(), before],
                                        timeout=self.change_timeout_s * 1000, polling=250)
            self.page.wait_for_function(KERNEL_IDLE_JS, timeout=self.change_timeout_s * 1000, polling=250)
        except PlaywrightTimeout:
            self.result.problems.append(f"{what}: {action}, and the output did not change within "
                                        f"{self.change_timeout_s:.0f} s")
            return
        after = self.settled(output)
        self.result.explorers.append(f"{what}: {action} -> output now {after[:60]!r}")

    def settled(self, output, quiet_s: float = 1.0, timeout_s: float = 30) -> str:
        """The output's signature once it stays the same for quiet_s."""
        last, since, deadline = output.evaluate(OUTPUT_SIGNATURE_JS), time.monotonic(), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = output.evaluate(OUTPUT_SIGNATURE_JS)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
        return last

    def check_kernel_errors(self) -> None:
        """Errors from widget callbacks that no Output widget shows (ipykernel reports an exception raised while it
        handles a widget message, e.g. in an observer, on a channel no cell listens to), and tracebacks in the
        server's log (kernels write there too)."""
        for error in self.page.evaluate("() => window.__mdWidgetErrors"):
            if error not in self.output_errors_seen:
                self.result.problems.append(f"a widget callback raised where no output shows it: {error[:300]}")
        for line in ERROR_IN_LOG.findall(self.server.log_since(self.log_offset)):
            self.result.problems.append(f"the server's log shows {line!r} (see {self.server.log_path})")

    # --- ending ---------------------------------------------------------------------------------------------------

    def screenshot(self, folder: Path) -> None:
        """One picture of the notebook: at its first error cell if there is one, else at its first widget output,
        else at its last cell."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{Path(self.name).stem}.png"
        try:
            cells = self.page.locator(".jp-Notebook .jp-Cell")
            if self.first_error_cell is not None:
                target = cells.nth(self.first_error_cell)
            elif self.page.locator(".widget-output").count():
                target = self.page.locator(".widget-output").first
            else:
                target = cells.last
            if target.count():
                target.scroll_into_view_if_needed(timeout=5000)
            self.page.screenshot(path=path, timeout=30_000)
            self.result.screenshot = path
        except Exception as error:  # the screenshot must not hide the notebook's own problems
            self.result.problems.append(f"no screenshot: {error}")

    def close(self) -> None:
        """Shut the notebook's kernel down (frees its memory for the next notebook) and close the page."""
        try:
            self.page.evaluate("async () => { if (window.__mdPanel) await window.__mdPanel.sessionContext.shutdown(); }")
        except Exception:
            pass  # the server's teardown deletes any kernel left
        self.page.close()


def exercise_notebook(browser, server: JupyterLabServer, name: str, probes: list[Probe], artifacts: Path,
                      run_timeout_s: float, change_timeout_s: float = 60) -> NotebookRun:
    """Everything a learner does with one notebook, checked; returns what happened (problems empty: all good)."""
    session = NotebookSession(browser, server, name, run_timeout_s, change_timeout_s)
    try:
        session.open()
        finished = session.run_all()
        session.check_cells()
        if finished:
            report = session.check_widget_views()
            session.probe_explorers(probes, report["controls"])
        session.check_kernel_errors()
    except Exception as error:  # a step that broke (a timeout, a page that never loaded): report it, keep going
        session.result.problems.append(f"{type(error).__name__}: {str(error)[:1000]}")
    finally:
        session.screenshot(artifacts)
        session.close()
    return session.result


def change_control(control) -> str:
    """Change one ipywidgets control the way a person would, by its kind (read from its CSS classes). Returns what
    was done. Raises ValueError for a kind it does not know."""
    classes = (control.get_attribute("class") or "").split()
    label = control.locator(".widget-label, .widget-label-basic").first
    name = (label.text_content() or "").strip() if label.count() else ""
    if "widget-dropdown" in classes or "widget-select" in classes:
        select = control.locator("select")
        n_options = select.locator("option").count()
        if n_options < 2:
            raise ValueError(f"dropdown {name!r} has {n_options} option(s): nothing to change to")
        index = (select.evaluate("s => s.selectedIndex") + 1) % n_options
        select.select_option(index=index)
        return f"picked option {index} of {name!r}"
    if "widget-slider" in classes:
        handle = control.locator(".noUi-handle").first
        before = handle.get_attribute("aria-valuenow")
        handle.press("ArrowRight")
        if handle.get_attribute("aria-valuenow") == before:  # at its maximum
            handle.press("ArrowLeft")
        return f"moved slider {name!r} one step from {before}"
    if "widget-checkbox" in classes:
        control.locator("input[type=checkbox]").click()
        return f"toggled checkbox {name!r}"
    if "widget-toggle-buttons" in classes:
        control.locator("button:not(.mod-active)").first.click()
        return f"pressed another button of {name!r}"
    if "widget-radio" in classes:
        control.locator("input[type=radio]:not(:checked)").first.check()
        return f"picked another radio button of {name!r}"
    if "widget-toggle-button" in classes or "widget-button" in classes:
        control.click()
        return f"clicked button {(control.text_content() or '').strip()!r}"
    box = control.locator("input, textarea").first
    if ("widget-text" in classes or "widget-textarea" in classes) and box.count():
        before = box.input_value()
        if box.get_attribute("type") == "number":
            box.press("ArrowUp")
            if box.input_value() == before:  # at its maximum
                box.press("ArrowDown")
        else:
            box.fill(before + "1")
        if box.evaluate("e => e.tagName") == "INPUT":
            box.press("Enter")
        else:
            box.blur()
        return f"changed {name!r} from {before!r} to {box.input_value()!r}"
    raise ValueError(f"cannot change a widget with classes {' '.join(classes)!r} yet: teach change_control() "
                     "in tests/browser/lab_driver.py")
