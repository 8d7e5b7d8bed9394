"""The benchmark against an in-process fake OpenAI server with known delays.

The fake streams NUM_TOKENS content chunks: the first TTFT_S after the request
arrives, then one every ITL_S (scheduled on absolute times, so no drift), then
a usage chunk and [DONE]. The model name picks a behaviour (ok, bad-json,
http-500, drop, no-usage, fast, tool-calls, prefill-stall). It records how many
requests were in flight and the last request body.

``prefill-stall`` plays an engine without chunked prefill: each arrival takes
STALL_S to its first token, and no other stream gets a token meanwhile; every
other request has twice the tokens, so arrivals meet streams that decode.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import orjson
import pytest
from aiohttp import web

import sys
from pathlib import Path

from scalellm.bench.cli import main as bench_main
from scalellm.bench.client import ClientConfig, build_body
from scalellm.bench.datasets import random_requests
from scalellm.bench.loadgen import LoadConfig, poisson_offsets, run_load
from scalellm.bench.metrics import summarize
from scalellm.bench.runner import BenchPlan, run_plan

TTFT_S = 0.050
ITL_S = 0.010
NUM_TOKENS = 8
PROMPT_TOKENS = 20
E2E_S = TTFT_S + (NUM_TOKENS - 1) * ITL_S
SLOW_DONE_S = 0.200  # far past a loaded machine's late reads (20 ms seen), so the E2E bounds below hold
STALL_S = 0.060
TOLERANCE_S = 0.006  # a few ms: scheduling jitter on a shared 2-core machine


class FakeOpenAI:
    """An aiohttp server on its own thread and loop; ``url`` is its base URL."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.in_flight = 0
        self.max_in_flight = 0
        self.num_requests = 0
        self.last_body: dict = {}
        self.stall_until = 0.0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def reset(self) -> None:
        self.in_flight = self.max_in_flight = self.num_requests = 0
        self.stall_until = 0.0

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._models)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "ok", "object": "model"}]})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrival, arrival_wall = time.perf_counter(), time.time()
        body = await request.json()
        self.last_body = body
        self.num_requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if body["model"] == "http-500":
                return web.json_response({"error": {"message": "boom"}}, status=500)
            if not body.get("stream"):
                await _sleep_until(arrival + E2E_S)
                return web.json_response(_full_body(body))
            return await self._stream(request, body, arrival, arrival_wall)
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, body: dict, arrival: float,
                      arrival_wall: float) -> web.StreamResponse:
        mode = body["model"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        num_tokens = 1 if mode == "fast" else NUM_TOKENS
        ttft = 0.0 if mode == "fast" else TTFT_S
        if mode == "prefill-stall":  # every other request twice as long, so the streams fall out of step
            num_tokens = NUM_TOKENS * (1 + self.num_requests % 2)
            ttft = max(self.stall_until, arrival) + STALL_S - arrival
            self.stall_until = arrival + ttft
        if mode == "role-first":  # a role-only chunk before any token must not count as the first token
            await response.write(_sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
        sent = arrival + ttft - ITL_S
        for index in range(num_tokens):
            sent = max(sent + ITL_S, self.stall_until) if mode == "prefill-stall" else arrival + ttft + index * ITL_S
            await _sleep_until(sent)
            if mode == "prefill-stall" and time.perf_counter() < self.stall_until:  # a prefill began meanwhile
                sent = self.stall_until
                await _sleep_until(sent)
            if mode == "bad-json" and index == 2:
                await response.write(b"data: {not json\n\n")
            if mode == "drop" and index == 3:
                request.transport.abort()
                return response
            delta = {"content": f" w{index}"}
            if mode == "tool-calls":
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": f"{{\"a\": {index}}}"}}]}
            await response.write(_sse({"choices": [{"index": 0, "delta": delta}]}))
        if mode != "no-usage":
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": num_tokens,
                     "total_tokens": PROMPT_TOKENS + num_tokens}
            await response.write(_sse({"choices": [], "usage": usage,
                                       "scalellm_timings": _timings(arrival_wall, ttft, num_tokens)}))
        if mode == "slow-done":
            await asyncio.sleep(SLOW_DONE_S)
        await response.write(b"data: [DONE]\n\n")
        return response


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def _sse(chunk: dict) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _full_body(body: dict) -> dict:
    message = {"role": "assistant", "content": " w" * NUM_TOKENS}
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": NUM_TOKENS}
    if body["model"] == "no-usage":
        return {"choices": [{"index": 0, "message": message}]}
    return {"choices": [{"index": 0, "message": message}], "usage": usage}


def _timings(arrival_wall: float, ttft: float, num_tokens: int) -> dict:
    """Stage timestamps as a gateway would report them (routing 1 ms, transport 2 ms, ...)."""
    return {"gateway_receive": arrival_wall, "routed": arrival_wall + 0.001,
            "replica_receive": arrival_wall + 0.003, "scheduled": arrival_wall + 0.010,
            "first_token": arrival_wall + ttft, "last_token": arrival_wall + ttft + (num_tokens - 1) * ITL_S,
            "gateway_send": arrival_wall + ttft + (num_tokens - 1) * ITL_S + 0.001}


@pytest.fixture(scope="module")
def server():
    fake = FakeOpenAI()
    yield fake
    fake.stop()


def measure(server: FakeOpenAI, model: str = "ok", concurrency: int = 1, num_requests: int = 8,
            stream: bool = True, rate: float = math.inf, slos: dict | None = None):
    server.reset()
    client = ClientConfig(base_url=server.url, model=model, stream=stream)
    bodies = [build_body(spec, client) for spec in random_requests(num_requests, 8, NUM_TOKENS)]
    load = LoadConfig(concurrency=concurrency, num_requests=num_requests, request_rate=rate, num_warmup=0)
    results, window = asyncio.run(run_load(client, load, bodies))
    return results, summarize(results, window, slos)


def test_streamed_latencies_match_the_server(server):
    results, summary = measure(server, num_requests=8)
    assert summary["completed"] == 8 and summary["failed"] == 0
    assert summary["median_ttft_ms"] == pytest.approx(TTFT_S * 1000, abs=TOLERANCE_S * 1000)
    assert summary["median_tpot_ms"] == pytest.approx(ITL_S * 1000, abs=2.0)
    assert summary["mean_itl_ms"] == pytest.approx(ITL_S * 1000, abs=2.0)
    assert summary["median_e2el_ms"] == pytest.approx(E2E_S * 1000, abs=TOLERANCE_S * 1000)
    assert all(len(r.itl) == NUM_TOKENS - 1 and r.output_tokens == NUM_TOKENS for r in results)
    assert summary["total_output_tokens"] == 8 * NUM_TOKENS
    assert summary["total_input_tokens"] == 8 * PROMPT_TOKENS
    expected_rate = 1.0 / E2E_S
    assert summary["request_throughput"] == pytest.approx(expected_rate, rel=0.08)
    assert summary["output_throughput"] == pytest.approx(expected_rate * NUM_TOKENS, rel=0.08)
    assert summary["total_token_throughput"] == pytest.approx(
        expected_rate * (NUM_TOKENS + PROMPT_TOKENS), rel=0.08)


def test_role_chunk_is_not_the_first_token_and_e2e_ends_at_the_last_choice(server):
    _, role_first = measure(server, model="role-first", num_requests=3)
    assert role_first["median_ttft_ms"] == pytest.approx(TTFT_S * 1000, abs=TOLERANCE_S * 1000)
    results, slow_done = measure(server, model="slow-done", num_requests=3)
    # E2E stops at the last choice, not at [DONE] SLOW_DONE_S later: the bound is halfway between the
    # two, since a loaded machine delays the last chunk's read by more than TOLERANCE_S at times (8 and
    # 20 ms seen), and the gap to [DONE] is shortened by a late read of the last chunk, but never to nothing.
    assert E2E_S - TOLERANCE_S <= slow_done["median_e2el_ms"] / 1000 < E2E_S + SLOW_DONE_S / 2
    assert all(r.stream_end - r.latency >= SLOW_DONE_S / 2 for r in results)


def test_not_streamed_ttft_is_e2e(server):
    results, summary = measure(server, num_requests=6, stream=False)
    assert summary["completed"] == 6
    assert summary["median_e2el_ms"] == pytest.approx(E2E_S * 1000, abs=TOLERANCE_S * 1000)
    assert all(r.ttft == r.latency and r.output_tokens == NUM_TOKENS for r in results)
    assert summary["mean_itl_ms"] == 0.0


def test_goodput_against_slos(server):
    _, met = measure(server, num_requests=6, slos={"ttft": 0.2, "tpot": 0.05})
    assert met["request_goodput"] == pytest.approx(met["request_throughput"])
    _, missed_ttft = measure(server, num_requests=4, slos={"ttft": 0.02})
    assert missed_ttft["request_goodput"] == 0.0
    _, missed_tpot = measure(server, num_requests=4, slos={"tpot": 0.005})
    assert missed_tpot["request_goodput"] == 0.0


@pytest.mark.parametrize("model, stream, message", [
    ("bad-json", True, "JSONDecodeError"),
    ("http-500", True, "HTTP 500"),
    ("drop", True, ""),
    ("no-usage", True, "no usage"),
    ("no-usage", False, "no usage"),
])
def test_malformed_answers_are_failures(server, model, stream, message):
    results, summary = measure(server, model=model, num_requests=3, stream=stream)
    assert summary["completed"] == 0 and summary["failed"] == 3
    assert all(r.error for r in results)
    assert message in summary["errors"][0]


def test_closed_loop_keeps_exactly_c_in_flight(server):
    _, summary = measure(server, concurrency=4, num_requests=16)
    assert summary["completed"] == 16
    assert server.max_in_flight == 4
    assert summary["max_concurrent_requests"] == 4
    assert summary["request_throughput"] == pytest.approx(4 / E2E_S, rel=0.2)


def test_poisson_open_loop_follows_its_seeded_schedule(server):
    rate, num_requests = 40.0, 60
    results, summary = measure(server, model="fast", concurrency=64, num_requests=num_requests, rate=rate)
    assert summary["completed"] == num_requests
    offsets = poisson_offsets(num_requests, rate, seed=0)
    assert (num_requests - 1) / offsets[-1] == pytest.approx(rate, rel=0.2)  # the seeded draw itself
    starts = [r.start_wall - results[0].start_wall for r in results]
    lateness = sorted(abs(s - o) for s, o in zip(starts, offsets))
    assert lateness[len(lateness) // 2] < 0.005  # median; a loaded machine may delay a few sends
    measured_rate = (num_requests - 1) / (starts[-1] - starts[0])
    assert measured_rate == pytest.approx((num_requests - 1) / offsets[-1], rel=0.05)


def test_breakdown_from_reported_timings(server):
    server.reset()
    client = ClientConfig(base_url=server.url, model="ok")
    plan = BenchPlan(concurrencies=(2,), num_requests=4, num_warmup=1)
    [point] = run_plan("fake", client, plan)
    stages = {row["stage"]: row for row in point.summary["breakdown"]}
    assert stages["gateway in"]["median_ms"] == pytest.approx(1.0, abs=0.01)
    assert stages["prefill"]["median_ms"] == pytest.approx((TTFT_S - 0.010) * 1000, abs=0.01)
    assert stages["decode"]["median_ms"] == pytest.approx((NUM_TOKENS - 1) * ITL_S * 1000, abs=0.01)
    assert 0 <= stages["after last token"]["median_ms"] < SLOW_DONE_S / 2 * 1000  # a held-back [DONE] fails
    assert stages["client -> gateway"]["count"] == 4


def test_cli_writes_json_markdown_and_plots(server, tmp_path):
    server.reset()
    rc = bench_main(["--url", server.url + "/v1", "--concurrency", "1,2", "--requests", "4",
                     "--warmup", "1", "--repeat", "2", "--output", str(tmp_path), "--slo", "ttft=1"])
    assert rc == 0
    document = orjson.loads((tmp_path / "results.json").read_bytes())
    assert len(document["runs"]) == 4 and len(document["aggregates"]) == 2
    summary = document["runs"][0]["summary"]
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
                "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
                "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms",
                "median_e2el_ms", "p99_e2el_ms", "completed", "failed", "duration", "request_goodput",
                "bench_cpu_ms_per_request"):
        assert key in summary, key
    assert len(document["runs"][0]["requests"]) == 4
    assert set(document["aggregates"][0]["metrics"]["output_throughput"]) == {"median", "min", "max"}
    assert "| server | 2 |" in (tmp_path / "results.md").read_text()
    for name in ("throughput.png", "latency.png", "ttft_cdf.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_cli_roofline_of_a_server_at_a_url(server, tmp_path):
    from scalellm.bench.peer_install import default_gguf_path

    probe = tmp_path / "machine.json"
    probe.write_text('{"cores": 2, "cpu": {"model": "x"}, "memory_bandwidth": {"all_cores_gb_s": 20.0}, '
                     '"matmul": {"fp32": {"peak_gflop_s": 100}, "bf16": {"peak_gflop_s": 200}, '
                     '"int8": {"peak_gflop_s": 400}}}')
    server.reset()
    rc = bench_main(["--url", server.url, "--concurrency", "2", "--requests", "4", "--warmup", "0",
                     "--gguf", str(default_gguf_path()), "--weights", "server=int8", "--machine-file", str(probe),
                     "--output", str(tmp_path / "out")])
    assert rc == 0
    document = orjson.loads((tmp_path / "out" / "results.json").read_bytes())
    assert document["roofline"]["systems"]["server"]["weights"] == "int8"
    summary = document["runs"][0]["summary"]
    assert summary["roofline_achieved_gb_s"] > 0
    assert summary["roofline_bandwidth_fraction"] == pytest.approx(summary["roofline_achieved_gb_s"] / 20.0)
    assert summary["roofline_compute_fraction"] == pytest.approx(summary["roofline_achieved_gflop_s"] / 400)
    assert "of read BW" in (tmp_path / "out" / "results.md").read_text()
    # Without --weights a server at a URL gets no roofline, and says why.
    assert bench_main(["--url", server.url, "--concurrency", "1", "--requests", "1", "--warmup", "0",
                       "--gguf", str(default_gguf_path()), "--output", str(tmp_path / "plain")]) == 0
    assert "skipped" in orjson.loads((tmp_path / "plain" / "results.json").read_bytes())["roofline"]


def test_cli_reports_user_errors(server, tmp_path, capsys):
    assert bench_main(["--output", str(tmp_path)]) == 2
    assert "--url is required" in capsys.readouterr().err
    assert bench_main(["--url", server.url, "--slo", "speed=3", "--output", str(tmp_path)]) == 2
    assert bench_main(["--url", server.url, "--server-pids", "999999999", "--output", str(tmp_path)]) == 2
    assert bench_main(["--url", server.url, "--weights", "server=q4", "--output", str(tmp_path)]) == 2
    assert not (tmp_path / "results.json").exists()  # refused before measuring


def test_compare_mode_starts_measures_and_stops_systems(tmp_path):
    command = f"{{python}} {Path(__file__).resolve()} --port {{port}}"
    rc = bench_main(["--compare", "--systems", "fake-a,fake-b", "--system-cmd", f"fake-a={command}",
                     "--system-cmd", f"fake-b={command}", "--baseline", "fake-a", "--concurrency", "2",
                     "--requests", "4", "--repeat", "2", "--warmup", "1", "--output", str(tmp_path),
                     "--allow-other-servers"])  # a shared machine may run servers of its own
    assert rc == 0
    document = orjson.loads((tmp_path / "results.json").read_bytes())
    assert [row["system"] for row in document["aggregates"]] == ["fake-a", "fake-b"]
    assert all(run["summary"]["server_cpu_seconds"] is not None for run in document["runs"])
    assert document["ratios"][0]["peer"] == "fake-b"
    assert document["ratios"][0]["median_ttft_ms"] == pytest.approx(1.0, rel=0.2)
    assert "| fake-a vs fake-b | 2 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "logs" / "fake-b.log").exists()


def test_itl_during_another_prefill_shows_the_stall(server):
    _, alone = measure(server, model="prefill-stall", concurrency=1, num_requests=3)
    assert alone["num_itl_during_prefill"] == 0  # one stream: no other request prefills
    assert alone["median_ttft_ms"] >= STALL_S * 1000 - 1
    _, shared = measure(server, model="prefill-stall", concurrency=3, num_requests=12)
    assert shared["completed"] == 12 and shared["num_itl_during_prefill"] > 0
    # A gap that spans another request's prefill lasts up to the whole stall; the others are ITL_S.
    assert shared["p99_itl_during_prefill_ms"] > 0.5 * STALL_S * 1000
    assert shared["median_itl_outside_prefill_ms"] < STALL_S * 1000 / 2
    assert shared["p99_itl_during_prefill_ms"] > 2 * shared["median_itl_outside_prefill_ms"]


def test_structured_fields_reach_the_server_and_tool_calls_count_as_tokens(server, tmp_path):
    schema = tmp_path / "schema10.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}')
    tools = tmp_path / "tools.json"
    tools.write_text('[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]')
    server.reset()
    rc = bench_main(["--url", server.url, "--model", "tool-calls", "--concurrency", "1", "--requests", "2",
                     "--warmup", "0", "--output", str(tmp_path / "out"), "--response-format", "json_schema",
                     "--schema", str(schema), "--tools", str(tools)])
    assert rc == 0
    body = server.last_body
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "schema10", "schema": orjson.loads(schema.read_bytes()), "strict": True}}
    assert body["tools"][0]["function"]["name"] == "f"
    run = orjson.loads((tmp_path / "out" / "results.json").read_bytes())["runs"][0]
    assert run["summary"]["completed"] == 2 and run["requests"][0]["num_chunks"] == NUM_TOKENS
    assert bench_main(["--url", server.url, "--response-format", "json_schema",
                       "--output", str(tmp_path / "bad")]) == 2  # no --schema


def test_compare_stopped_by_sigterm_stops_the_system(tmp_path):
    import signal
    import subprocess

    from scalellm.bench import isolation

    command = f"{{python}} {Path(__file__).resolve()} --port {{port}}"
    bench = subprocess.Popen([sys.executable, "-m", "scalellm.bench", "--compare", "--systems", "fake",
                              "--system-cmd", f"fake={command}", "--concurrency", "1", "--requests", "100000",
                              "--warmup", "0", "--allow-other-servers", "--output", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        system = []
        while time.monotonic() < deadline and not system:
            time.sleep(0.2)
            system = [pid for pid in _children(bench.pid) if "--port" in isolation.read_argv(pid)]
        assert system, "the fake system never started"
        time.sleep(1.0)  # measuring now
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == 143
        assert isolation.read_argv(system[0]) == []  # gone
    finally:
        bench.kill()
        bench.wait()


def test_compare_refuses_to_start_beside_another_server(tmp_path):
    import subprocess

    leftover = subprocess.Popen(["bash", "-c", f'exec -a scalellm {sys.executable} -c "import time; '
                                 f'time.sleep(60)" serve --port 1'])
    try:
        time.sleep(0.5)
        command = f"{{python}} {Path(__file__).resolve()} --port {{port}}"
        rc = bench_main(["--compare", "--systems", "fake", "--system-cmd", f"fake={command}", "--concurrency", "1",
                         "--requests", "2", "--warmup", "0", "--output", str(tmp_path)])
        assert rc == 1
        error = orjson.loads((tmp_path / "results.json").read_bytes())["systems"]["fake"]["error"]
        assert "refusing to start fake" in error and f"pid {leftover.pid} (scalellm)" in error
        assert not (tmp_path / "logs" / "fake.log").exists()  # never started
    finally:
        leftover.kill()
        leftover.wait()


def _children(pid: int) -> list[int]:
    from scalellm.bench import procstat

    return sorted(procstat.descendants([pid], procstat.process_table()) - {pid})


if __name__ == "__main__":  # the compare-mode test starts this file as a server
    FakeOpenAI(port=int(sys.argv[sys.argv.index("--port") + 1]))._thread.join()
