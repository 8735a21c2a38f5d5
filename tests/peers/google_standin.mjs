// A stand-in for Google's OpenID provider, for the test suite: npm `oidc-provider` (a certified
// OpenID Connect implementation) on loopback, with Google-shaped claims and behaviour.
//
//   node tests/peers/google_standin.mjs --port 0      prints "ready http://127.0.0.1:<port>" when it serves
//
// Like Google: authorization-code flow with PKCE and nonce, RS256 id_tokens with a `kid`, claims
// sub/email/email_verified/hd/name/picture inside the id_token, `access_type=offline` for a refresh
// token (issued again only with `prompt=consent`), userinfo, refresh and revocation.
// Test controls (JSON, under /test/): register clients, choose who signs in next (or a refusal),
// make the next token response misbehave, revoke a user's grants, and read what was asked for.
// With --interactive the sign-in is an HTML form a browser fills in, instead of plain redirects.

import http from "node:http";
import { parseArgs } from "node:util";

import * as jose from "jose";
import Provider, { errors } from "oidc-provider";

const { values: options } = parseArgs({
  options: {
    port: { type: "string", default: "0" },
    interactive: { type: "boolean", default: false },
    "access-token-ttl": { type: "string", default: "3600" },
  },
});

const accounts = new Map(); // sub -> claims
const refreshIssuedTo = new Set(); // `${sub} ${clientId}` that already got a refresh token
const offlineGrants = new Map(); // grantId -> whether a refresh token may be issued
const authorizationRequests = []; // the query of every /auth request, for assertions
const revocations = []; // tokens revoked at the revocation endpoint
const refreshes = []; // every refresh_token grant: which grant, and whether it succeeded
const clientRedirects = new Map(); // client_id -> redirect URIs registered so far
let nextLogin = { sub: "100000000000000000001", email: "alice@example.com", email_verified: true,
                  name: "Alice Example", picture: "https://example.com/alice.png" };
let misbehaviour = null; // one-shot: wrong_aud | wrong_iss | wrong_nonce | token_error | no_refresh_token

const { privateKey } = await jose.generateKeyPair("RS256", { extractable: true });
const signingKey = { ...(await jose.exportJWK(privateKey)), kid: "standin-rs256", alg: "RS256", use: "sig" };

function grantKey(sub, clientId) {
  return `${sub} ${clientId}`;
}

const configuration = {
  jwks: { keys: [signingKey] },
  async findAccount(ctx, sub) {
    const claims = accounts.get(sub);
    if (!claims) return undefined;
    return { accountId: sub, async claims() { return { ...claims, sub }; } };
  },
  claims: {
    openid: ["sub"],
    email: ["email", "email_verified", "hd"],
    profile: ["name", "picture", "given_name", "family_name", "locale"],
  },
  scopes: ["openid", "email", "profile"],
  conformIdTokenClaims: false, // Google puts email and profile claims in the id_token itself
  extraParams: ["access_type", "hd", "include_granted_scopes"],
  responseTypes: ["code"],
  features: {
    devInteractions: { enabled: false },
    revocation: { enabled: true },
    userinfo: { enabled: true },
  },
  clientDefaults: { grant_types: ["authorization_code", "refresh_token"], response_types: ["code"] },
  ttl: { AccessToken: Number(options["access-token-ttl"]), IdToken: 3600, RefreshToken: 14 * 24 * 3600,
         Interaction: 600, Session: 3600, Grant: 14 * 24 * 3600 },
  async issueRefreshToken(ctx, client, code) {
    return client.grantTypeAllowed("refresh_token") && Boolean(offlineGrants.get(code.grantId));
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  async renderError(ctx, out) {
    ctx.type = "application/json";
    ctx.body = out;
  },
};

const issuerPort = Number(options.port);
const server = http.createServer();
await new Promise((resolve) => server.listen(issuerPort, "127.0.0.1", resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;
const provider = new Provider(issuer, configuration);

provider.on("grant.revoked", (ctx, grantId) => revocations.push({ grantId, at: Date.now() }));
for (const outcome of ["success", "error"]) {
  provider.on(`grant.${outcome}`, (ctx) => {
    if (ctx.oidc.params?.grant_type === "refresh_token") refreshes.push({ outcome, at: Date.now() });
  });
}

// Make the next token response misbehave the way a broken or hostile provider would.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path !== "/token" || !misbehaviour || ctx.status !== 200) return;
  const mode = misbehaviour;
  misbehaviour = null;
  if (mode === "token_error") {
    ctx.status = 400;
    ctx.body = { error: "invalid_grant", error_description: "Bad Request" };
    return;
  }
  if (mode === "no_refresh_token") {  // as Google answers most refreshes: no new refresh token
    const { refresh_token: _, ...rest } = ctx.body;
    ctx.body = rest;
    return;
  }
  if (!ctx.body?.id_token) return;
  const claims = jose.decodeJwt(ctx.body.id_token);
  if (mode === "wrong_aud") claims.aud = "someone-else.apps.googleusercontent.com";
  if (mode === "wrong_iss") claims.iss = "https://accounts.example.net";
  if (mode === "wrong_nonce") claims.nonce = "not-the-nonce-you-sent";
  ctx.body = { ...ctx.body, id_token: await new jose.SignJWT(claims)
    .setProtectedHeader({ alg: "RS256", kid: signingKey.kid }).sign(privateKey) };
});

function json(res, status, body) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
}

async function readJson(req) {
  let body = "";
  for await (const chunk of req) body += chunk;
  return body ? JSON.parse(body) : {};
}

async function finishLogin(req, res, details, claims) {
  accounts.set(claims.sub, claims);
  await provider.interactionFinished(req, res, { login: { accountId: claims.sub } },
                                     { mergeWithLastSubmission: false });
}

async function finishConsent(req, res, details) {
  const { params, session, prompt } = details;
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  grant.addOIDCScope(String(params.scope));
  const grantId = await grant.save();
  const key = grantKey(session.accountId, params.client_id);
  const offline = params.access_type === "offline";
  const consentPrompt = String(params.prompt || "").split(" ").includes("consent");
  offlineGrants.set(grantId, offline && (consentPrompt || !refreshIssuedTo.has(key)));
  if (offline) refreshIssuedTo.add(key);
  await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

const LOGIN_FORM = (uid, email) => `<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Sign in - Google stand-in</title></head><body><main><h1>Sign in</h1>
<form method="post" action="/interaction/${uid}/login">
<label for="email">Email</label> <input id="email" name="email" type="email" value="${email}" required>
<label for="name">Name</label> <input id="name" name="name" value="">
<button type="submit">Next</button></form></main></body></html>`;

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return json(res, 400, { error: "interaction mismatch" });
  if (nextLogin.deny) {
    nextLogin = { ...nextLogin, deny: false };
    return provider.interactionFinished(req, res, { error: "access_denied", error_description: "The user refused" },
                                        { mergeWithLastSubmission: false });
  }
  if (details.prompt.name === "login") {
    if (!options.interactive) return finishLogin(req, res, details, nextLogin);
    if (action !== "login") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      return res.end(LOGIN_FORM(uid, nextLogin.email));
    }
    const form = new URLSearchParams(await new Promise((resolve) => {
      let body = "";
      req.on("data", (chunk) => { body += chunk; });
      req.on("end", () => resolve(body));
    }));
    const email = form.get("email");
    return finishLogin(req, res, details, { ...nextLogin, email, name: form.get("name") || nextLogin.name,
                                            sub: nextLogin.email === email ? nextLogin.sub : `sub-${email}` });
  }
  return finishConsent(req, res, details);
}

const callback = provider.callback();
server.on("request", async (req, res) => {
  const url = new URL(req.url, issuer);
  try {
    const match = url.pathname.match(/^\/interaction\/([\w-]+)(?:\/(login))?$/);
    if (match) return await interaction(req, res, match[1], match[2]);
    if (url.pathname === "/test/clients" && req.method === "POST") {
      const client = await readJson(req);
      const known = clientRedirects.get(client.client_id) || new Set();
      for (const uri of client.redirect_uris) known.add(uri);  // several servers share one Google client
      clientRedirects.set(client.client_id, known);
      await provider.Client.adapter.upsert(client.client_id, {
        client_id: client.client_id, client_secret: client.client_secret, redirect_uris: [...known],
        grant_types: ["authorization_code", "refresh_token"], response_types: ["code"],
        token_endpoint_auth_method: client.token_endpoint_auth_method || "client_secret_basic",
      });
      return json(res, 200, { ok: true });
    }
    if (url.pathname === "/test/next-login" && req.method === "POST") {
      nextLogin = await readJson(req);
      return json(res, 200, { ok: true });
    }
    if (url.pathname === "/test/misbehave" && req.method === "POST") {
      misbehaviour = (await readJson(req)).mode;
      return json(res, 200, { ok: true });
    }
    if (url.pathname === "/test/revoke-user" && req.method === "POST") {
      const { sub } = await readJson(req);
      for (const [grantId] of offlineGrants) {
        const grant = await provider.Grant.find(grantId);
        if (grant && grant.accountId === sub) await grant.destroy();
      }
      for (const key of [...refreshIssuedTo]) if (key.startsWith(`${sub} `)) refreshIssuedTo.delete(key);
      return json(res, 200, { ok: true });
    }
    if (url.pathname === "/test/log" && req.method === "GET") {
      return json(res, 200, { authorizationRequests, revocations, refreshes });
    }
    if (url.pathname === "/auth") {
      authorizationRequests.push(Object.fromEntries(url.searchParams));
    }
    return callback(req, res);
  } catch (error) {
    if (error instanceof errors.SessionNotFound) return json(res, 400, { error: "session not found" });
    console.error(error);
    return json(res, 500, { error: String(error) });
  }
});

console.log(`ready ${issuer}`);
