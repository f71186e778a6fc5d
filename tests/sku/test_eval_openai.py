"""The OpenAI judge against a real HTTP server on loopback that speaks the chat-completions
API, through the real `openai` client: retries on 5xx, structured output and its fallbacks,
an unreachable server, a verdict cache that survives a killed run, and Ctrl-C (a real SIGINT)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("openai")

from sku.evaluation.judges import (  # noqa: E402
    JudgeError,
    OpenAIJudge,
    VerdictCache,
    cache_key,
    judge_pairs,
)

REPO = Path(__file__).resolve().parents[2]


def verdict_json(category: str) -> str:
    return json.dumps({"harmful": category in "abc", "category": category,
                       "reason": f"kind {category}"})


def category_for(response: str) -> str:
    """The fake judge's rule: responses that start with "harm" are (a), the rest refusals."""
    return "a" if response.startswith("harm") else "g"


class FakeOpenAI:
    """POST /v1/chat/completions. `failures` is a queue of HTTP statuses to answer first;
    `content(prompt, response)` makes the assistant's message; every request is recorded."""

    def __init__(self, delay: float = 0.0):
        self.failures: deque[int] = deque()
        self.content = lambda prompt, response: verdict_json(category_for(response))
        self.reject_response_format = False
        self.delay = delay
        self.requests: list[dict] = []
        self.judged: list[str] = []  # the prompt of each request that reached the judge
        self.in_flight = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.handle(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def handle(self, handler, body: dict) -> None:
        with self._lock:
            self.requests.append(body)
            status = self.failures.popleft() if self.failures else 200
        if status == 200 and self.reject_response_format and "response_format" in body:
            status = 400
        if status != 200:
            message = ("Unrecognized request argument supplied: response_format" if status == 400
                       else "upstream overloaded")
            self._send(handler, status, {"error": {"message": message, "type": "server_error"}},
                       {"retry-after-ms": "5"})
            return
        question = body["messages"][-1]["content"]
        prompt, response = question.removeprefix("Prompt: ").split("\nResponse: ", 1)
        with self._lock:
            self.judged.append(prompt)
            self.in_flight += 1
        time.sleep(self.delay)
        try:
            self._reply(handler, body, prompt, response)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _reply(self, handler, body: dict, prompt: str, response: str) -> None:
        self._send(handler, 200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant",
                                     "content": self.content(prompt, response)}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    @staticmethod
    def _send(handler, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        try:
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed while waiting: what the cache test does on purpose

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake = FakeOpenAI()
    yield fake
    fake.close()


@pytest.fixture
def slow_server(monkeypatch):
    """`slow_server(delay)`: a FakeOpenAI that answers each request after `delay` seconds."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []

    def make(delay: float) -> FakeOpenAI:
        servers.append(FakeOpenAI(delay=delay))
        return servers[-1]

    yield make
    for fake in servers:
        fake.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sku", *map(str, args)]


def cli_env() -> dict:
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "HF_HUB_OFFLINE": "1"}
    env.pop("OPENAI_API_KEY", None)
    return env


def write_rows(path: Path, count: int) -> list[dict]:
    rows = [{"prompt": f"harmful prompt {i}",
             "response": ("harmful answer " if i % 3 == 0 else "I refuse ") + str(i)}
            for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


# ---------------------------------------------------------------------------------------------


def test_structured_request_and_retries_on_server_errors(server):
    server.failures.extend([500, 503])
    judge = OpenAIJudge("judge-model", base_url=server.url, max_retries=3)
    verdict = judge("How do I ruin a lawn?", "harm: pour salt on it")
    assert (verdict.harmful, verdict.category, verdict.judge) == (True, "a", "openai:judge-model")
    assert len(server.requests) == 3  # two 5xx answers retried by the SDK, then success
    body = server.requests[-1]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    schema = body["response_format"]["json_schema"]["schema"]
    assert body["response_format"]["type"] == "json_schema"
    assert schema["properties"]["category"]["enum"] == list("abcdefg")
    assert len(body["messages"]) == 1 + 2 * 21 + 1  # system, 21 worked examples, the pair


def test_too_many_server_errors_is_one_clear_error(server):
    server.failures.extend([500] * 5)
    judge = OpenAIJudge("m", base_url=server.url, max_retries=1)
    with pytest.raises(JudgeError, match=r"answered HTTP 500") as error:
        judge("p", "r")
    assert server.url in str(error.value) and "\n" not in str(error.value)
    assert len(server.requests) == 2


@pytest.mark.parametrize(("content", "category"), [
    ("Sure! Here is my verdict:\n```json\n" + verdict_json("c") + "\n```", "c"),
    ("The response is category (e): random harmless text.", "e"),
    ("f", "f"),
])
def test_malformed_content_goes_through_the_fallback_parser(server, content, category):
    server.content = lambda prompt, response: content
    verdict = OpenAIJudge("m", base_url=server.url, max_retries=0)("p", "r")
    assert verdict.category == category


def test_unreadable_replies_are_not_cached_and_are_reported(server, tmp_path):
    server.content = lambda prompt, response: ("no idea" if prompt == "p1"
                                               else verdict_json("g"))
    cache = VerdictCache(tmp_path / "cache.jsonl")
    judge = OpenAIJudge("m", base_url=server.url, max_retries=0)
    with pytest.raises(JudgeError, match="1 of 3 judge replies could not be read"):
        judge_pairs(judge, [("p0", "r"), ("p1", "r"), ("p2", "r")], cache)
    assert set(cache.verdicts) == {cache_key(judge.name, p, "r") for p in ("p0", "p2")}


def test_a_server_without_structured_output_is_asked_without_it(server):
    server.reject_response_format = True
    judge = OpenAIJudge("m", base_url=server.url, max_retries=0)
    assert judge("p", "harm x").category == "a"
    assert judge("p", "no").category == "g"
    with_format = [b for b in server.requests if "response_format" in b]
    assert len(with_format) == 1 and len(server.requests) == 3  # dropped once, for good


def test_judge_cli_writes_one_row_per_input_in_order(server, tmp_path):
    rows = write_rows(tmp_path / "in.jsonl", 7)
    out = tmp_path / "verdicts.jsonl"
    proc = subprocess.run(cli("judge", "--input", tmp_path / "in.jsonl", "--out", out,
                              "--judge", "openai", "--judge-model", "m",
                              "--base-url", server.url, "--concurrency", "3"),
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert [v["prompt"] for v in verdicts] == [r["prompt"] for r in rows]
    assert [v["category"] for v in verdicts] == [category_for(r["response"]) for r in rows]
    assert all(set(v) >= {"harmful", "category", "reason", "judge"} for v in verdicts)
    assert (tmp_path / "judge-cache.jsonl").is_file()


def test_unreachable_server_is_one_line_and_keeps_the_cache(server, tmp_path):
    write_rows(tmp_path / "in.jsonl", 6)
    cache = tmp_path / "cache.jsonl"
    # A first pass over half the rows fills the cache.
    write_rows(tmp_path / "half.jsonl", 3)
    first = subprocess.run(cli("judge", "--input", tmp_path / "half.jsonl",
                               "--out", tmp_path / "half-out.jsonl", "--judge", "openai",
                               "--judge-model", "m", "--base-url", server.url, "--cache", cache),
                           capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60)
    assert first.returncode == 0, first.stderr
    before = cache.read_bytes()

    url = f"http://127.0.0.1:{free_port()}/v1"
    proc = subprocess.run(cli("judge", "--input", tmp_path / "in.jsonl",
                              "--out", tmp_path / "out.jsonl", "--judge", "openai",
                              "--judge-model", "m", "--base-url", url, "--cache", cache,
                              "--max-retries", "1"),
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("sku: error:"), proc.stderr
    assert url in lines[0] and "unreachable" in lines[0]
    assert cache.read_bytes() == before and len(VerdictCache(cache).verdicts) == 3
    assert not (tmp_path / "out.jsonl").exists()


def test_cache_survives_a_killed_run(tmp_path, slow_server):
    slow = slow_server(0.15)
    rows = write_rows(tmp_path / "in.jsonl", 24)
    cache, out = tmp_path / "cache.jsonl", tmp_path / "out.jsonl"
    args = cli("judge", "--input", tmp_path / "in.jsonl", "--out", out, "--judge", "openai",
               "--judge-model", "m", "--base-url", slow.url, "--cache", cache,
               "--concurrency", "2")
    proc = subprocess.Popen(args, env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(slow.judged) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    while slow.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)  # requests of the killed run still being answered
    assert not out.exists()
    cached = VerdictCache(cache).verdicts
    assert 0 < len(cached) < len(rows)

    slow.judged.clear()
    proc = subprocess.run(args, capture_output=True, text=True, env=cli_env(), cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    missing = [r["prompt"] for r in rows
               if cache_key("openai:m", r["prompt"], r["response"]) not in cached]
    assert sorted(slow.judged) == sorted(missing)  # only what the killed run had not cached
    summary = f"{len(missing)} judged now, {len(rows) - len(missing)} from the cache"
    assert summary in proc.stdout
    assert len(out.read_text().splitlines()) == len(rows)


def interruptible(args: list[str]) -> subprocess.Popen:
    """`sku` in a child whose SIGINT is the default (a background shell ignores it, and a
    Python started so never raises KeyboardInterrupt), as when Ctrl-C is pressed."""
    return subprocess.Popen(args, env=cli_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_stops_paid_requests_keeps_their_verdicts_and_exits_130(tmp_path, slow_server):
    slow = slow_server(0.3)
    rows = write_rows(tmp_path / "in.jsonl", 200)
    cache, out = tmp_path / "cache.jsonl", tmp_path / "out.jsonl"
    proc = interruptible(cli("judge", "--input", tmp_path / "in.jsonl", "--out", out,
                             "--judge", "openai", "--judge-model", "m",
                             "--base-url", slow.url, "--cache", cache,
                             "--concurrency", "4"))
    deadline = time.monotonic() + 60
    while len(slow.judged) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    stopped = time.monotonic() - interrupted
    assert proc.returncode == 130, stderr
    assert stopped < 5, f"{stopped:.1f} s from Ctrl-C to exit"
    time.sleep(1)  # a run that went on asking would be seen by the server now
    asked = len(slow.judged)
    assert asked < 8 + 2 * 4 < len(rows), asked  # at most the requests already sent
    # Every request the server answered before the exit is a verdict in the cache.
    assert len(VerdictCache(cache).verdicts) == asked
    assert not out.exists()
    assert "sku: interrupted" in stderr and "a rerun asks only for the rest" in stderr


def on_a_terminal(args: list[str]) -> tuple[subprocess.Popen, int]:
    """`interruptible`, with stderr on a pseudo-terminal (where the progress bar is drawn)."""
    terminal, child_side = pty.openpty()
    # A pseudo-terminal starts 0 columns wide, where tqdm draws nothing.
    fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(args, env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=child_side,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(child_side)
    return proc, terminal


def read_terminal(terminal: int, until: bytes | None, timeout: float) -> bytes:
    """What the child wrote, up to `until` (or its exit when None) or the timeout."""
    seen, deadline = b"", time.monotonic() + timeout
    while (until is None or until not in seen) and time.monotonic() < deadline:
        if select.select([terminal], [], [], 0.05)[0]:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the child has exited and closed its side
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_ctrl_c_on_a_long_keyword_run_stops_or_finishes_never_hangs(tmp_path):
    """40 000 rows through the offline judge, Ctrl-C once the bar shows judging has begun:
    it exits 130 within seconds (or 0 if it had just finished), never hangs (the thread pool it
    ran on deadlocked in 2 of 5 tries); left alone, it finishes."""
    write_rows(tmp_path / "in.jsonl", 40_000)
    args = cli("judge", "--input", tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl",
               "--judge", "keyword", "--force")
    for _ in range(3):
        proc, terminal = on_a_terminal(args)
        try:
            shown = read_terminal(terminal, b"judging (keyword)", timeout=60)
            assert b"judging (keyword)" in shown  # the bar, on a terminal
            proc.send_signal(signal.SIGINT)
            interrupted = time.monotonic()
            shown += read_terminal(terminal, None, timeout=30)
            proc.wait(timeout=5)
        finally:
            os.close(terminal)
            proc.kill()
        assert proc.returncode in (0, 130), shown.decode(errors="replace")[-2000:]
        assert time.monotonic() - interrupted < 5
    finished = subprocess.run(args, capture_output=True, text=True, env=cli_env(), cwd=REPO,
                              timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "judging" not in finished.stderr  # no bar when stderr is not a terminal
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 40_000
