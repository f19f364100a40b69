"""The HTTP application: the routes, the error handlers and the checks before any route (introduced in
chapter 02 as part of ``api.py``; the complete server gave it a module of its own when SGLang's native
endpoints moved to ``native.py``; the errors both dialects raise are in ``common.py``). OpenAI's Responses
API (``responses.py``) is routed here too, next to chat completions.
"""

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from ..config import ServerConfig
from . import api, native, responses
from .api_key import APIKeyCheck
from .body_limit import BodySizeLimit
from .common import APIError, api_error, http_error, invalid_body
from .frontend import Frontend
from .metrics import Metrics


# --8<-- [start:create-app]
def create_app(frontend: Frontend, config: ServerConfig, lifespan=None) -> FastAPI:
    app = FastAPI(title="minisgl", description="An OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.frontend, app.state.config = frontend, config
    frontend.metrics = Metrics(config.model_name)  # /metrics labels its series with the model's name, as SGLang's
    app.include_router(api.router)
    app.include_router(native.router)
    app.include_router(responses.router)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    # The last added runs first: the key is checked, then the body's size, before anything reads the body.
    app.add_middleware(BodySizeLimit, max_bytes=config.args.max_request_bytes)
    if config.args.api_key:
        app.add_middleware(APIKeyCheck, api_key=config.args.api_key)
    return app
# --8<-- [end:create-app]
