// A stand-in for Google's OpenID provider, for the test suite: npm `oidc-provider` (a certified
// OpenID Connect implementation) on loopback, with Google-shaped claims and behaviour.
//
//   node tests/peers/google_standin.mjs --port 0      prints "ready http://127.0.0.1:<port>" when it serves
//
// Like Google: authorization-code flow with PKCE and nonce, RS256 id_tokens with a `kid`, claims
// sub/email/email_verified/hd/name/picture inside the id_token, `access_type=offline` for a refresh
// token only when the person is shown the consent (the first time, with `prompt=consent`, or for scopes
// not granted before), userinfo, refresh and revocation. Refresh tokens outlive the browser session, and
// at most 100 per account and client stay live: the oldest is revoked silently beyond that.
// Test controls (JSON, under /test/): register clients, choose who signs in next (or a refusal),
// untick scopes on the next consent (Google's granular consent), make the next token or API response
// misbehave, revoke a user's grants, and read what was asked for and how many refresh tokens are live.
// Scopes as Google grants them: a person may untick any scope beyond openid, and with
// include_granted_scopes=true a grant carries every scope granted to the client before.
// Google REST APIs answer in their documented shapes, checking the bearer token and its scope:
// Calendar v3 events.list on the primary calendar, Drive v3 files.list, and Tasks v1 tasklists.list.
// With --interactive the sign-in is an HTML form a browser fills in, instead of plain redirects.
// Cross-Account Protection (RISC) as Google serves it: /.well-known/risc-configuration names the issuer and
// the keys (/risc/keys, the public part of the id_token signing key), and POST /test/risc/token makes a
// security event token as Google would push it, or a forged one.

import { randomBytes } from "node:crypto";
import http from "node:http";
import { parseArgs } from "node:util";

import * as jose from "jose";
import Provider, { errors } from "oidc-provider";

const { values: options } = parseArgs({
  options: {
    port: { type: "string", default: "0" },
    interactive: { type: "boolean", default: false },
    "access-token-ttl": { type: "string", default: "3600" },
    "refresh-token-limit": { type: "string", default: "100" },  // Google's, per account and client
  },
});

const accounts = new Map(); // sub -> claims
const refreshIssuedTo = new Set(); // `${sub} ${clientId}` that already got a refresh token
const offlineGrants = new Map(); // grantId -> whether its next code exchange issues a refresh token
const refreshTokens = new Map(); // jti -> { sub, clientId, grantId, exp, revoked }, in the order issued
const refreshLimitDue = new Set(); // `${sub} ${clientId}` that got a refresh token in this token request
const authorizationRequests = []; // the query of every /auth request, for assertions
const revocations = []; // tokens revoked at the revocation endpoint
const refreshes = []; // every refresh_token grant: which grant, and whether it succeeded
const clientRedirects = new Map(); // client_id -> redirect URIs registered so far
const grantedScopes = new Map(); // `${sub} ${clientId}` -> every scope granted so far
const grantScopeKeys = new Map(); // grantId -> its `${sub} ${clientId}`, to forget the scopes when it is revoked
const apiRequests = []; // every REST API request: path, query, the token's scope, the answer's status
let untickNext = []; // scopes the person unticks on the next consent screen
const CALENDAR = "https://www.googleapis.com/auth/calendar.readonly";
const DRIVE = "https://www.googleapis.com/auth/drive.metadata.readonly";
const TASKS = "https://www.googleapis.com/auth/tasks.readonly";  // README's example of a new Google tool
let nextLogin = { sub: "100000000000000000001", email: "alice@example.com", email_verified: true,
                  name: "Alice Example", picture: "https://example.com/alice.png" };
let misbehaviour = null; // one-shot: wrong_aud | wrong_iss | wrong_nonce | token_error | no_refresh_token,
                        // or for the REST APIs api_quota | api_unauthorized | api_insufficient

const { privateKey, publicKey } = await jose.generateKeyPair("RS256", { extractable: true });
const signingKey = { ...(await jose.exportJWK(privateKey)), kid: "standin-rs256", alg: "RS256", use: "sig" };
const publicSigningKey = { ...(await jose.exportJWK(publicKey)), kid: signingKey.kid, alg: "RS256", use: "sig" };
const { privateKey: strangerKey } = await jose.generateKeyPair("RS256");  // in no JWKS: signs forged tokens

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
  scopes: ["openid", "email", "profile", CALENDAR, DRIVE, TASKS],
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
    const issue = client.grantTypeAllowed("refresh_token") && Boolean(offlineGrants.get(code.grantId));
    if (issue) offlineGrants.set(code.grantId, false);  // once per consent shown, not on a later silent sign-in
    return issue;
  },
  expiresWithSession: async () => false,  // Google's tokens outlive the browser's sign-in
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

provider.on("grant.revoked", (ctx, grantId) => {
  revocations.push({ grantId, at: Date.now() });
  refreshTokensRevoked((record) => record.grantId === grantId);
  grantedScopes.delete(grantScopeKeys.get(grantId));  // Google forgets every scope of a revoked grant
});

// include_granted_scopes=true: the new token covers every scope the person granted the client before, as
// Google's does. The person is the one login_hint names, or else the one who signs in next.
function withGrantedScopes(url) {
  if (url.searchParams.get("include_granted_scopes") !== "true") return url;
  const hint = url.searchParams.get("login_hint");
  const known = [...accounts.values()].find((claims) => hint && claims.email === hint);
  const before = grantedScopes.get(grantKey((known || nextLogin).sub, url.searchParams.get("client_id")));
  if (!before) return url;
  const asked = String(url.searchParams.get("scope") || "").split(" ").filter(Boolean);
  url.searchParams.set("scope", [...new Set([...asked, ...before])].join(" "));
  return url;
}

// --- refresh tokens as Google counts them: per account and client, live until revoked or expired

provider.on("refresh_token.saved", (token) => {
  refreshTokens.set(token.jti, { sub: token.accountId, clientId: token.clientId, grantId: token.grantId,
                                 exp: token.exp ?? Math.floor(Date.now() / 1000) + token.expiration, revoked: false });
  refreshLimitDue.add(grantKey(token.accountId, token.clientId));
});
provider.on("refresh_token.destroyed", (token) => refreshTokensRevoked((record, jti) => jti === token.jti));
provider.on("refresh_token.consumed", (token) => refreshTokensRevoked((record, jti) => jti === token.jti));
provider.on("grant.destroyed", (grant) => refreshTokensRevoked((record) => record.grantId === grant.jti));

function refreshTokensRevoked(which) {
  for (const [jti, record] of refreshTokens) if (which(record, jti)) record.revoked = true;
}

// Whether a refresh token still works: neither revoked (itself or its grant) nor expired.
async function refreshTokenLive(jti, record) {
  if (record.revoked || record.exp <= Date.now() / 1000) return false;
  const token = await provider.RefreshToken.find(jti);
  const live = Boolean(token && !token.consumed && await provider.Grant.find(token.grantId));
  if (!live) record.revoked = true;  // gone some other way than expiry
  return live;
}

async function refreshTokenCounts(sub, clientId) {
  const clients = {};
  for (const [jti, record] of refreshTokens) {
    if (record.sub !== sub || (clientId && record.clientId !== clientId)) continue;
    const counts = clients[record.clientId] ||= { live: 0, issued: 0, revoked: 0 };
    counts.issued += 1;
    if (await refreshTokenLive(jti, record)) counts.live += 1;
    else if (record.revoked) counts.revoked += 1;  // the rest expired
  }
  const total = { live: 0, issued: 0, revoked: 0 };
  for (const counts of Object.values(clients)) for (const name in total) total[name] += counts[name];
  return Object.keys(clients).length > 1 ? { ...total, clients } : total;
}

// Google keeps the newest refresh tokens of an account and client, and revokes the oldest beyond its limit.
async function enforceRefreshTokenLimit() {
  const due = [...refreshLimitDue];
  refreshLimitDue.clear();
  for (const key of due) {
    const live = [];
    for (const [jti, record] of refreshTokens) {
      if (grantKey(record.sub, record.clientId) === key && await refreshTokenLive(jti, record)) live.push(jti);
    }
    for (const jti of live.slice(0, Math.max(0, live.length - Number(options["refresh-token-limit"])))) {
      await (await provider.RefreshToken.find(jti))?.destroy();
      refreshTokens.get(jti).revoked = true;
    }
  }
}

// A refresh token this token response issued but a misbehaviour keeps from the client was never issued.
async function forgetNewRefreshToken(ctx) {
  const value = ctx.body?.refresh_token;
  if (!value || value === ctx.oidc?.params?.refresh_token) return;
  refreshTokens.delete(value);  // an opaque token's value is its jti
  await (await provider.RefreshToken.find(value))?.destroy();
}

provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === "/token") await enforceRefreshTokenLimit();  // after any misbehaviour below
});

for (const outcome of ["success", "error"]) {
  provider.on(`grant.${outcome}`, (ctx) => {
    if (ctx.oidc.params?.grant_type === "refresh_token") refreshes.push({ outcome, at: Date.now() });
  });
}

// Make the next token response misbehave the way a broken or hostile provider would.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path !== "/token" || !misbehaviour || misbehaviour.startsWith("api_") || ctx.status !== 200) return;
  const mode = misbehaviour;
  misbehaviour = null;
  if (mode === "token_error" || mode === "no_refresh_token") await forgetNewRefreshToken(ctx);
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
  const scopeKey = grantKey(session.accountId, params.client_id);
  const asked = String(params.scope).split(" ");
  const newScopes = asked.some((scope) => !grantedScopes.get(scopeKey)?.has(scope));  // before this consent
  const granted = new Set(asked.filter((scope) => !untickNext.includes(scope)));
  const unticked = asked.filter((scope) => !granted.has(scope));
  untickNext = [];
  if (unticked.length) grant.rejectOIDCScope(unticked.join(" "));  // answered: no second consent screen for it
  grantedScopes.set(scopeKey, new Set([...(grantedScopes.get(scopeKey) || []), ...granted]));
  grant.addOIDCScope([...granted].join(" "));
  const grantId = await grant.save();
  grantScopeKeys.set(grantId, scopeKey);
  const key = grantKey(session.accountId, params.client_id);
  const offline = params.access_type === "offline";
  const consentPrompt = String(params.prompt || "").split(" ").includes("consent");
  // Google shows the consent, and so issues a refresh token, the first time, when prompted, or for new scopes.
  offlineGrants.set(grantId, offline && (consentPrompt || !refreshIssuedTo.has(key) || newScopes));
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

// --- the REST APIs, in Google's documented request and response shapes

function googleError(res, status, reason, message) {
  const statuses = { 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED" };
  return json(res, status, { error: { code: status, message, errors: [{ message, domain: "global", reason }],
                                      status: statuses[status] } });
}

const EVENTS = (now) => [1, 3, 30].map((days, n) => ({
  kind: "calendar#event", id: `event${n}`, status: "confirmed", htmlLink: `https://calendar.example/event${n}`,
  summary: ["Design review", "Lunch with Bob", "Quarterly planning"][n], location: n === 1 ? "Cafe" : undefined,
  start: { dateTime: new Date(now + days * 86400e3).toISOString() },
  end: { dateTime: new Date(now + days * 86400e3 + 3600e3).toISOString() },
}));
const FILES = [
  { kind: "drive#file", id: "f1", name: "Budget 2027", mimeType: "application/vnd.google-apps.spreadsheet",
    modifiedTime: "2026-11-02T10:00:00.000Z", webViewLink: "https://drive.example/f1" },
  { kind: "drive#file", id: "f2", name: "Budget notes", mimeType: "text/plain",
    modifiedTime: "2026-10-01T09:00:00.000Z", webViewLink: "https://drive.example/f2" },
  { kind: "drive#file", id: "f3", name: "Holiday photos", mimeType: "application/vnd.google-apps.folder",
    modifiedTime: "2026-08-15T12:00:00.000Z", webViewLink: "https://drive.example/f3" },
];

async function googleApi(req, res, url) {
  const header = req.headers.authorization || "";
  const token = header.startsWith("Bearer ") ? await provider.AccessToken.find(header.slice(7)) : undefined;
  const scopes = new Set(String(token?.scope || "").split(" "));
  const entry = { path: url.pathname, query: Object.fromEntries(url.searchParams), scope: token?.scope || null };
  apiRequests.push(entry);
  const answer = (status, ...rest) => { entry.status = status; return status >= 400 ? googleError(res, status, ...rest)
                                                                                    : json(res, status, rest[0]); };
  if (!token || token.isExpired) {
    return answer(401, "authError", "Request had invalid authentication credentials.");
  }
  const mode = misbehaviour?.startsWith("api_") ? misbehaviour : null;
  if (mode) misbehaviour = null;
  if (mode === "api_quota") return answer(403, "rateLimitExceeded", "Rate Limit Exceeded");
  if (mode === "api_unauthorized") return answer(401, "authError", "Request had invalid authentication credentials.");
  if (mode === "api_insufficient") {
    return answer(403, "insufficientPermissions", "Request had insufficient authentication scopes.");
  }
  if (url.pathname === "/calendar/v3/calendars/primary/events") {
    if (!scopes.has(CALENDAR)) return answer(403, "insufficientPermissions", "Request had insufficient authentication scopes.");
    const { timeMin, timeMax, singleEvents, orderBy, maxResults } = entry.query;
    if (orderBy === "startTime" && singleEvents !== "true") {
      return answer(400, "invalid", "The requested ordering is not available for the particular query.");
    }
    if (!timeMin || Number.isNaN(Date.parse(timeMin)) || (timeMax && Number.isNaN(Date.parse(timeMax)))) {
      return answer(400, "invalid", "Bad Request");
    }
    const items = EVENTS(Date.now()).filter((event) => (!timeMax || Date.parse(event.start.dateTime) < Date.parse(timeMax))
                                                      && Date.parse(event.end.dateTime) > Date.parse(timeMin));
    return answer(200, { kind: "calendar#events", summary: "alice@example.com", timeZone: "UTC",
                         items: items.slice(0, Number(maxResults || 250)) });
  }
  if (url.pathname === "/drive/v3/files") {
    if (!scopes.has(DRIVE)) return answer(403, "insufficientPermissions", "Request had insufficient authentication scopes.");
    const match = /^(?:name|fullText) contains '((?:[^'\\]|\\.)*)' and trashed = false$/.exec(entry.query.q || "");
    if (!match) return answer(400, "invalid", "Invalid Value");
    const words = match[1].replace(/\\(.)/g, "$1").toLowerCase();
    const files = FILES.filter((file) => file.name.toLowerCase().includes(words));
    return answer(200, { kind: "drive#fileList", incompleteSearch: false,
                         files: files.slice(0, Number(entry.query.pageSize || 100)) });
  }
  if (url.pathname === "/tasks/v1/users/@me/lists") {
    if (!scopes.has(TASKS)) return answer(403, "insufficientPermissions", "Request had insufficient authentication scopes.");
    return answer(200, { kind: "tasks#taskLists", items: ["My Tasks", "Groceries"].map((title, n) => ({
      kind: "tasks#taskList", id: `list${n}`, title, updated: "2026-11-20T08:00:00.000Z" })) });
  }
  return answer(404, "notFound", "Not Found");
}

// --- Cross-Account Protection (RISC): security event tokens, signed as Google signs them

const RISC_KEYS_PATH = "/risc/keys";

// {events, aud, iat?, jti?, sign_with?: "own" | "stranger", iss?, kid?} -> a signed security event token
async function riscToken(body) {
  const { events, aud, iat, jti, iss, kid, sign_with: signWith = "own" } = body;
  if (!events || typeof events !== "object" || Array.isArray(events) || typeof aud !== "string") {
    return [400, { error: "events (an object) and aud (a string) are required" }];
  }
  if (!["own", "stranger"].includes(signWith)) return [400, { error: 'sign_with is "own" or "stranger"' }];
  const claims = { iss: iss ?? issuer, aud, iat: iat ?? Math.floor(Date.now() / 1000),
                   jti: jti ?? randomBytes(16).toString("hex"), events };
  const token = await new jose.SignJWT(claims).setProtectedHeader({ alg: "RS256", kid: kid ?? signingKey.kid })
    .sign(signWith === "own" ? privateKey : strangerKey);  // a stranger's token still names the stand-in's kid
  return [200, { token }];
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
    if (url.pathname === "/test/next-consent" && req.method === "POST") {
      untickNext = (await readJson(req)).untick || [];
      return json(res, 200, { ok: true });
    }
    if (["/calendar/v3/", "/drive/v3/", "/tasks/v1/"].some((api) => url.pathname.startsWith(api))) {
      return await googleApi(req, res, url);
    }
    if (url.pathname === "/test/revoke-user" && req.method === "POST") {
      const { sub } = await readJson(req);
      for (const key of [...grantedScopes.keys()]) if (key.startsWith(`${sub} `)) grantedScopes.delete(key);
      for (const [grantId] of offlineGrants) {
        const grant = await provider.Grant.find(grantId);
        if (grant && grant.accountId === sub) await grant.destroy();
      }
      for (const key of [...refreshIssuedTo]) if (key.startsWith(`${sub} `)) refreshIssuedTo.delete(key);
      return json(res, 200, { ok: true });
    }
    if (url.pathname === "/test/refresh-tokens" && req.method === "GET") {
      const sub = url.searchParams.get("sub");
      if (!sub) return json(res, 400, { error: "sub is required" });
      return json(res, 200, await refreshTokenCounts(sub, url.searchParams.get("client_id")));
    }
    if (url.pathname === "/.well-known/risc-configuration" && req.method === "GET") {
      return json(res, 200, { issuer, jwks_uri: issuer + RISC_KEYS_PATH, delivery_methods_supported: [
        "https://schemas.openid.net/secevent/risc/delivery-method/push"] });
    }
    if (url.pathname === RISC_KEYS_PATH && req.method === "GET") return json(res, 200, { keys: [publicSigningKey] });
    if (url.pathname === "/test/risc/token" && req.method === "POST") {
      return json(res, ...(await riscToken(await readJson(req))));
    }
    if (url.pathname === "/test/log" && req.method === "GET") {
      return json(res, 200, { authorizationRequests, revocations, refreshes, apiRequests });
    }
    if (url.pathname === "/auth") {
      authorizationRequests.push(Object.fromEntries(url.searchParams));  // as the server asked
      const widened = withGrantedScopes(url);
      req.url = widened.pathname + widened.search;
    }
    return callback(req, res);
  } catch (error) {
    if (error instanceof errors.SessionNotFound) return json(res, 400, { error: "session not found" });
    console.error(error);
    return json(res, 500, { error: String(error) });
  }
});

console.log(`ready ${issuer}`);
