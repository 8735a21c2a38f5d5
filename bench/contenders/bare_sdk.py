"""Contender: the MCP Python SDK's own `MCPServer` with the same `add` tool, stateless and JSON, as its
documentation shows it (`--defaults`: INFO logging, a sync tool, asyncio and h11) or tuned
(WARNING logging, an async tool, uvloop and httptools, start-up objects frozen out of the GC)."""

import gc
import logging
import sys

import uvicorn
from mcp.server import MCPServer

tuned = "--tuned" in sys.argv
mcp = MCPServer("bare-sdk")

if tuned:
    @mcp.tool()
    async def add(a: float, b: float) -> float:
        """Add two numbers."""
        return a + b
else:
    @mcp.tool()
    def add(a: float, b: float) -> float:
        """Add two numbers."""
        return a + b

if __name__ == "__main__":
    port = int(sys.argv[1])
    logging.basicConfig(level=logging.WARNING if tuned else logging.INFO)
    app = mcp.streamable_http_app(stateless_http=True, json_response=True)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, access_log=not tuned,
                            log_level="warning" if tuned else "info",
                            loop="uvloop" if tuned else "asyncio", http="httptools" if tuned else "h11")
    server = uvicorn.Server(config)
    if tuned:
        gc.collect()
        gc.freeze()
    server.run()
