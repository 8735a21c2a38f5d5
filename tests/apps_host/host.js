// A test host for MCP Apps views, built as hosts build theirs: the TypeScript SDK's Client talks to the
// server, ext-apps' AppBridge talks to the view, which runs in a sandboxed frame (scripts only, an opaque
// origin) under the Content-Security-Policy its resource's _meta.ui.csp allows. The Python test drives it
// through window.host and reads what the bridge saw.
import { Client, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";
import {
  AppBridge, PostMessageTransport, RESOURCE_MIME_TYPE, getToolUiResourceUri, isToolVisibilityAppOnly,
} from "@modelcontextprotocol/ext-apps/app-bridge";

const HOST = { name: "stream-http test host", version: "1.0.0" };
const seen = { sizes: [], links: [], modelContext: [], logs: [], toolCalls: [], errors: [] };
let client, tools = [], bridge;

// The spec's policy for a view (SEP-1865, Security): nothing beyond inline code and data: URLs unless the
// resource declares domains. The frame's origin is opaque, so 'self' would match nothing.
function policyFor(csp = {}) {
  const list = (domains, fallback) => (domains && domains.length ? domains.join(" ") : fallback);
  const resources = list(csp.resourceDomains, "");
  return [
    "default-src 'none'", `script-src 'unsafe-inline' ${resources}`, `style-src 'unsafe-inline' ${resources}`,
    `img-src data: ${resources}`, `font-src data: ${resources}`, `media-src data: ${resources}`,
    `connect-src ${list(csp.connectDomains, "'none'")}`, `frame-src ${list(csp.frameDomains, "'none'")}`,
    "object-src 'none'", `base-uri ${list(csp.baseUriDomains, "'none'")}`,
  ].join("; ");
}

function withPolicy(html, csp) {
  const meta = `<meta http-equiv="Content-Security-Policy" content="${policyFor(csp)}">`;
  return html.replace(/<head[^>]*>/i, head => head + meta);
}

window.host = {
  seen,
  async connect(mcpUrl, accessToken) {
    const headers = accessToken ? { Authorization: `Bearer ${accessToken}` } : {};
    client = new Client(HOST, {
      capabilities: { extensions: { "io.modelcontextprotocol/ui": { mimeTypes: [RESOURCE_MIME_TYPE] } } },
    });
    await client.connect(new StreamableHTTPClientTransport(new URL(mcpUrl), { requestInit: { headers } }));
    tools = (await client.listTools()).tools;
    return tools.map(tool => ({ name: tool.name, ui: tool._meta?.ui ?? null, appOnly: isToolVisibilityAppOnly(tool) }));
  },
  async show(toolName, args, hostContext) {
    const tool = tools.find(candidate => candidate.name === toolName);
    const uri = getToolUiResourceUri(tool);
    const { contents } = await client.readResource({ uri });
    const [view] = contents;
    if (view.mimeType !== RESOURCE_MIME_TYPE) throw new Error(`${uri} is ${view.mimeType}`);
    const frame = document.createElement("iframe");
    frame.setAttribute("sandbox", "allow-scripts allow-forms");
    frame.title = toolName;
    document.getElementById("stage").replaceChildren(frame);
    bridge = new AppBridge(client, HOST, { openLinks: {}, serverTools: {}, logging: {}, updateModelContext: { text: {} } },
                           { hostContext });
    bridge.onsizechange = ({ height }) => { seen.sizes.push(height); frame.style.height = `${height}px`; };
    bridge.onopenlink = async ({ url }) => { seen.links.push(url); return {}; };
    bridge.onupdatemodelcontext = async params => { seen.modelContext.push(params); return {}; };
    bridge.onloggingmessage = params => seen.logs.push(params);
    const initialized = new Promise(resolve => { bridge.oninitialized = resolve; });
    await bridge.connect(new PostMessageTransport(frame.contentWindow, frame.contentWindow));
    frame.srcdoc = withPolicy(view.text, view._meta?.ui?.csp);
    await initialized;
    await bridge.sendToolInput({ arguments: args });
    const result = await client.callTool({ name: toolName, arguments: args });
    await bridge.sendToolResult(result);
    return result;
  },
  async replay(result) {
    await bridge.sendToolResult(result);
  },
  async changeContext(partial) {
    await bridge.sendHostContextChange(partial);
  },
  async call(name, args) {
    return client.callTool({ name, arguments: args });
  },
};
window.addEventListener("securitypolicyviolation", event => seen.errors.push(`CSP: ${event.violatedDirective}`));
document.getElementById("status").textContent = "ready";
