"""What stands between the network and the server's routes: API keys and a body size cap.

``RequestGuard`` is a plain ASGI middleware, so both checks run before any route parses
anything: a request to ``/v1/*`` (and ``/metrics`` when protected) without a valid
``Authorization: Bearer <key>`` is a 401 before its body is read, and a body over the cap is a
413 as soon as its ``Content-Length`` says so, or, for a chunked body, as soon as the bytes
received pass the cap; no more than the cap plus one network read is ever held.
"""

import hmac
from collections.abc import Iterable, Mapping

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jaxstack.serve.server_config import check_api_keys


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class RequestGuard:
    """ASGI middleware: API keys on ``/v1/*`` (and ``/metrics`` if ``protect_metrics``),
    compared in constant time, and a cap of ``max_body_bytes`` on every request body.

    Without ``api_keys`` every route is open. A missing or wrong key is a 401 (with
    ``WWW-Authenticate: Bearer``); a body over the cap a 413. Both in OpenAI's error shape.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: Iterable[str] = (),
        protect_metrics: bool = False,
        max_body_bytes: int,
    ):
        self.app = app
        self._keys = [key.encode() for key in check_api_keys(api_keys)]
        self.protect_metrics = protect_metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._unauthorized(scope) or self._declared_too_large(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        received, too_large, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    too_large = True  # the app sees a client that went away and stops reading
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:  # whatever the app answers to the cut body, the client gets a 413
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await self._too_large()(scope, receive, send)

    def _unauthorized(self, scope: Scope) -> JSONResponse | None:
        path = scope["path"]
        guarded = path == "/v1" or path.startswith("/v1/")
        if not self._keys or not (guarded or (self.protect_metrics and path == "/metrics")):
            return None
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                given = given.strip() if scheme.lower() == b"bearer" else b""
        # every key is compared, so the time taken does not tell which one nearly matched
        valid = False
        for key in self._keys:
            valid |= hmac.compare_digest(given, key)
        if valid:
            return None
        problem = "invalid API key" if given else "no API key"
        return error_response(
            401,
            f"{problem}: send the header 'Authorization: Bearer <key>' with a key this "
            "server accepts",
            "authentication_error",
            {"WWW-Authenticate": "Bearer"},
        )

    def _declared_too_large(self, scope: Scope) -> JSONResponse | None:
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return self._too_large()
        return None

    def _too_large(self) -> JSONResponse:
        return error_response(
            413,
            f"the request body is over the server's limit of {self.max_body_bytes} bytes "
            "(jaxstack serve --max-body-mb); send a shorter prompt",
            headers={"Connection": "close"},
        )
