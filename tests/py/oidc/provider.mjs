// A real OpenID provider (the certified `oidc-provider` package) on loopback, for the tests of
// JWT/OIDC authentication in mcpd. Run by Node 22 (tests/py/oidc_provider.py starts it):
//
//   node provider.mjs --port P --keys KEYS.json --clients CLIENTS.json [--ttl SECONDS]
//                     [--scopes "mcp admin"] [--modules DIR] [--exit-on-stdin-eof]
//
// It binds 127.0.0.1:P (P may be 0: the kernel picks one), the issuer is http://127.0.0.1:P, and
// when it is listening it prints exactly one line of JSON to stdout: {"issuer": "...", "port": N}.
// Everything else it (or oidc-provider) logs goes to stderr.
//
// KEYS.json: a private JWKS ({"keys": [...]}, or a bare list); the first key signs, the others
// are only published at the JWKS endpoint (so tokens signed by them still verify).
// CLIENTS.json: a list of {client_id, client_secret, tenant?, roles?, scope?, ...other client
// metadata}; by default a client has grant_types ["client_credentials"] and authenticates with
// client_secret_basic.
//
// Access tokens: a client-credentials request with `resource=URL` (RFC 8707, any absolute URL)
// gets a JWT (RFC 9068, header typ "at+jwt", RS256, kid of the first key) whose `aud` is that URL
// and whose `scope` is the requested scopes the client may have (all of its `scope` metadata, or
// anything when it has none); `tenant`/`roles` of the client are added as claims. TTL: --ttl.
// Also on: dynamic client registration (open), authorization code + PKCE with devInteractions.
//
// SIGHUP re-reads KEYS.json and CLIENTS.json and swaps in a new provider on the same socket
// (key rotation without a restart; registrations and grants survive: they live in the
// module-level memory adapter). SIGTERM/SIGINT close the server and exit 0; so does the end of
// stdin with --exit-on-stdin-eof. --scopes adds scopes the AS knows (for clients registered
// dynamically: registration refuses scopes it does not know); --modules is the node_modules
// holding oidc-provider (default: .tools/npm/node_modules of the repo).

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

// oidc-provider prints notices with console.info (stdout): stdout is reserved for the one line.
console.log = console.info = console.debug = (...args) => console.error(...args);

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    keys: { type: 'string' },
    clients: { type: 'string' },
    ttl: { type: 'string', default: '300' },
    scopes: { type: 'string', default: '' },
    modules: { type: 'string' },
    'exit-on-stdin-eof': { type: 'boolean', default: false },
  },
  strict: true,
});

function die(msg) {
  console.error(`provider.mjs: ${msg}`);
  process.exit(2);
}

if (!args.keys) die('--keys is required');
if (!args.clients) die('--clients is required');
const port = Number(args.port);
if (!Number.isInteger(port) || port < 0 || port > 65535) die(`bad --port ${args.port}`);
const ttl = Number(args.ttl);
if (!Number.isInteger(ttl) || ttl <= 0) die(`bad --ttl ${args.ttl}`);

// oidc-provider lives in the npm test tools (.tools/npm/node_modules at the repo root), which
// ESM's resolution does not search from here: import it by path.
const here = path.dirname(fileURLToPath(import.meta.url));
const modules = path.resolve(args.modules ?? path.join(here, '../../../.tools/npm/node_modules'));
const entry = createRequire(path.join(modules, 'noop.js')).resolve('oidc-provider');
const { default: Provider, errors } = await import(pathToFileURL(entry).href);

const OIDC_SCOPES = new Set(['openid', 'offline_access']);
const cookieKeys = [crypto.randomBytes(32).toString('base64url')];

function readJson(file) {
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

function loadKeys() {
  const jwks = readJson(args.keys);
  const keys = Array.isArray(jwks) ? jwks : jwks.keys;
  if (!Array.isArray(keys) || !keys.length) throw new Error(`${args.keys}: no keys`);
  // alg and use on every key: the keystore then ranks them equally and the first one signs.
  return { keys: keys.map((k) => ({ alg: 'RS256', use: 'sig', ...k })) };
}

function loadClients() {
  const list = readJson(args.clients);
  if (!Array.isArray(list)) throw new Error(`${args.clients}: expected a list of clients`);
  return list.map((c) => ({
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
    ...c,
  }));
}

function build(issuer) {
  const clients = loadClients();
  const jwks = loadKeys();
  // Scopes the AS knows: clients may only list these (registration included), and a client
  // asking for one of them that is not in its own `scope` gets invalid_scope.
  const scopes = new Set([...OIDC_SCOPES, ...args.scopes.split(/\s+/).filter(Boolean)]);
  for (const c of clients) for (const s of (c.scope ?? '').split(/\s+/).filter(Boolean)) scopes.add(s);

  const provider = new Provider(issuer, {
    jwks,
    clients,
    scopes: [...scopes],
    cookies: { keys: cookieKeys },
    clientBasedCORS: () => true,
    extraClientMetadata: {
      properties: ['tenant', 'roles'],
      validator(_ctx, key, value) {
        if (value === undefined) return;
        if (key === 'tenant' && typeof value !== 'string') {
          throw new errors.InvalidClientMetadata('tenant must be a string');
        }
        if (key === 'roles' && !(Array.isArray(value) && value.every((r) => typeof r === 'string'))) {
          throw new errors.InvalidClientMetadata('roles must be an array of strings');
        }
      },
    },
    async extraTokenClaims(ctx, token) {
      const client = token.client ?? ctx?.oidc?.client ?? await provider.Client.find(token.clientId);
      const extra = {};
      if (client?.tenant !== undefined) extra.tenant = client.tenant;
      if (client?.roles !== undefined) extra.roles = client.roles;
      return Object.keys(extra).length ? extra : undefined;
    },
    features: {
      clientCredentials: { enabled: true },
      registration: { enabled: true },
      devInteractions: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (_ctx, _client, oneOf) => oneOf,
        useGrantedResource: async () => true,
        // Any absolute URL is a resource server: its JWT access tokens carry it as `aud`.
        async getResourceServerInfo(ctx, resourceIndicator, client) {
          const requested = (ctx.oidc?.params?.scope ?? '').split(' ').filter(Boolean);
          const allowed = client?.scope
            ? client.scope.split(' ')
            : [...new Set([...scopes, ...requested])];
          return {
            scope: allowed.filter((s) => !OIDC_SCOPES.has(s)).join(' '),
            audience: resourceIndicator,
            accessTokenTTL: ttl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    ttl: {
      AccessToken: ttl,
      ClientCredentials: ttl,
      AuthorizationCode: 60,
      IdToken: 3600,
      RefreshToken: 24 * 3600,
      Interaction: 3600,
      Session: 24 * 3600,
      Grant: 24 * 3600,
    },
  });
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  provider.on('grant.error', (_ctx, err) => console.error('grant.error', err.message, err.error_description ?? ''));
  console.error(`provider.mjs: ${issuer}, signing kid ${jwks.keys[0].kid}, keys ${jwks.keys.map((k) => k.kid).join(' ')}`
    + `, clients ${clients.map((c) => c.client_id).join(' ') || '-'}, access token ttl ${ttl} s`);
  return provider;
}

const server = http.createServer();
server.on('error', (err) => die(`listen 127.0.0.1:${port}: ${err.message}`));
server.listen(port, '127.0.0.1', () => {
  const bound = server.address().port;
  const issuer = `http://127.0.0.1:${bound}`;
  let handler;
  try {
    handler = build(issuer).callback();
  } catch (err) {
    die(err.stack ?? err.message);
  }
  server.on('request', (req, res) => handler(req, res));

  process.on('SIGHUP', () => {
    try {
      console.error('provider.mjs: SIGHUP, reloading keys and clients');
      handler = build(issuer).callback();
    } catch (err) {
      console.error('provider.mjs: reload failed, keeping the old configuration:', err);
    }
  });

  process.stdout.write(`${JSON.stringify({ issuer, port: bound })}\n`);
});

function shutdown(signal) {
  console.error(`provider.mjs: ${signal}, shutting down`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
// The test process holds our stdin: when it dies, however it dies, the pipe closes and so do we.
if (args['exit-on-stdin-eof']) {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}
