"""Guardrails and tenant limits through the gateway's HTTP API, in process: the mock engine (or a
scripted replica for replies holding personal data) behind a real GatewayApp, an aiohttp client."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from scalellm.gateway.app import GatewayApp
from scalellm.gateway.config import GatewayConfig
from scalellm.gateway.local_replica import LocalReplicaClient
from scalellm.protocol.types import CompletionOutput, EngineHealth, EngineLoad, RequestMetrics, RequestOutput
from scalellm.replica.mock_engine import MockEngine


class ScriptedReplica:
    """Replies with fixed text chunks (a reply the mock engine cannot make: personal data)."""

    address = "scripted"

    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks

    async def generate(self, request_id, prompt, params, gateway_receive_time, timeout_s=None, **_):
        for i, text in enumerate(self.chunks):
            last = i == len(self.chunks) - 1
            yield RequestOutput(request_id, [CompletionOutput(0, text, [i], finish_reason="stop" if last else None)],
                                finished=last, num_prompt_tokens=3,
                                metrics=RequestMetrics(gateway_receive_time) if last else None)

    async def health(self, timeout_s=1.0):
        return EngineHealth(True)

    async def load(self, timeout_s=1.0):
        return EngineLoad(0, 0, 10, 10, 0)

    async def info(self, timeout_s=2.0):
        return "mock", 64, "fake"

    async def start(self):
        pass

    async def close(self):
        pass


def serve(test, replica=None, **config):
    """Run `await test(session, base_url, app)` against a started gateway over `replica`."""
    async def main():
        client = replica or LocalReplicaClient(MockEngine("mock", tpot_ms=1.0, max_model_len=64))
        await client.start()
        app = GatewayApp(GatewayConfig(port=0, **config), clients=[client])
        await app.start()
        await app.monitor.probe_all()
        try:
            async with aiohttp.ClientSession() as session:
                return await test(session, f"http://127.0.0.1:{app.port}", app)
        finally:
            await app.shutdown()
            await client.close()
    return asyncio.run(main())


async def post(session, url, body, key=None):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with session.post(url, json=body, headers=headers) as response:
        return response.status, await response.read(), response.headers


async def stream_events(session, url, body):
    status, raw, _ = await post(session, url, {**body, "stream": True})
    assert status == 200, raw
    import orjson
    return [orjson.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]


def chat(content, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def test_prompt_with_personal_data_is_a_400_and_counted():
    async def test(session, url, app):
        status, body, _ = await post(session, url + "/v1/chat/completions", chat("my card is 4111 1111 1111 1111"))
        assert status == 400 and b'"code":"content_filter"' in body and b"payment card" in body
        assert b"4111" not in body
        status, _, _ = await post(session, url + "/v1/chat/completions", chat("my order is 4111 1111 1111 1112"))
        assert status == 200  # not a card number: the Luhn check fails
        text = app.metrics.render().decode()
        assert 'scalellm:gateway_guard_actions_total{action="blocked_input",guard="pii",key="anonymous"} 1.0' in text
    serve(test, guards=("pii",))


def test_personal_data_in_replies_is_masked_streamed_and_not():
    replica = ScriptedReplica(["Reach me at jane.", "doe@exam", "ple.org or +1 415", " 555 2671", ". Bye"])

    async def test(session, url, app):
        status, body, _ = await post(session, url + "/v1/chat/completions", chat("hi"))
        import orjson
        message = orjson.loads(body)["choices"][0]["message"]["content"]
        assert status == 200 and message == "Reach me at [EMAIL] or [PHONE]. Bye"
        events = await stream_events(session, url + "/v1/chat/completions", chat("hi"))
        streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert streamed == message and events[-1]["choices"][0]["finish_reason"] == "stop"
    serve(test, replica, guards=("pii",))


def test_denied_reply_ends_with_content_filter_streamed_and_not(tmp_path):
    deny = tmp_path / "deny.txt"
    deny.write_text("tok2\\s+tok3\n")  # the mock engine's reply is "tok0 tok1 tok2 tok3 ...", a token a chunk

    async def test(session, url, app):
        import orjson
        status, body, _ = await post(session, url + "/v1/completions", {"prompt": "a b", "max_tokens": 8})
        choice = orjson.loads(body)["choices"][0]
        assert status == 200 and choice["finish_reason"] == "content_filter" and "tok2" not in choice["text"]
        assert choice["text"].startswith("tok0 tok1")
        events = await stream_events(session, url + "/v1/chat/completions", chat("a"))
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert "tok2" not in text and events[-1]["choices"][0]["finish_reason"] == "content_filter"
        status, body, _ = await post(session, url + "/v1/completions", {"prompt": "say tok2  tok3", "max_tokens": 2})
        assert status == 400 and b"content_filter" in body
    serve(test, guards=(f"deny:{deny}",))


async def slow_moderation(request):
    await asyncio.sleep(1.0)
    return web.json_response({"results": [{"flagged": False}]})


async def flagging_moderation(request):
    body = await request.json()
    flagged = any("attack" in text for text in body["input"])
    return web.json_response({"results": [{"flagged": flagged, "categories": {"violence": flagged}}]})


def test_moderation_endpoint_timeout_follows_fail_open_or_closed():
    async def test(session, url, app):
        server = web.Application()
        server.router.add_post("/slow", slow_moderation)
        server.router.add_post("/flag", flagging_moderation)
        runner = web.AppRunner(server)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await _moderation_cases(session, url, app, port)
        finally:
            await runner.cleanup()

    async def _moderation_cases(session, url, app, port):
        from scalellm.gateway.guards import GuardPolicy

        results = {}
        for fail in ("open", "closed"):
            await app.service.guards.close()
            app.service.guards = GuardPolicy((f"moderation:http://127.0.0.1:{port}/slow,timeout=0.2,fail={fail}",),
                                             count=app.metrics.count_guard)
            results[fail] = (await post(session, url + "/v1/chat/completions", chat("hello")))[0]
        await app.service.guards.close()
        app.service.guards = GuardPolicy((f"moderation:http://127.0.0.1:{port}/flag,timeout=2",))
        flagged = await post(session, url + "/v1/chat/completions", chat("plan an attack"))
        fine = await post(session, url + "/v1/chat/completions", chat("plan a picnic"))
        assert results == {"open": 200, "closed": 400}
        assert flagged[0] == 400 and b"violence" in flagged[1] and fine[0] == 200
        text = app.metrics.render().decode()
        for action in ("error_open", "error_closed"):
            assert f'action="{action}",guard="moderation",key="anonymous"}} 1.0' in text
    serve(test)


def test_key_settings_priority_default_and_token_limit(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nkey-small tpm=6 priority=3\nkey-big\n")
    seen = []

    class Recording(ScriptedReplica):
        async def generate(self, request_id, prompt, params, gateway_receive_time, timeout_s=None, **_):
            seen.append(params.priority)
            async for output in super().generate(request_id, prompt, params, gateway_receive_time):
                yield output

    async def test(session, url, app):
        status, _, _ = await post(session, url + "/v1/chat/completions", chat("a"), "key-small")
        assert status == 200
        status, body, headers = await post(session, url + "/v1/chat/completions", chat("a"), "key-small")
        assert status == 429 and int(headers["retry-after"]) >= 1 and b"tokens per minute" in body
        assert (await post(session, url + "/v1/chat/completions", chat("a", priority=-2), "key-big"))[0] == 200
        assert seen == [3, -2]
    serve(test, Recording(["w"] * 8), api_key_file=str(keys))


@pytest.mark.slow
def test_bad_guard_configuration_stops_serve_naming_the_line(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("good-key\n\nbad-key guard=deny:/nonexistent/deny.txt\n")
    result = subprocess.run([sys.executable, "-m", "scalellm.cli", "serve", "--engine", "mock",
                             "--api-key-file", str(keys)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"API key file {keys} line 3" in result.stderr and "/nonexistent/deny.txt" in result.stderr
    assert "bad-key" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "scalellm.cli", "serve", "--engine", "mock", "--guard", "pi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--guard: guard 'pi': unknown guard" in result.stderr


def test_served_moderation_asks_the_replica_through_the_router():
    async def test(session, url, app):
        status, body, _ = await post(session, url + "/v1/chat/completions", chat("hello"))
        assert status == 200, body  # the mock model answers "tok0 tok1": not "unsafe"
        text = app.metrics.render().decode()
        assert 'scalellm:gateway_replica_dispatched_total{replica="local"} 2.0' in text  # the check, the request
    serve(test, guards=("moderation:served,max_tokens=2,timeout=5",))
