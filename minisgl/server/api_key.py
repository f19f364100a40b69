"""``--api-key``: every endpoint but ``/health`` wants ``Authorization: Bearer KEY`` (introduced in chapter 06).

SGLang and vLLM spell the option the same way, and the openai client sends its ``api_key`` in exactly
that header, so a client that works with them works here. A request without the right key gets 401 and
an OpenAI-shaped error, ``code: "invalid_api_key"``, before any handler runs or any body is read.
``/health`` stays open: a load balancer's probe carries no key.

Plain ASGI, like ``body_limit.py``: it looks at the headers only.
"""

import hmac
import json

OPEN_PATHS = {"/health"}


# --8<-- [start:api-key-check]
class APIKeyCheck:
    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):  # in constant time: no guessing the key byte by byte
            return await self.app(scope, receive, send)
        message = "a valid API key is needed: send the header 'Authorization: Bearer <key>'"
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
# --8<-- [end:api-key-check]
