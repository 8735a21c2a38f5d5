// Contender: the TypeScript MCP SDK's stateless Streamable HTTP server with the same `add` tool, as its
// example simpleStatelessStreamableHttp shows it (a server and transport per request, Express), answering
// JSON. Usage: node ts_sdk.cjs PORT PEERS_DIR (the npm packages the tests install, tests/peers).
const { createRequire } = require("node:module");
const path = require("node:path");

const [port, peers] = [Number(process.argv[2]), process.argv[3]];
const need = createRequire(path.join(peers, "package.json"));
const { McpServer } = need("@modelcontextprotocol/sdk/server/mcp.js");
const { StreamableHTTPServerTransport } = need("@modelcontextprotocol/sdk/server/streamableHttp.js");
const { createMcpExpressApp } = need("@modelcontextprotocol/sdk/server/express.js");
const z = need("zod/v4");

function newServer() {
  const server = new McpServer({ name: "ts-sdk", version: "1.0.0" });
  server.registerTool("add", {
    description: "Add two numbers.",
    inputSchema: { a: z.number(), b: z.number() },
    outputSchema: { result: z.number() },
  }, async ({ a, b }) => ({ content: [{ type: "text", text: String(a + b) }], structuredContent: { result: a + b } }));
  return server;
}

const app = createMcpExpressApp();
app.post("/mcp", async (req, res) => {
  const server = newServer();
  const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
  res.on("close", () => { transport.close(); server.close(); });
  await server.connect(transport);
  await transport.handleRequest(req, res, req.body);
});
app.listen(port, "127.0.0.1");
