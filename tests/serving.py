"""Run `scripts/serve.py` as a real process on a free localhost port, for the serve tests and the benchmark."""

import contextlib
import dataclasses
import socket
import subprocess
import sys
import tempfile
import time

import requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclasses.dataclass
class RunningServer:
    url: str
    process: subprocess.Popen


@contextlib.contextmanager
def running_server(arguments: list[str], port: int, cwd, env: dict, startup_seconds: float = 180):
    """Start `python ARGUMENTS` (a server listening on `port`), yield it once /health answers, always stop it.

    A server that exits or does not answer in time raises RuntimeError with the end of its output.
    """
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([sys.executable, *arguments], cwd=cwd, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + startup_seconds
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    what = f"exited ({process.returncode})" if process.poll() is not None else "did not start"
                    raise RuntimeError(f"the server {what}:\n{log.read().decode(errors='replace')[-3000:]}")
                try:
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.3)
            yield RunningServer(url, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
