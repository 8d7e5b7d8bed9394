"""Real process trees for the reliability tests: `scalellm serve`, lone gateways and replicas, and raw
HTTP clients that never wait without a deadline."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import orjson
import psutil

from scalellm.process import free_ports

MOCK = ("--engine", "mock", "--no-request-log")


class Serve:
    """`scalellm serve ...` started and waited for; `stop()` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, *args: str, timeout_s: float = 120.0) -> None:
        self.port = free_ports(1)[0]
        self.process = subprocess.Popen([sys.executable, "-m", "scalellm.cli", "serve", "--port", str(self.port),
                                         "--drain-timeout", "1", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + timeout_s
        banner = self.process.stdout.readline()
        if "ScaleLLM serving" not in banner or time.monotonic() > deadline:
            self.stop()
            raise AssertionError(f"serve did not start: {banner!r}")

    def children(self, kind: str) -> dict[str, psutil.Process]:
        """Live children of `kind` ("replica" or "gateway") by gRPC port (replicas) or "gateway"."""
        found = {}
        for child in psutil.Process(self.process.pid).children():
            try:
                cmdline, status = child.cmdline(), child.status()
            except psutil.Error:
                continue
            if kind in cmdline and status != psutil.STATUS_ZOMBIE:
                if kind == "gateway":
                    found[kind] = child
                elif port := listening_port(child):  # a replica still starting has none yet
                    found[port] = child
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def listening_port(process: psutil.Process) -> str | None:
    """The TCP port `process` listens on (a replica's gRPC port), None when it listens on none."""
    try:
        ports = [str(c.laddr.port) for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return None
    return ports[0] if ports else None


def start_replica(port: int, *args: str) -> subprocess.Popen:
    """A lone `scalellm replica --engine mock` on `port` (own process group)."""
    return subprocess.Popen([sys.executable, "-m", "scalellm.cli", "replica", "--port", str(port), "--engine",
                             "mock", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def start_gateway(port: int, replica_ports: list[int], *args: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "scalellm.cli", "gateway", "--port", str(port), "--no-request-log", *args]
    for replica_port in replica_ports:
        argv += ["--replica", f"127.0.0.1:{replica_port}"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll `condition()` until it is truthy; returns (value, seconds waited)."""
    start = time.monotonic()
    while True:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value, time.monotonic() - start
        assert time.monotonic() - start < timeout_s, f"{what} not within {timeout_s} s"
        time.sleep(interval_s)


def http(port: int, method: str, path: str, body: bytes | None = None, timeout_s: float = 10.0,
         headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def metric(port: int, name: str, labels: str = "") -> float:
    """Sum of a Prometheus metric's samples whose labels contain `labels`."""
    text = http(port, "GET", "/metrics")[1].decode()
    values = [float(v) for l, v in re.findall(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M)
              if labels in l]
    return sum(values)


def chat_body(max_tokens: int, stream: bool, content: str = "hello there") -> bytes:
    return orjson.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                         "stream": stream})


def is_openai_error(payload: bytes) -> bool:
    error = orjson.loads(payload).get("error")
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"} and bool(error["message"])


def stream_events(port: int, body: bytes, deadline_s: float, on_event=None,
                  path: str = "/v1/chat/completions") -> tuple[int, list[bytes], bool]:
    """POST a streamed request to `path` over a raw socket; returns (status, SSE data payloads, clean end).

    Every read has a deadline: a stream that neither ends nor sends within `deadline_s` fails the test.
    `clean end` is True when the chunked body ended with its zero-length chunk.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=deadline_s)
    try:
        sock.sendall(b"POST %b HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b"
                     % (path.encode(), len(body), body))
        reader = sock.makefile("rb")
        status = int(reader.readline().split()[1])
        headers = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:  # an error answered before the stream started
            return status, [reader.read(int(headers["content-length"]))], True
        events, clean = [], False
        while True:
            size_line = reader.readline()
            if not size_line:
                break
            size = int(size_line.strip(), 16)
            if size == 0:
                clean = True
                break
            chunk = reader.read(size + 2)[:-2]
            for line in chunk.split(b"\n"):
                if line.startswith(b"data: "):
                    events.append(line[6:])
                    if on_event is not None:
                        on_event(len(events))
        return status, events, clean
    finally:
        sock.close()
