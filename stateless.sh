#!/bin/sh
# Stateless Streamable HTTP: every POST stands alone (no Mcp-Session-Id), so any replica can
# answer any request. 2026-07-28 clients keep every feature; 2025-era clients lose the GET
# stream and mid-call questions. Extra arguments go to server.py (see --help).
cd "$(dirname "$0")" && exec uv run server.py --stateless "$@"
