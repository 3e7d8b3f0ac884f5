"""Request-supplied chat templates, rendered in a child process with bounds on size, time,
memory and output.

A template that comes with a request is code from a stranger. `TemplateSandbox` renders it with
transformers' own `render_jinja_template` (the sandboxed jinja environment `apply_chat_template`
uses, so it renders exactly as it would there) in a child process started from this file.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# A request's chat template: its size, and what rendering it may take.
TEMPLATE_MAX_CHARS = 64 << 10
TEMPLATE_OUTPUT_MAX_CHARS = 8 << 20
TEMPLATE_TIMEOUT_S = 5.0
TEMPLATE_MEMORY_BYTES = 1 << 30  # the child's address space, transformers' modules included
_TEMPLATE_START_TIMEOUT_S = 60.0  # importing transformers' renderer, once


class TemplateSandbox:
    """Renders request-supplied chat templates in a child process (`python -I` this file), one
    at a time, with transformers' `render_jinja_template`: the same sandboxed jinja environment
    `apply_chat_template` uses, so a template renders exactly as it would there. Around it: the
    child's address space is capped (TEMPLATE_MEMORY_BYTES: a `'x' * 10**10` fails alone), a
    render that takes over TEMPLATE_TIMEOUT_S has the child killed (a new one starts for the next
    request), and output over TEMPLATE_OUTPUT_MAX_CHARS is refused. The child starts on first use
    and speaks JSON lines (no pickle); it exits when its stdin closes."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strata-chat-template")
        weakref.finalize(self, _kill_holder, self.__dict__)

    async def render(self, template: str, messages: list[dict], add_generation_prompt: bool,
                     context: dict[str, Any]) -> str:
        job = {"template": template, "messages": messages, "add_generation_prompt": add_generation_prompt,
               "context": context}
        reply = await asyncio.get_running_loop().run_in_executor(self._thread, self._call, job)
        if "error" in reply:
            raise ValueError(f"messages: the chat template failed: {reply['error']}")
        return reply["text"]

    def _call(self, job: dict) -> dict:
        with self._lock:
            proc = self._started()
            try:
                proc.stdin.write(json.dumps(job, ensure_ascii=False).encode() + b"\n")
                proc.stdin.flush()
                return json.loads(_read_line(proc, TEMPLATE_TIMEOUT_S))
            except TimeoutError:
                self._stop()
                raise ValueError(f"chat_template took longer than {TEMPLATE_TIMEOUT_S:g} s to render.") from None
            except (OSError, EOFError, ValueError):
                self._stop()  # it died (out of memory beyond MemoryError, a crash): the next call starts anew
                return {"error": "its renderer stopped before it finished (too much memory or output)"}

    def _started(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            if _read_line(self._proc, _TEMPLATE_START_TIMEOUT_S) != b"ready\n":
                raise RuntimeError("the chat template renderer did not start")
        except BaseException:
            self._stop()
            raise
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def _kill_holder(state: dict) -> None:
    if state.get("_proc") is not None:
        _kill(state["_proc"])


def _read_line(proc: subprocess.Popen, timeout_s: float) -> bytes:
    """One line from the child within `timeout_s` (TimeoutError), or EOFError if it ended."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                return b"".join(chunks)


def _template_worker() -> None:
    """The child: caps its memory, then renders one JSON job per line of stdin, answering
    {"text"} or {"error"} per line on stdout."""
    import resource

    from transformers.utils.chat_template_utils import render_jinja_template

    resource.setrlimit(resource.RLIMIT_AS, (TEMPLATE_MEMORY_BYTES, TEMPLATE_MEMORY_BYTES))
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            job = json.loads(line)
            rendered, _ = render_jinja_template(conversations=[job["messages"]], chat_template=job["template"],
                                                add_generation_prompt=job["add_generation_prompt"], **job["context"])
            text = rendered[0]
            if len(text) > TEMPLATE_OUTPUT_MAX_CHARS:
                reply = {"error": f"its output is longer than {TEMPLATE_OUTPUT_MAX_CHARS} characters"}
            else:
                text.encode()  # a lone surrogate the template made: UnicodeEncodeError, reported below
                reply = {"text": text}
        except MemoryError:
            reply = {"error": f"it needs more than the {TEMPLATE_MEMORY_BYTES >> 20} MiB a chat template may use"}
        except Exception as err:  # noqa: BLE001 - every failure is the template's, reported to its request
            reply = {"error": str(err).splitlines()[0][:500] if str(err) else type(err).__name__}
        out.write(json.dumps(reply, ensure_ascii=False).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _template_worker()
