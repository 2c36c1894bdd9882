"""``host.http`` inside a component built against the ``plugin-with-http``
world: one request through ``wasi:http/outgoing-handler``, blocking until the
whole response is read. Imported only by ``wasm.WasmHost.http``."""

from __future__ import annotations

from componentize_py_types import Err
from wit_world.imports import outgoing_handler, streams
from wit_world.imports import wasi_http_types as t

from .http import Denied, HttpError, Request, Response, Timeout, TooLarge

_METHODS = {"GET": t.Method_Get(), "PUT": t.Method_Put(), "POST": t.Method_Post(),
            "DELETE": t.Method_Delete(), "HEAD": t.Method_Head(), "PATCH": t.Method_Patch()}
_TIMEOUTS = (t.ErrorCode_ConnectionTimeout, t.ErrorCode_ConnectionReadTimeout,
             t.ErrorCode_ConnectionWriteTimeout, t.ErrorCode_HttpResponseTimeout)


def _error(request: Request, code) -> Exception:
    if isinstance(code, t.ErrorCode_HttpRequestDenied):
        return Denied(request.url)
    if isinstance(code, _TIMEOUTS):
        return Timeout()
    if isinstance(code, t.ErrorCode_HttpResponseBodySize):
        return TooLarge()
    return HttpError(f"the request failed: {type(code).__name__.removeprefix('ErrorCode_')}")


def _body_error(error) -> Exception:
    """A body read that failed without an error code (wasmtime 48's host
    passes these as text), classified by its text."""
    text = error.to_debug_string()
    if "body size exceeds limit" in text:
        return TooLarge()
    if "timeout" in text or "timed out" in text:
        return Timeout()
    return HttpError(f"the request failed: {text}")


def send(request: Request) -> Response:
    scheme, authority, path = request.parts()
    headers = t.Fields.from_list([(k, v.encode()) for k, v in request.headers])
    outgoing = t.OutgoingRequest(headers)
    outgoing.set_method(_METHODS.get(request.method.upper(), t.Method_Other(request.method)))
    outgoing.set_scheme(t.Scheme_Https() if scheme == "https" else t.Scheme_Http())
    outgoing.set_authority(authority)
    outgoing.set_path_with_query(path)
    body = outgoing.body()
    try:
        future = outgoing_handler.handle(outgoing, None)
    except Err as e:
        raise _error(request, e.value) from None
    with body.write() as stream:
        for at in range(0, len(request.body), 4096):
            stream.blocking_write_and_flush(request.body[at:at + 4096])
    t.OutgoingBody.finish(body, None)
    with future.subscribe() as ready:
        ready.block()
    answer = future.get()
    if answer is None or isinstance(answer, Err):
        raise HttpError("the response was already taken")
    response = answer.value
    if isinstance(response, Err):
        raise _error(request, response.value)
    response = response.value
    status = response.status()
    found = [(k, v.decode(errors="replace")) for k, v in response.headers().entries()]
    incoming = response.consume()
    chunks = []
    with incoming.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(64 * 1024))
            except Err as e:
                if isinstance(e.value, streams.StreamError_Closed):
                    break
                code = t.http_error_code(e.value.value)
                raise (_error(request, code) if code else _body_error(e.value.value)) from None
    t.IncomingBody.finish(incoming)
    return Response(status=status, headers=found, body=b"".join(chunks))
