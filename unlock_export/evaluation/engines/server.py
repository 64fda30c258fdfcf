"""What the server engines share: finding an engine's executable, and a stock HTTP inference server
started on 127.0.0.1 on a free port, stopped here, with several requests in flight."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...errors import UserError
from . import EngineLost


def find_executable(option: str | None, env: str, cached: list[Path], on_path: str, what: str, hint: str) -> Path:
    """An engine executable: the option, else $ENV, else the engines cache, else PATH."""
    for candidate in (option, os.environ.get(env)):
        if candidate:
            if not Path(candidate).is_file():
                raise UserError(f"{what} '{candidate}' not found")
            return Path(candidate)
    if cached:
        return cached[0]
    found = shutil.which(on_path)
    if found:
        return Path(found)
    raise UserError(f"{what} not found: {hint}")



class LocalServer:
    """A stock HTTP inference server on 127.0.0.1, started and stopped here, `parallel` requests in flight."""

    name = "server"

    def __init__(self, parallel: int, startup_timeout: float):
        self.parallel, self.startup_timeout = parallel, startup_timeout
        self.proc = None
        self.port = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _retry_after_crash(self, returncode: int) -> bool:
        """Whether to start again (with other flags) after the server died at start with `returncode`."""
        return False

    def _env(self) -> dict:
        return dict(os.environ)

    def _log_tail(self, lines: int = 3) -> str:
        self._log.seek(0)
        tail = self._log.read().decode(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(line.strip() for line in tail)

    def __enter__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT, env=self._env(),
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                if self._retry_after_crash(self.proc.returncode):
                    return self.__enter__()
                raise UserError(f"{self.name} could not start on '{self.model}': {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise UserError(f"{self.name} did not start within {self.startup_timeout:.0f} s")
            time.sleep(0.5)

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:  # a server left by an interrupt or a failure is not waited on to finish the answers it holds
                self.proc.wait(timeout=30 if exc[0] is None else 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        return False

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=3600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise UserError(f"{self.name} refused a request ({exc.code}): {detail}") from None
        except (OSError, json.JSONDecodeError) as exc:  # refused, reset, timed out, cut off mid-answer
            gone = self.proc is None or self.proc.poll() is not None
            state = f"exited with code {self.proc.returncode}" if gone and self.proc else "stopped answering"
            raise EngineLost(f"{self.name} {state} ({type(exc).__name__})") from None

    gives_prefixes = False  # whether generate can return the texts of an answer's first tokens (prefixes)

    def _one(self, text: str, max_new_tokens: int, prefixes: tuple[int, ...] = ()) -> tuple:
        raise NotImplementedError

    def generate(self, texts: list[str], max_new_tokens: int, progress=None, prefixes: tuple[int, ...] = ()) -> list:
        """(text, generated tokens) per prompt, `parallel` requests in flight; with `prefixes` (where the
        engine gives_prefixes), a third item as TransformersEngine.generate's."""
        def job(text):
            result = self._one(text, max_new_tokens, prefixes) if prefixes else self._one(text, max_new_tokens)
            if progress:
                progress(1)
            return result

        # not `with`: its exit waits for every queued request, so an interrupt (Ctrl-C, SIGTERM) or a failed
        # request would answer the whole chunk first. The queue is dropped instead; the requests in flight
        # end when the server is stopped (__exit__)
        pool = ThreadPoolExecutor(self.parallel)
        try:
            return list(pool.map(job, texts))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
