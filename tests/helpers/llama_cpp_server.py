"""llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`, the [server]
extra) on loopback: a real remote backend for system tests."""
import subprocess
import sys
import tempfile
import time

from helpers.daemon import free_port
from helpers.http import request


class LlamaCppServer:
    def __init__(self, model: str, n_ctx: int = 4096):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
                                      "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", "1"],
                                     stdout=self._log_file(), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(self.port, "GET", "/v1/models", timeout=2).status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not start")
            time.sleep(0.2)

    def _log_file(self):
        self.log = tempfile.TemporaryFile()
        return self.log

    def log_tail(self, n: int = 2000) -> str:
        """The end of the server's own output (for a test's failure message)."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
