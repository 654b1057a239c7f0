// The console's shell: sign-in, the sections a role may see, and one refresh loop that
// paces itself so that an open page makes at most one request every two seconds.

import { api, ApiError, currentBase, learn, onMove, requestCount, setCsrf } from './api.js';
import { h, field, showError, toast } from './view.js';
import * as sso from './sso.js';
import cluster from './pages/cluster.js';
import servers from './pages/servers.js';
import tokens from './pages/tokens.js';
import policies from './pages/policies.js';
import audit from './pages/audit.js';
import traffic from './pages/traffic.js';
import bridge from './pages/bridge.js';

const pages = { cluster, servers, tokens, policies, audit, traffic, bridge };
const main = document.getElementById('main');
const PACE_MS = 2000;

let session = null;
let generation = 0; // bumped on every navigation: the loop of a page left behind stops

/** What the signed-in role may do (the API checks again; this only hides controls). */
function abilities(s) {
  const admin = s.role === 'cluster-admin';
  const tenantAdmin = s.role === 'tenant-admin';
  return {
    role: s.role,
    tenant: s.tenant,
    seesCluster: admin || s.role === 'operator' || s.role === 'viewer',
    writesServers: admin || tenantAdmin,
    togglesServers: admin || tenantAdmin || s.role === 'operator',
    writesTenants: admin,
    writesTokens: admin || tenantAdmin,
    writesPolicies: admin || tenantAdmin,
  };
}

async function boot() {
  onMove((base) => {
    document.getElementById('where').textContent = `via ${base}`;
    toast(`The node stopped answering; now using ${base}`);
  });
  document.getElementById('signout').addEventListener('click', async () => {
    await api('DELETE', '/session').catch(() => {});
    location.hash = '';
    location.reload();
  });
  try {
    const token = await sso.complete();
    if (token) {
      session = await api('POST', '/session', undefined, { auth: token });
      return start();
    }
  } catch (e) {
    return signIn(new ApiError(401, 'sso', e.message));
  }
  try {
    session = await api('GET', '/session');
  } catch (e) {
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) return signIn(e);
    main.replaceChildren(h('p.error', { role: 'alert' }, e.message));
    return;
  }
  start();
}

async function start() {
  setCsrf(session.csrf_token);
  const can = abilities(session);
  // The other members, to move to if this node dies (every page, not the cluster page only).
  if (can.seesCluster) {
    await api('GET', '/cluster/status').then((s) => learn(s.members), () => {});
  }
  document.getElementById('who').textContent =
    `${session.subject} (${session.role}${session.tenant ? `, tenant ${session.tenant}` : ''})`;
  document.getElementById('where').textContent = `via ${currentBase()}`;
  document.getElementById('signout').hidden = false;
  const nav = document.getElementById('nav');
  nav.hidden = false;
  for (const a of nav.querySelectorAll('a')) {
    const name = a.getAttribute('href').slice(2);
    a.hidden = (name === 'cluster' || name === 'audit') && !can.seesCluster;
  }
  window.addEventListener('hashchange', () => show(can));
  show(can);
}

async function signIn(why) {
  const sso_ = h('div');
  const form = h('form.card', { 'aria-labelledby': 'signin-title' },
    h('h1#signin-title', {}, 'Sign in'),
    h('p.muted', {}, 'Paste an API token (mcpctl token create --role viewer, operator, tenant-admin or cluster-admin) or an access token from a trusted issuer. The page keeps a session cookie, never the token.'),
    field('Token', 'token', { type: 'password', autocomplete: 'off', required: true }),
    h('p.form-error', { role: 'alert' }),
    h('button', { type: 'submit' }, 'Sign in'),
    sso_);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const token = form.token.value.trim();
    try {
      session = await api('POST', '/session', undefined, { auth: token });
      form.token.value = '';
      start();
    } catch (e) {
      showError(form, e.field ? e : new ApiError(e.status, e.code, e.message, 'token'));
    }
  });
  main.replaceChildren(form);
  if (why && (why.status === 403 || why.code === 'sso')) showError(form, new ApiError(why.status, why.code, why.message, 'token'));
  form.token.focus();
  // Single sign-on, with the issuers that have a console client: a tenant's own as well when
  // the page was opened for it (`/ui/?tenant=NAME`).
  try {
    const tenant = new URLSearchParams(location.search).get('tenant');
    const info = await api('GET', tenant ? `/session/providers?tenant=${encodeURIComponent(tenant)}` : '/session/providers');
    sso_.replaceChildren(...info.providers.map((p) => h('button', {
      type: 'button',
      onclick: () => sso.begin(p, info).catch((e) => showError(form, new ApiError(0, 'sso', e.message, 'token'))),
    }, `Sign in with ${p.name}`)));
  } catch { /* token sign-in still works */ }
}

async function show(can) {
  const my = ++generation;
  let name = (location.hash.match(/^#\/(\w+)/) || [])[1];
  if (!pages[name]) name = can.seesCluster ? 'cluster' : 'servers';
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.getAttribute('href') === `#/${name}`) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const section = h('section', { 'aria-labelledby': 'page-title' });
  main.replaceChildren(section);
  const before = requestCount();
  let mounted;
  try {
    mounted = await pages[name].mount(section, can);
  } catch (e) {
    if (my !== generation) return;
    if (failed(section, e)) {
      // Not a sign-in matter (a node or quorum away): try the page again, paced.
      setTimeout(() => { if (my === generation) show(can); }, PACE_MS);
    }
    return;
  }
  // Another page may have been chosen while this one loaded: it then owns the screen.
  if (my !== generation || !mounted.refresh) return;
  document.title = `${pages[name].title} · mcpd console`;
  loop(my, section, requestCount() - before, mounted.refresh);
}

/** Refreshes the page on screen, waiting two seconds per request the last round made. */
async function loop(my, section, made, refresh) {
  for (;;) {
    await new Promise((r) => setTimeout(r, PACE_MS * Math.max(1, made)));
    if (my !== generation || !section.isConnected) return;
    const before = requestCount();
    try {
      await refresh();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return signIn(e);
    }
    made = requestCount() - before;
  }
}

/** Shows why a page could not load; true when trying again may help (not a sign-in). */
function failed(section, e) {
  if (e instanceof ApiError && e.status === 401) {
    signIn(e);
    return false;
  }
  section.replaceChildren(h('p.error', { role: 'alert' }, e.message));
  return !(e instanceof ApiError && e.status === 403);
}

boot();
