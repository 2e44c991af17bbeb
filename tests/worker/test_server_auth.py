"""The worker's gRPC server with a token: every call without it is refused (over a real LocalEngine)."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from engine_util import tiny_engine

from saw_worker.proto import health_pb2, saw_pb2
from saw_worker.server import serve

TOKEN = "s3cret-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _calls(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        info = channel.unary_unary("/saw.v1.Worker/Info", saw_pb2.InfoRequest.SerializeToString,
                                   saw_pb2.InfoReply.FromString)
        generate = channel.unary_stream("/saw.v1.Worker/Generate", saw_pb2.GenerateRequest.SerializeToString,
                                        saw_pb2.GenerateChunk.FromString)
        health = channel.unary_unary("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest.SerializeToString,
                                     health_pb2.HealthCheckResponse.FromString)
        request = saw_pb2.GenerateRequest(id="t1", input_ids=[5, 6, 7], max_new_tokens=3, ignore_eos=True)
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
            for call in (info(saw_pb2.InfoRequest(), metadata=metadata),
                         health(health_pb2.HealthCheckRequest(), metadata=metadata)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [chunk async for chunk in generate(request, metadata=metadata)]
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", f"Bearer {TOKEN}"),)
        assert (await info(saw_pb2.InfoRequest(), metadata=good)).model_id == "tiny"
        chunks = [chunk async for chunk in generate(request, metadata=good)]
        assert chunks[-1].finished == saw_pb2.FINISH_REASON_LENGTH


def test_a_worker_with_a_token_refuses_every_call_without_it() -> None:
    engine = tiny_engine()

    async def run() -> None:
        address = f"127.0.0.1:{_free_port()}"
        server = await serve(engine, address, TOKEN)
        try:
            await _calls(address)
        finally:
            await server.stop(None)

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
