"""Contender A: a raw Starlette endpoint answering the same JSON-RPC tools/call of `add`; the floor
every MCP server is measured against."""

import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def mcp(request: Request) -> Response:
    message = json.loads(await request.body())
    arguments = message["params"]["arguments"]
    total = arguments["a"] + arguments["b"]
    result = {"content": [{"type": "text", "text": str(total)}], "structuredContent": {"result": total},
              "isError": False}
    return Response(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}),
                    media_type="application/json")


app = Starlette(routes=[Route("/mcp", mcp, methods=["POST"])])

if __name__ == "__main__":
    port, fast = int(sys.argv[1]), "--fast" in sys.argv
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                loop="uvloop" if fast else "asyncio", http="httptools" if fast else "h11")
