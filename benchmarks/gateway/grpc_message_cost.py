"""What one gRPC message costs in CPU, with one message in flight: the shape of a stream at C=1.

A grpc.aio bidirectional stream (the shape of the Session call) between two processes on this
machine: the client writes a 60-byte message, the server echoes it, the client reads it; then the
client waits GAP seconds (a token's time at C=1) and goes again. Reported: the CPU seconds of each
process per round trip (all its threads: Python's, gRPC's event engine's, the aio poller's), so the
cost of one message each way is what a replica and the gateway pay per token when every token is
its own message.

    .venv/bin/python benchmarks/gateway/grpc_message_cost.py                  # 3,000 round trips, 5 ms apart
    .venv/bin/python benchmarks/gateway/grpc_message_cost.py --gap-ms 0       # back to back
    .venv/bin/python benchmarks/gateway/grpc_message_cost.py --address unix:/tmp/grpc-cost.sock
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import grpc
import uvloop

METHOD = "/cost.Echo/Session"


def _identity(data: bytes) -> bytes:
    return data


async def _serve(address: str) -> None:
    async def session(requests, context):
        async for message in requests:
            yield message

    handler = grpc.method_handlers_generic_handler(
        "cost.Echo", {"Session": grpc.stream_stream_rpc_method_handler(session, _identity, _identity)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(address)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _client(address: str, count: int, gap_s: float, server_pid: int) -> tuple[float, float, float]:
    """(client CPU s, server CPU s, wall s) per round trip over `count` round trips, after a warm-up."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)()
        message = b"x" * 60
        for _ in range(200):
            await call.write(message)
            await call.read()
        cpu, server_cpu, wall = time.process_time(), _cpu_s(server_pid), time.perf_counter()
        for _ in range(count):
            await call.write(message)
            await call.read()
            if gap_s:
                await asyncio.sleep(gap_s)
        wall = time.perf_counter() - wall - count * gap_s
        cpu, server_cpu = time.process_time() - cpu, _cpu_s(server_pid) - server_cpu
        await call.done_writing()
    return cpu / count, server_cpu / count, wall / count


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:50931", help="host:port or unix:PATH")
    parser.add_argument("--count", type=int, default=3000, help="round trips measured")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="pause between round trips")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(_serve(args.address))
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--address", args.address],
                              stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()  # "ready"
        client_cpu, server_cpu, wall = uvloop.run(_client(args.address, args.count, args.gap_ms / 1000, server.pid))
    finally:
        server.terminate()
        server.wait()
    print(f"{args.address}, {args.count} round trips {args.gap_ms:g} ms apart: client CPU {client_cpu * 1e6:.0f} µs, "
          f"server CPU {server_cpu * 1e6:.0f} µs per round trip (one message each way); "
          f"round-trip time {wall * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
