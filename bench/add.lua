-- wrk script: tools/call of `add`, each request with its own JSON-RPC id.
-- BENCH_ERA: "legacy" (2025-11-25 headers) or "2026-07-28"; BENCH_TOKEN: a bearer token, if any;
-- BENCH_SESSION: the Mcp-Session-Id of an open session, if any (stateful servers).
local era = os.getenv("BENCH_ERA") or "legacy"
local token = os.getenv("BENCH_TOKEN")
local session = os.getenv("BENCH_SESSION")
local counter = 0

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
if token and token ~= "" then wrk.headers["Authorization"] = "Bearer " .. token end
if session and session ~= "" then wrk.headers["Mcp-Session-Id"] = session end
if era == "legacy" then
  wrk.headers["MCP-Protocol-Version"] = "2025-11-25"
else
  wrk.headers["MCP-Protocol-Version"] = era
  wrk.headers["Mcp-Method"] = "tools/call"
  wrk.headers["Mcp-Name"] = "add"
end

local meta = ""
if era ~= "legacy" then
  meta = ',"_meta":{"io.modelcontextprotocol/protocolVersion":"' .. era ..
         '","io.modelcontextprotocol/clientCapabilities":{}}'
end

request = function()
  counter = counter + 1
  local body = '{"jsonrpc":"2.0","id":' .. counter ..
               ',"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":3}' .. meta .. '}}'
  return wrk.format(nil, nil, nil, body)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("bench-failures %d\n", e.status + e.connect + e.read + e.write + e.timeout))
end
