"""Contender: the MCP Python SDK's own `MCPServer` with the same `add` tool (`--json`: stateless with JSON
answers, `--sse`: stateless with SSE answers, `--stateful`: sessions, JSON answers), as its documentation
shows it (INFO logging, a sync tool, asyncio and h11) or `--tuned` (WARNING logging, an
async tool, uvloop and httptools, start-up objects frozen out of the GC). `--bearer TOKEN` adds the SDK's
own bearer check with an in-memory verifier: what the SDK's auth layers cost without any storage.

    python bare_sdk.py PORT [--json|--sse|--stateful] [--tuned] [--bearer TOKEN]
"""

import gc
import logging
import sys
import time

import uvicorn
from mcp.server import MCPServer
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

port = int(sys.argv[1])
tuned = "--tuned" in sys.argv
bearer = sys.argv[sys.argv.index("--bearer") + 1] if "--bearer" in sys.argv else None
base_url = f"http://127.0.0.1:{port}"


class InMemoryVerifier:
    async def verify_token(self, token: str) -> AccessToken | None:
        if token != bearer:
            return None
        return AccessToken(token=token, client_id="bench", scopes=["mcp"], expires_at=int(time.time()) + 3600,
                           resource=f"{base_url}/mcp")


auth = AuthSettings(issuer_url=base_url, resource_server_url=f"{base_url}/mcp", required_scopes=["mcp"]) \
    if bearer else None
# MCPServer sets up logging itself at its `log_level` (INFO by default, a Rich line per stateless request)
mcp = MCPServer("bare-sdk", token_verifier=InMemoryVerifier() if bearer else None, auth=auth,
                log_level="WARNING" if tuned else "INFO")

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
    logging.basicConfig(level=logging.WARNING if tuned else logging.INFO)
    app = mcp.streamable_http_app(stateless_http="--stateful" not in sys.argv, json_response="--sse" not in sys.argv,
                                  max_sessions=20_000)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, access_log=not tuned,
                            log_level="warning" if tuned else "info",
                            loop="uvloop" if tuned else "asyncio", http="httptools" if tuned else "h11")
    server = uvicorn.Server(config)
    if tuned:
        gc.collect()
        gc.freeze()
    server.run()
