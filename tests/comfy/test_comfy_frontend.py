"""Opt-in: the real ComfyUI web UI in headless Chromium loads every shipped workflow, and its own
graphToPrompt() gives exactly the API prompt that workflow_convert.to_api_prompt() gives, which
the other tests run.

It runs once per frontend: the pinned comfyui-frontend-package (1.32.9, installed in
.venv-comfy) and the newest one on PyPI, which scripts/comfy_env.sh installs on its own into
.venv-comfy/frontend-newest (or the folder COMFY_FRONTEND_NEWEST names); the server then gets
`--front-end-root <that folder>/comfyui_frontend_package/static`, the folder ComfyUI itself
serves from the installed package. Each test's id and the terminal say which version it used.

Needs Chromium (`apt-get install chromium`) and COMFY_FRONTEND_TESTS=1; about 15 s a frontend.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from comfy_harness import PACK_NAME, REPO, ComfyServer, free_port, needs_comfyui, write_example_image
from workflow_convert import to_api_prompt

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    needs_comfyui,
    pytest.mark.skipif(os.environ.get("COMFY_FRONTEND_TESTS") != "1" or CHROMIUM is None,
                       reason="opt-in: COMFY_FRONTEND_TESTS=1 and chromium on PATH"),
]
NEWEST_DIR = Path(os.environ.get("COMFY_FRONTEND_NEWEST") or REPO / ".venv-comfy" / "frontend-newest")
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


def package_version(folder: Path | None = None) -> str | None:
    """comfyui-frontend-package's version in this interpreter (folder None) or in a --target folder."""
    try:
        if folder is None:
            return importlib.metadata.version("comfyui-frontend-package")
        found = importlib.metadata.distributions(name="comfyui-frontend-package", path=[str(folder)])
        return next(iter(found)).version
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        return None


PINNED = package_version()
NEWEST = package_version(NEWEST_DIR)
# (label, version, --front-end-root or None for the interpreter's own package, why it is skipped)
FRONTENDS = [
    ("pinned", PINNED, None, None if PINNED else "comfyui-frontend-package is not installed"),
    ("newest", NEWEST, NEWEST_DIR / "comfyui_frontend_package" / "static",
     f"no newest frontend in {NEWEST_DIR} (scripts/comfy_env.sh installs it)" if NEWEST is None
     else "the newest frontend is the pinned one" if NEWEST == PINNED else None),
]


def say(config, line: str) -> None:
    """A line on the terminal even under -q and output capture: which frontend, how long."""
    reporter = config.pluginmanager.getplugin("terminalreporter")
    capture = config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


class Browser:
    """Just enough of the Chrome DevTools Protocol: evaluate JavaScript in one page."""

    def __init__(self, url: str):
        import websocket

        port = free_port()
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
             "--remote-allow-origins=*", "--window-size=1600,1000", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5).read())
                page = next(p for p in pages if p["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")

    def close(self):
        self.ws.close()
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.fixture(scope="module", params=FRONTENDS, ids=lambda f: f"{f[0]}-{f[1]}")
def ui(request, tmp_path_factory):
    label, version, root, skip = request.param
    if skip:
        pytest.skip(f"{label} frontend: {skip}")
    started = time.monotonic()
    base = tmp_path_factory.mktemp(f"comfyui_ui_{label}")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    (base / "input").mkdir()
    write_example_image(base / "input" / "example.png")
    # Not a first start: no templates dialog over the graph in the screenshots.
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text('{"Comfy.TutorialCompleted": true}')
    server = ComfyServer(base, [] if root is None else ["--front-end-root", str(root)], frontend=True).start()
    browser = None
    try:
        browser = Browser(server.url + "/")
        deadline = time.monotonic() + 90
        while not browser.js("!!(window.app && window.app.graph && window.app.graph.nodes !== undefined)"):
            assert time.monotonic() < deadline, "the web UI did not start"
            time.sleep(0.5)
        # The page's own idea of its version: the package's, not some other copy's.
        assert browser.js("window.__COMFYUI_FRONTEND_VERSION__") == version
        say(request.config, f"\nfrontend {label}: comfyui-frontend-package {version}, "
                            f"server and web UI up in {time.monotonic() - started:.1f}s")
        yield server, browser, label
    finally:
        if browser is not None:
            browser.close()
        server.stop()
        say(request.config, f"\nfrontend {label} ({version}): {time.monotonic() - started:.1f}s in all")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_frontend_queues_what_the_tests_run(ui, path):
    server, browser, label = ui
    workflow = json.loads(path.read_text())
    browser.js(f"window.app.loadGraphData({json.dumps(workflow)})")
    queued = json.loads(browser.js("window.app.graphToPrompt().then(p => JSON.stringify(p.output))"))
    queued = {node: {k: v for k, v in spec.items() if k != "_meta"} for node, spec in queued.items()}
    shot = browser.call("Page.captureScreenshot", format="png")
    (server.base / f"{path.stem}.png").write_bytes(base64.b64decode(shot["data"]))
    assert queued == to_api_prompt(workflow, server.get("/object_info"))
