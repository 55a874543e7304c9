"""Opt-in: the real ComfyUI web UI (comfyui-frontend-package 1.32.9) in headless Chromium loads every
shipped workflow, and its own graphToPrompt() gives exactly the API prompt that
workflow_convert.to_api_prompt() gives, which the other tests run.

Needs Chromium (`apt-get install chromium`) and COMFY_FRONTEND_TESTS=1; about 30 s.
"""

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest
from comfy_harness import PACK_NAME, REPO, ComfyServer, free_port, needs_comfyui, write_example_image
from workflow_convert import to_api_prompt

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    needs_comfyui,
    pytest.mark.skipif(os.environ.get("COMFY_FRONTEND_TESTS") != "1" or CHROMIUM is None,
                       reason="opt-in: COMFY_FRONTEND_TESTS=1 and chromium on PATH"),
]


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


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_ui")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    (base / "input").mkdir()
    write_example_image(base / "input" / "example.png")
    server = ComfyServer(base, frontend=True).start()
    browser = None
    try:
        browser = Browser(server.url + "/")
        deadline = time.monotonic() + 90
        while not browser.js("!!(window.app && window.app.graph && window.app.graph.nodes !== undefined)"):
            assert time.monotonic() < deadline, "the web UI did not start"
            time.sleep(0.5)
        yield server, browser
    finally:
        if browser is not None:
            browser.close()
        server.stop()


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_frontend_queues_what_the_tests_run(ui, path):
    server, browser = ui
    workflow = json.loads(path.read_text())
    browser.js(f"window.app.loadGraphData({json.dumps(workflow)})")
    queued = json.loads(browser.js("window.app.graphToPrompt().then(p => JSON.stringify(p.output))"))
    queued = {node: {k: v for k, v in spec.items() if k != "_meta"} for node, spec in queued.items()}
    assert queued == to_api_prompt(workflow, server.get("/object_info"))
    shot = browser.call("Page.captureScreenshot", format="png")
    (server.base / f"{path.stem}.png").write_bytes(base64.b64decode(shot["data"]))
