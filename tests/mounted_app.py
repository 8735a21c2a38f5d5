"""A parent Starlette app that mounts stream-http under /tools, as README's "Mounting" shows.

    PUBLIC_URL=http://127.0.0.1:8000/tools uv run uvicorn tests.mounted_app:app --port 8000

FastAPI works the same way: `FastAPI(lifespan=lifespan)`, `app.mount("/tools", tools)`, and with sign-in
`app.router.routes.extend(server.well_known_routes(settings))`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import server

settings = server.load_settings()  # PUBLIC_URL must end in /tools
if settings.auth_enabled:
    settings = server.with_secret_key(settings)
tools = server.build_app(settings)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with tools.router.lifespan_context(tools):  # the parent runs the mounted app's lifespan
        yield


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("the parent app; MCP lives at /tools/mcp")


routes = [Route("/", home), *server.well_known_routes(settings), Mount("/tools", app=tools)]
app = Starlette(routes=routes, lifespan=lifespan)
