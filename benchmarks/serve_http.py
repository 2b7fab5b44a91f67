"""The HTTP side of the serving benchmark: each engine's OpenAI server as a subprocess, and
the streaming client that times one ``/v1/completions`` request.

A server runs in its own session (process group), so pausing (``SIGSTOP``/``SIGCONT``) and
stopping reach every process it started (vLLM runs its engine core as a child process). The
client sends token-id prompts and reads the generated tokens back from the streamed text: the
benchmark's tokenizer spells token ``i`` as the word ``t<i>`` (``serve.write_tokenizer``), so
the text of a stream names its token ids exactly, whatever an engine's detokenizer does with
spaces.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKEN_WORD = re.compile(r"t(\d+)")
"""How the benchmark's tokenizer spells a token id in text."""
PHASE_COUNTER = re.compile(
    r'^jaxstack_engine_phase_seconds_total\{phase="(?P<phase>[^"]+)"\}\s+(?P<value>\S+)', re.M
)
"""The engine's step profile in its Prometheus text: seconds spent per phase."""


@dataclasses.dataclass
class Completion:
    """One request as the client saw it: perf_counter times of the submission, the first and
    last output token, and the output token ids."""

    submitted: float
    first: float
    last: float
    token_ids: list[int]


def token_ids_of(text: str) -> list[int]:
    """The token ids that the benchmark's tokenizer decoded into ``text``."""
    return [int(number) for number in TOKEN_WORD.findall(text)]


def phase_seconds(metrics_text: str) -> dict[str, float] | None:
    """The engine's seconds per step phase from its ``/metrics`` text, or None where the
    server does not export ``jaxstack_engine_phase_seconds_total``."""
    found = {m["phase"]: float(m["value"]) for m in PHASE_COUNTER.finditer(metrics_text)}
    return found or None


def get(url: str) -> httpx.Response:
    """GET a local server's ``url`` (no proxy from the environment)."""
    return httpx.get(url, timeout=10, trust_env=False)


def jaxstack_command(model_dir: Path, port: int, dtype: str, extra: list[str]) -> list[str]:
    """``jaxstack serve`` of ``model_dir`` on ``port``, with this interpreter."""
    return [sys.executable, "-m", "jaxstack.cli", "serve", "--hf", str(model_dir),
            "--port", str(port), "--dtype", dtype, *extra]  # fmt: skip


def vllm_command(python: str, model_dir: Path, port: int, dtype: str, kv_cache_gib: float,
                 extra: list[str]) -> list[str]:  # fmt: skip
    """vLLM's OpenAI server of ``model_dir`` on ``port``, with the interpreter of its venv;
    the served model is named ``bench``. Its KV cache takes ``kv_cache_gib`` (without it,
    vLLM's CPU backend reserves 92% of the machine's memory and refuses to start where
    other processes hold more than 8%)."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "bench", "--port", str(port), "--dtype", dtype,
            "--kv-cache-memory-bytes", str(round(kv_cache_gib * 2**30)), *extra]  # fmt: skip


class ServerProcess:
    """An OpenAI-compatible server started as a subprocess in its own process group, its
    output in ``log_path``.

    Args:
        name: the engine, for messages.
        command: the server's argv.
        port: where it listens on 127.0.0.1.
        log_path: file receiving its stdout and stderr.
        env: extra environment variables.
    """

    def __init__(self, name: str, command: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None):  # fmt: skip
        self.name, self.command, self.log_path = name, command, log_path
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "w")  # noqa: SIM115 (open while the server runs)
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from the process start to its first ``/health`` 200.

        Raises:
            RuntimeError: the process exited, or was not ready within ``timeout_s`` (with
                the end of its log).
        """
        while time.perf_counter() - self.started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")  # fmt: skip
            try:
                if get(f"{self.url}/health").status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server's output."""
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server and its child processes."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def pause(self) -> None:
        """Stop every process of the server (``SIGSTOP``) so it takes no CPU."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused server (``SIGCONT``)."""
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Terminate the server's process group (``SIGKILL`` after 30 s)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


async def stream_completion(client: httpx.AsyncClient, url: str, prompt: list[int],
                            max_tokens: int) -> Completion:  # fmt: skip
    """POST one streamed, greedy ``/v1/completions`` request of token ids (EOS ignored) and
    time its tokens as they arrive.

    Raises:
        RuntimeError: the server answered an error, or the tokens read from the stream do not
            add up to the ``completion_tokens`` of its usage chunk.
    """
    body = dict(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                ignore_eos=True, stream=True, stream_options={"include_usage": True})  # fmt: skip
    submitted = time.perf_counter()
    first = last = None
    tokens: list[int] = []
    usage = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"{url} answered {response.status_code}: {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(f"{url} failed mid-stream: {event['error']}")
            usage = event.get("usage") or usage
            new = token_ids_of("".join(c.get("text") or "" for c in event.get("choices", [])))
            if new:
                last = time.perf_counter()
                first = first or last
                tokens += new
    if usage is None or usage["completion_tokens"] != len(tokens):
        raise RuntimeError(f"{url}: read {len(tokens)} tokens from the stream but its usage "
                           f"says {usage and usage['completion_tokens']}")  # fmt: skip
    return Completion(submitted, first or submitted, last or submitted, tokens)
