// Single sign-on: the authorization code flow with PKCE (RFC 7636) at a trusted issuer whose
// console client the cluster knows (`mcpctl issuer add --console-client-id`). The access token
// asked for is bound to the admin API (RFC 8707 `resource`); the page trades it at once for a
// session cookie (`POST /v1/session`) and keeps nothing of it.

const KEY = 'mcpd.sso';

function b64url(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function random(n) {
  return b64url(crypto.getRandomValues(new Uint8Array(n)));
}

/** TLS, or a loopback address (a provider on the operator's own machine). */
function safe(url) {
  const u = new URL(url);
  return u.protocol === 'https:' || ['127.0.0.1', '[::1]', 'localhost'].includes(u.hostname);
}

async function discover(issuer) {
  const base = issuer.replace(/\/$/, '');
  for (const path of ['/.well-known/openid-configuration', '/.well-known/oauth-authorization-server']) {
    let meta;
    try {
      const r = await fetch(base + path, { cache: 'no-store' });
      if (r.ok) meta = await r.json();
    } catch { /* the next document */ }
    if (!meta) continue;
    // RFC 8414 §3.3: the document must be the issuer's own.
    if (meta.issuer !== issuer) throw new Error(`${issuer}'s discovery document names another issuer (${meta.issuer})`);
    for (const ep of [meta.authorization_endpoint, meta.token_endpoint]) {
      if (!ep || !safe(ep)) throw new Error(`${issuer}'s endpoint ${ep} is not https`);
    }
    return meta;
  }
  throw new Error(`${issuer} publishes no discovery document the console can read`);
}

/** Sends the browser to `provider`'s authorization endpoint. */
export async function begin(provider, info) {
  const meta = await discover(provider.issuer);
  const verifier = random(32);
  const challenge = b64url(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier)));
  const state = random(16);
  const redirect = new URL('./', location.href).href;
  sessionStorage.setItem(KEY, JSON.stringify({
    state,
    verifier,
    redirect,
    issuer: provider.issuer,
    client_id: provider.client_id,
    token_endpoint: meta.token_endpoint,
    iss_required: Boolean(meta.authorization_response_iss_parameter_supported),
    resource: info.resource,
  }));
  const url = new URL(meta.authorization_endpoint);
  url.search = new URLSearchParams({
    response_type: 'code',
    client_id: provider.client_id,
    redirect_uri: redirect,
    scope: info.scope,
    state,
    code_challenge: challenge,
    code_challenge_method: 'S256',
    resource: info.resource,
  });
  location.assign(url.href);
}

/** On the way back from the issuer: the access token (or null when this is no such return). */
export async function complete() {
  const q = new URLSearchParams(location.search);
  if (!q.has('code') && !q.has('error')) return null;
  const saved = JSON.parse(sessionStorage.getItem(KEY) || 'null');
  sessionStorage.removeItem(KEY);
  history.replaceState(null, '', location.pathname + location.hash);
  if (q.has('error')) throw new Error(`the issuer refused: ${q.get('error')} ${q.get('error_description') || ''}`);
  if (!saved || saved.state !== q.get('state')) throw new Error('this sign-in answer is not for a request of this page (state)');
  // RFC 9207: an issuer that says it names itself in the answer must; a name must match.
  if ((saved.iss_required || q.has('iss')) && q.get('iss') !== saved.issuer) {
    throw new Error('the answer does not come from the issuer asked (RFC 9207)');
  }
  const r = await fetch(saved.token_endpoint, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'authorization_code',
      code: q.get('code'),
      redirect_uri: saved.redirect,
      client_id: saved.client_id,
      code_verifier: saved.verifier,
      resource: saved.resource,
    }),
  });
  const t = await r.json().catch(() => ({}));
  if (!r.ok || !t.access_token) throw new Error(`the issuer gave no token: ${t.error_description || t.error || r.status}`);
  return t.access_token;
}
