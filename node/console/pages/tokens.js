// Tenants and tokens: who may call. A new token's secret is shown once, with a copy button;
// the node keeps only its hash.

import { api } from '../api.js';
import { h, table, field, showError, clearErrors, toast, when } from '../view.js';

const ROLES = ['user', 'tenant-admin', 'viewer', 'operator', 'metrics', 'cluster-admin'];

export default {
  title: 'Tenants and tokens',
  async mount(section, can) {
    const tenants = h('div');
    const tokens = h('div');
    const secret = h('div', { 'aria-live': 'polite' });
    section.replaceChildren(
      h('h1#page-title', {}, 'Tenants and tokens'),
      h('h2', {}, 'Tenants'), can.writesTenants ? tenantForm() : null, tenants,
      h('h2', {}, 'Tokens'), can.writesTokens ? tokenForm() : null, secret, tokens);

    const refresh = async () => {
      const [t, k] = [await api('GET', '/tenants'), await api('GET', '/tokens')];
      tenants.replaceChildren(table('Tenants', [
        { title: 'Name', cell: (v) => v.spec.name },
        { title: 'Description', cell: (v) => v.spec.description || '' },
        { title: 'Actions', cell: (v) => (can.writesTenants ? h('button.danger', {
          type: 'button',
          onclick: () => confirm(`Delete tenant ${v.spec.name}?`) && remove(`/tenants/${encodeURIComponent(v.spec.name)}`, `tenant ${v.spec.name} deleted`),
        }, 'Delete') : '') },
      ], t.items, 'No tenants yet.'));
      tokens.replaceChildren(table('Tokens', [
        { title: 'Id', cell: (i) => i.id },
        { title: 'Name', cell: (i) => i.name },
        { title: 'Role', cell: (i) => i.role },
        { title: 'Tenant', cell: (i) => i.tenant || '–' },
        { title: 'Scopes', cell: (i) => (i.scopes ? i.scopes.join(' ') : 'all of its role') },
        { title: 'Expires', cell: (i) => (i.expires_at ? when(i.expires_at) : 'never') },
        { title: 'Last used', cell: (i) => (i.last_used_at ? when(i.last_used_at) : 'never') },
        { title: 'Actions', cell: (i) => (can.writesTokens ? h('button.danger', {
          type: 'button',
          onclick: () => confirm(`Revoke token ${i.id} (${i.name})? Every node refuses it at once.`) && remove(`/tokens/${encodeURIComponent(i.id)}`, `token ${i.id} revoked`),
        }, 'Revoke') : '') },
      ], k.items.map((v) => v.spec || v), 'No tokens.'));
    };

    async function remove(path, done) {
      try {
        await api('DELETE', path);
        toast(done);
        await refresh();
      } catch (e) {
        toast(e.message);
      }
    }

    function tenantForm() {
      const form = h('form.inline', { 'aria-label': 'Create a tenant' },
        field('New tenant', 'name', { required: true }),
        field('Description', 'description'),
        h('button', { type: 'submit' }, 'Create tenant'),
        h('p.form-error', { role: 'alert' }));
      form.addEventListener('submit', async (ev) => {
        ev.preventDefault();
        clearErrors(form);
        try {
          await api('POST', '/tenants', { name: form.name.value.trim(), description: form.description.value.trim() || null });
          toast(`tenant ${form.name.value} created`);
          form.reset();
          await refresh();
        } catch (e) {
          showError(form, e);
        }
      });
      return form;
    }

    function tokenForm() {
      const roles = can.writesTenants ? ROLES : ['user', 'tenant-admin'];
      const form = h('form.inline', { 'aria-label': 'Create a token' },
        field('Token name', 'name', { required: true }),
        field('Role', 'role', { tag: 'select', options: roles }),
        field('Tenant', 'tenant', { value: can.writesTenants ? '' : can.tenant || '' }),
        field('Expires after (seconds, empty: never)', 'ttl_seconds', { type: 'number', min: 1 }),
        h('button', { type: 'submit' }, 'Create token'),
        h('p.form-error', { role: 'alert' }));
      form.addEventListener('submit', async (ev) => {
        ev.preventDefault();
        clearErrors(form);
        const body = { name: form.name.value.trim(), role: form.role.value, tenant: form.tenant.value.trim() || null };
        if (form.ttl_seconds.value) body.ttl_seconds = Number(form.ttl_seconds.value);
        try {
          const created = await api('POST', '/tokens', body);
          form.reset();
          showSecret(created);
          await refresh();
        } catch (e) {
          showError(form, e);
        }
      });
      return form;
    }

    function showSecret(created) {
      const value = h('code#new-token', {}, created.token);
      const copy = h('button', {
        type: 'button',
        onclick: async () => {
          await navigator.clipboard.writeText(created.token);
          toast('Copied');
        },
      }, 'Copy');
      secret.replaceChildren(h('div.card.secret', { role: 'alert' },
        h('p', {}, `Token ${created.info.id} (${created.info.role}). Its secret is shown this once; the cluster keeps only its hash.`),
        h('p', {}, value, ' ', copy),
        h('button', { type: 'button', onclick: () => secret.replaceChildren() }, 'Done, I saved it')));
      copy.focus();
    }

    await refresh();
    return { refresh };
  },
};
