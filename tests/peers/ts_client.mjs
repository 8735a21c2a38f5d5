// The TypeScript SDK's client (StreamableHTTPClientTransport with an OAuth provider), for the tests.
//
//   node tests/peers/ts_client.mjs URL
//
// Headless: when the server asks for sign-in it prints `AUTHORIZE <url>` and reads the redirect URL the
// browser reached (with ?code=) from stdin, then calls transport.finishAuth(code) and connects again.
// At the end it prints `RESULT <json>` with what it saw, and exits.

import readline from "node:readline";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const serverUrl = new URL(process.argv[2]);
const redirectUrl = "http://127.0.0.1:6888/callback";
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

const stored = { client: undefined, tokens: undefined, verifier: undefined };
const provider = {
  get redirectUrl() { return redirectUrl; },
  get clientMetadata() {
    return { client_name: "TypeScript SDK test client", redirect_uris: [redirectUrl],
             grant_types: ["authorization_code", "refresh_token"], response_types: ["code"],
             token_endpoint_auth_method: "none" };
  },
  clientInformation() { return stored.client; },
  saveClientInformation(info) { stored.client = info; },
  tokens() { return stored.tokens; },
  saveTokens(tokens) { stored.tokens = tokens; },
  saveCodeVerifier(verifier) { stored.verifier = verifier; },
  codeVerifier() { return stored.verifier; },
  redirectToAuthorization(url) { console.log(`AUTHORIZE ${url}`); },
};

async function connect() {
  const client = new Client({ name: "ts-test", version: "1.0.0" });
  const transport = new StreamableHTTPClientTransport(serverUrl, { authProvider: provider });
  try {
    await client.connect(transport);
    return client;
  } catch (error) {
    if (!(error instanceof UnauthorizedError)) throw error;
    const { value } = await lines.next();
    const code = new URL(value).searchParams.get("code");
    await transport.finishAuth(code);
    const again = new Client({ name: "ts-test", version: "1.0.0" });
    await again.connect(new StreamableHTTPClientTransport(serverUrl, { authProvider: provider }));
    return again;
  }
}

const client = await connect();
const tools = await client.listTools();
const me = await client.callTool({ name: "whoami", arguments: {} });
const note = await client.callTool({ name: "add_note", arguments: { title: "from TypeScript" } });
console.log(`RESULT ${JSON.stringify({ tools: tools.tools.map((t) => t.name), whoami: me.structuredContent,
                                       note: note.structuredContent, scope: stored.tokens?.scope })}`);
await client.close();
process.exit(0);
