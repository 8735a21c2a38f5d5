-- wrk script: a POST to /mcp that carries a bearer token (BENCH_TOKEN) but no JSON body, so the server
-- checks the token and then refuses the request (415 or 400; 401 when the token is unknown): what is left
-- to measure is the token check itself.
wrk.method = "POST"
wrk.body = "not json"
wrk.headers["Content-Type"] = "text/plain"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["MCP-Protocol-Version"] = "2025-11-25"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or "")
