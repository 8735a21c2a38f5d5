#!/bin/sh
# Stateful Streamable HTTP (the default): sessions with Mcp-Session-Id, a GET stream for
# notifications, resumable SSE (Last-Event-ID), and questions to the user in the middle of a
# tool call for 2025-era clients. One process. Extra arguments go to server.py (see --help).
cd "$(dirname "$0")" && exec uv run server.py "$@"
