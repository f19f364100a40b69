"""Refuse a request body over a size limit before reading it whole (introduced in chapter 02).

Without a limit, a client can send a body of any size: the server would hold all of it in memory, parse
it and tokenize it before any check saw that it is absurd. ``BodySizeLimit`` wraps the ASGI app and
answers 413 with an OpenAI-shaped error, ``code: "request_too_large"``:

- at once, when the ``Content-Length`` header already says the body is too large;
- otherwise (a chunked upload says nothing up front) as soon as the bytes counted so far pass the limit.

It is plain ASGI, below FastAPI: it sees the body as the pieces arrive, which FastAPI's handlers never do
(they get it parsed, whole).
"""

import json


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:  # the HTTP parser has checked it is a number
            return await self.refuse(send)

        received, refused, started = 0, False, False

        async def counting_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:  # a reply already under way cannot become a 413
                        await self.refuse(send)
                    # To the app, the client is gone: it stops reading and its own reply goes nowhere.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return  # the client already has its 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def refuse(self, send) -> None:
        message = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        error = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                           "code": "request_too_large"}}
        body = json.dumps(error).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            # Close rather than keep the connection: the rest of the body may still be on its way, and
            # reading it only to throw it away is what the limit is there to avoid.
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
