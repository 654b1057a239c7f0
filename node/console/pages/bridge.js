// Bridge config: the snippet an AI client (Claude Desktop, Cursor, VS Code) needs to reach a
// server of the cluster through mcp-bridge, as `mcpctl bridge config` prints it.

import { api, currentBase } from '../api.js';
import { h, field, showError, clearErrors } from '../view.js';

const FILES = {
  'Claude Desktop': 'claude_desktop_config.json',
  Cursor: '~/.cursor/mcp.json',
  'VS Code': '.vscode/mcp.json',
};

export default {
  title: 'Bridge config',
  async mount(section, can) {
    let endpoints = [currentBase().replace(/\/$/, '')];
    try {
      const s = await api('GET', '/cluster/status');
      endpoints = s.members.map((m) => `${location.protocol}//${m.http_addr}`);
    } catch { /* a tenant admin does not see the members: the node it uses will do */ }
    const servers = (await api('GET', '/servers')).items.map((v) => v.spec.name);
    const out = h('div', { 'aria-live': 'polite' });
    const form = h('form.card', { 'aria-label': 'Bridge configuration' },
      field('AI client', 'client', { tag: 'select', options: Object.keys(FILES) }),
      field('Server (empty: every server the token may use, at /mcp)', 'server', { tag: 'select', options: ['', ...servers] }),
      field('Name in the client', 'name', { value: 'mcp-cluster', required: true }),
      field('Tenant (mints a user token for it; empty: put your own token in)', 'tenant', { value: can.tenant || '' }),
      field('Token lifetime (days)', 'days', { type: 'number', min: 1, max: 3650, value: 90 }),
      h('p.form-error', { role: 'alert' }),
      h('button', { type: 'submit' }, 'Make the snippet'));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      clearErrors(form);
      const client = form.client.value;
      let token = '<a tenant token: mcpctl token create --tenant NAME>';
      if (form.tenant.value.trim() && can.writesTokens) {
        try {
          const created = await api('POST', '/tokens', {
            name: `${form.name.value.trim()}-${client.toLowerCase().replace(/\s+/g, '-')}`,
            role: 'user',
            tenant: form.tenant.value.trim(),
            ttl_seconds: Number(form.days.value) * 86400,
          });
          token = created.token;
        } catch (e) {
          showError(form, e);
          return;
        }
      }
      const args = ['--url', endpoints.join(','), '--cacert', '<path of the cluster CA on your machine>'];
      if (form.server.value) args.push('--server', form.server.value);
      const entry = { command: 'mcp-bridge', args, env: { MCP_BRIDGE_TOKEN: token } };
      const name = form.name.value.trim();
      const snippet = client === 'VS Code'
        ? { servers: { [name]: { ...entry, type: 'stdio' } } }
        : { mcpServers: { [name]: entry } };
      const text = JSON.stringify(snippet, null, 2);
      out.replaceChildren(
        h('p', {}, `Paste this into ${FILES[client]} (merge with the entries already there). `,
          'Set command to where mcp-bridge is on that machine.'),
        h('pre#snippet', {}, text),
        h('button', { type: 'button', onclick: () => navigator.clipboard.writeText(text) }, 'Copy'));
    });
    section.replaceChildren(h('h1#page-title', {}, 'Bridge config'), form, out);
    return {};
  },
};
