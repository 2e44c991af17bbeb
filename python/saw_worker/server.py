"""gRPC server (proto/saw.proto) over any Engine; plus the standard grpc.health.v1 service.

Handlers are registered by hand rather than through generated *_pb2_grpc stubs, so the code
does not pin a grpcio version. With a token, every call must carry `authorization: Bearer <token>`
(the router sends it): anything else on the machine that finds the port cannot bypass the router's
API key.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from saw_worker.engine.interface import Engine, stream
from saw_worker.engine.request import (
    Event,
    Finish,
    GenerateParams,
    GrammarSpec,
    RequestError,
    SamplingOptions,
    TokenLogprob,
)
from saw_worker.proto import health_pb2, saw_pb2

_FINISH = {
    Finish.STOP: saw_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: saw_pb2.FINISH_REASON_LENGTH,
    Finish.ABORT: saw_pb2.FINISH_REASON_ABORT,
}


def _params(req: saw_pb2.GenerateRequest) -> GenerateParams:
    s = req.sampling
    return GenerateParams(
        request_id=req.id or uuid.uuid4().hex,
        input_ids=list(req.input_ids),
        max_new_tokens=req.max_new_tokens,
        min_new_tokens=req.min_new_tokens,
        ignore_eos=req.ignore_eos,
        stop_token_ids=frozenset(req.stop_token_ids),
        sampling=SamplingOptions(
            temperature=s.temperature,
            top_p=s.top_p if s.top_p > 0 else 1.0,
            top_k=s.top_k,
            seed=s.seed if s.HasField("seed") else None,
            min_p=s.min_p,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            repetition_penalty=s.repetition_penalty or 1.0,
            logit_bias=tuple(sorted(s.logit_bias.items())),
        ),
        top_logprobs=req.logprobs,
        return_logprobs=req.return_logprobs or req.logprobs > 0,
        prompt_logprobs=req.prompt_logprobs,
        grammar=_grammar(req.grammar) if req.HasField("grammar") else None,
    )


_GRAMMAR_KINDS = {
    saw_pb2.Grammar.KIND_JSON_OBJECT: "json_object",
    saw_pb2.Grammar.KIND_JSON_SCHEMA: "json_schema",
    saw_pb2.Grammar.KIND_REGEX: "regex",
    saw_pb2.Grammar.KIND_EBNF: "ebnf",
    saw_pb2.Grammar.KIND_CHOICE: "choice",
}


def _grammar(g: saw_pb2.Grammar) -> GrammarSpec:
    if g.kind not in _GRAMMAR_KINDS:
        raise RequestError(f"unknown grammar kind {g.kind}")
    return GrammarSpec(_GRAMMAR_KINDS[g.kind], g.spec, g.strict)


def _logprobs(items: list[TokenLogprob]) -> list[saw_pb2.TokenLogprob]:
    return [saw_pb2.TokenLogprob(logprob=x.logprob, top=[saw_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in x.top])
            for x in items]


def _chunk(ev: Event) -> saw_pb2.GenerateChunk:
    chunk = saw_pb2.GenerateChunk(token_ids=ev.token_ids, logprobs=_logprobs(ev.logprobs),
                                  prompt_logprobs=_logprobs(ev.prompt_logprobs))
    if ev.finish is not None:
        chunk.finished = _FINISH[ev.finish]
        chunk.usage.CopyFrom(saw_pb2.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                                           cached_tokens=ev.cached_tokens))
    return chunk


class WorkerService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def info(self, request: saw_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> saw_pb2.InfoReply:
        i = self.engine.info()
        tok = i.tokenizer
        reply = saw_pb2.InfoReply(
            model_id=i.model_id, tokenizer_json=tok.tokenizer_json, chat_template=tok.chat_template,
            bos_token=tok.bos_token, eos_token=tok.eos_token, eos_token_ids=list(tok.eos_token_ids),
            context_length=i.context_length, kv_format=i.kv_format, kv_capacity_tokens=i.kv_capacity_tokens,
            page_size=i.page_size, vocab_size=i.vocab_size, device=i.device, kv_bytes_per_token=i.kv_bytes_per_token,
            kv_window_bytes_per_request=i.kv_window_bytes_per_request,
        )
        if tok.bos_token_id is not None:
            reply.bos_token_id = tok.bos_token_id
        return reply

    async def generate(self, request: saw_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[saw_pb2.GenerateChunk]:
        try:
            events = stream(self.engine, _params(request))
            async for ev in events:
                if ev.error is not None:
                    code = grpc.StatusCode.INVALID_ARGUMENT if ev.refused else grpc.StatusCode.INTERNAL
                    await context.abort(code, ev.error)
                yield _chunk(ev)
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def abort(self, request: saw_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> saw_pb2.AbortReply:
        return saw_pb2.AbortReply(found=self.engine.abort(request.id))

    async def load(self, request: saw_pb2.LoadRequest, context: grpc.aio.ServicerContext) -> saw_pb2.LoadReply:
        s = self.engine.load()
        return saw_pb2.LoadReply(running=s.running, waiting=s.waiting, kv_tokens_used=s.kv_tokens_used,
                                 kv_tokens_total=s.kv_tokens_total, outstanding_tokens=s.outstanding_tokens)

    async def health(self, request: health_pb2.HealthCheckRequest,
                     context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(fn, req, rep):  # noqa: ANN001, ANN202
            return grpc.unary_unary_rpc_method_handler(fn, req.FromString, rep.SerializeToString)

        worker = grpc.method_handlers_generic_handler("saw.v1.Worker", {
            "Info": unary(self.info, saw_pb2.InfoRequest, saw_pb2.InfoReply),
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.generate, saw_pb2.GenerateRequest.FromString, saw_pb2.GenerateChunk.SerializeToString),
            "Abort": unary(self.abort, saw_pb2.AbortRequest, saw_pb2.AbortReply),
            "Load": unary(self.load, saw_pb2.LoadRequest, saw_pb2.LoadReply),
        })
        health = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": unary(self.health, health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse),
        })
        return [worker, health]


class RequireToken(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong worker token")

        # One unary handler refuses every method: the call ends with its status before any message.
        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._expected):
            return await continuation(handler_call_details)
        return self._refusal


async def serve(engine: Engine, address: str, token: str | None = None) -> grpc.aio.Server:
    """Start serving on address ('127.0.0.1:50051' or 'unix:/path'); with a token, only to callers that send it."""
    server = grpc.aio.server(interceptors=[RequireToken(token)] if token else None,
                             options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    for h in WorkerService(engine).handlers():
        server.add_generic_rpc_handlers((h,))
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server
