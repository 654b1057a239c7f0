// Servers: what is registered, how each node runs it, and (for roles that may) adding,
// editing, enabling, disabling and removing them. A server's row opens its status.

import { api } from '../api.js';
import { h, table, field, showError, clearErrors, toast, when } from '../view.js';

export default {
  title: 'Servers',
  async mount(section, can) {
    let selected = decodeURIComponent((location.hash.match(/^#\/servers\/(.+)$/) || [])[1] || '');
    const list = h('div');
    const detail = h('div');
    const catalogue = h('div');
    let shownCatalogue = '';
    const editor = h('div');
    const add = can.writesServers
      ? h('button', { type: 'button', onclick: () => edit(null) }, 'Add server')
      : null;
    section.replaceChildren(h('h1#page-title', {}, 'Servers'), add, editor, list, detail, catalogue);
    let items = [];

    const refresh = async () => {
      items = (await api('GET', '/servers')).items;
      list.replaceChildren(table('Registered servers', [
        { title: 'Name', cell: (v) => h('a', { href: `#/servers/${encodeURIComponent(v.spec.name)}` }, v.spec.name) },
        { title: 'Runs', cell: (v) => (v.spec.url ? `remote: ${v.spec.url}` : `${v.spec.command} ${v.spec.args.join(' ')}`) },
        { title: 'Tenant', cell: (v) => v.spec.tenant || 'every tenant' },
        { title: 'Enabled', cell: (v) => (v.spec.enabled ? 'yes' : 'no') },
        { title: 'Actions', cell: (v) => actions(v) },
      ], items, 'No servers yet.'));
      if (selected) await status(selected);
    };

    function actions(v) {
      const out = [];
      if (can.togglesServers) {
        out.push(h('button', {
          type: 'button',
          onclick: () => write('PATCH', v.spec.name, { enabled: !v.spec.enabled }, v.revision,
            `${v.spec.name} ${v.spec.enabled ? 'disabled' : 'enabled'}`),
        }, v.spec.enabled ? 'Disable' : 'Enable'));
      }
      if (can.writesServers) {
        out.push(h('button', { type: 'button', onclick: () => edit(v) }, 'Edit'));
        out.push(h('button.danger', {
          type: 'button',
          onclick: () => {
            if (confirm(`Remove server ${v.spec.name} from every node?`)) {
              write('DELETE', v.spec.name, undefined, v.revision, `${v.spec.name} removed`);
            }
          },
        }, 'Remove'));
      }
      return out;
    }

    async function write(method, name, body, revision, done) {
      try {
        await api(method, `/servers/${encodeURIComponent(name)}`, body, { headers: { 'if-match': String(revision) } });
        toast(done);
        await refresh();
      } catch (e) {
        toast(e.message);
      }
    }

    async function status(name) {
      let s;
      try {
        s = await api('GET', `/servers/${encodeURIComponent(name)}/status`);
      } catch (e) {
        detail.replaceChildren(h('p.error', {}, e.message));
        return;
      }
      detail.replaceChildren(
        h('h2', {}, `${name}: status`),
        h('p', {}, `placement: ${s.placement.length ? s.placement.map((n) => `node ${n}`).join(', ') : 'none'}`),
        table(`Pools of ${name}`, [
          { title: 'Node', cell: (r) => r.node },
          { title: 'Answered', cell: (r) => (r.reachable ? 'yes' : 'no') },
          { title: 'Transport', cell: (r) => [...new Set((r.details || []).map((d) => d.transport).filter(Boolean))].join(', ') || '–' },
          { title: 'Processes', cell: (r) => (r.processes.length ? r.processes.map((p) => h(`span.badge.${p}`, {}, p)) : '–') },
          { title: 'Queue', cell: (r) => r.queue_depth ?? '–' },
          { title: 'Recent errors', cell: (r) => errors(r.details) },
        ], s.replicas),
        table('Circuit breakers', [
          { title: 'Node', cell: (b) => b.node ?? '–' },
          { title: 'State', cell: (b) => h(`span.badge.${b.state}`, {}, b.state ?? JSON.stringify(b)) },
          { title: 'Calls in window', cell: (b) => b.calls ?? '–' },
          { title: 'Failures', cell: (b) => b.failures ?? '–' },
          { title: 'Probes in', cell: (b) => (b.retry_after_ms != null ? `${(b.retry_after_ms / 1000).toFixed(1)} s` : '–') },
        ], s.breakers, 'No breaker has an opinion yet.'));
      if (shownCatalogue !== name) {
        shownCatalogue = name;
        await offers(name);
      }
    }

    // What the server offers, and its tools against the approved ones: read once per
    // selection (they change only when the server says so).
    async function offers(name) {
      let c;
      let d;
      try {
        // A server still starting is waited for (up to its startup time) before it answers.
        const path = `/servers/${encodeURIComponent(name)}`;
        c = await api('GET', `${path}/catalogue`, undefined, { timeoutMs: 20000 });
        d = await api('GET', `${path}/diff`, undefined, { timeoutMs: 20000 });
      } catch (e) {
        catalogue.replaceChildren(h('p.error', {}, e.message));
        return;
      }
      if (!c.loaded) {
        catalogue.replaceChildren(h('p.muted', {}, `${name} has not listed its tools yet (no process was ready).`));
        shownCatalogue = '';
        return;
      }
      const described = (i) => (i && (i.description || i.title)) || '';
      const held = d.tools.filter((t) => t.status === 'changed' || t.status === 'new');
      const approve = can.writesServers ? h('button', {
        type: 'button',
        onclick: async () => {
          const tools = Object.fromEntries(d.tools.filter((t) => t.current).map((t) => [t.name, t.current]));
          try {
            await api('PUT', `/servers/${encodeURIComponent(name)}/pins`, { tools }, d.revision ? { headers: { 'if-match': String(d.revision) } } : {});
            toast(`${name}: ${Object.keys(tools).length} tools approved`);
            shownCatalogue = '';
            await refresh();
          } catch (e) {
            toast(e.message);
          }
        },
      }, d.pinned ? 'Approve the tools as they are now' : 'Pin the tools as they are now') : null;
      catalogue.replaceChildren(
        h('h2', {}, `${name}: catalogue`),
        h('p', {}, d.pinned
          ? (held.length ? h('span.badge.open', {}, `${held.length} tools held back until approved`) : 'Every tool is as approved.')
          : 'Tools not pinned: every tool reaches clients.', ' ', approve),
        table(`Tools of ${name}`, [
          { title: 'Tool', cell: (t) => h('code', {}, t.name) },
          { title: 'Status', cell: (t) => h(`span.badge.${t.status === 'approved' || t.status === 'unpinned' ? 'closed' : 'open'}`, {}, t.status) },
          { title: 'Description', cell: (t) => (t.status === 'changed' && described(t.approved) !== described(t.current)
            ? [h('del', {}, described(t.approved)), ' → ', h('ins', {}, described(t.current))]
            : described(t.current || t.approved)) },
        ], d.tools, 'No tools.'),
        table(`Resources of ${name}`, [
          { title: 'URI', cell: (r) => h('code', {}, r.uri) },
          { title: 'Name', cell: (r) => r.name || '' },
        ], c.resources, 'No resources.'),
        table(`Prompts of ${name}`, [
          { title: 'Prompt', cell: (p) => h('code', {}, p.name) },
          { title: 'Description', cell: described },
        ], c.prompts, 'No prompts.'));
    }

    function errors(details) {
      const bad = (details || []).filter((d) => d.last_error || d.stderr.length);
      if (!bad.length) return 'none';
      return bad.map((d) => h('details', {},
        h('summary', {}, `${d.state}: ${d.last_error || d.last_exit || 'stderr'} (${when(d.last_error_at)}, ${d.restarts} restarts)`),
        h('pre', {}, d.stderr.join('\n'))));
    }

    function edit(v) {
      const spec = v ? v.spec : { name: '', command: '', args: [], enabled: true };
      const remote = Boolean(spec.url) || !can.writesTenants;
      const form = h('form.card', { 'aria-label': v ? `Edit ${spec.name}` : 'Add a server' },
        h('h2', {}, v ? `Edit ${spec.name}` : 'Add a server'),
        field('Name', 'name', { value: spec.name, required: true, readonly: Boolean(v) }),
        field('Kind', 'kind', { tag: 'select', options: can.writesTenants ? ['local (stdio)', 'remote (HTTP)'] : ['remote (HTTP)'] }),
        field('Command', 'command', { value: spec.command || '' }),
        field('Arguments (one per line)', 'args', { tag: 'textarea', rows: 3 }),
        field('URL', 'url', { value: spec.url || '', placeholder: 'https://host/mcp' }),
        field('Tenant (empty: every tenant)', 'tenant', { value: spec.tenant || (can.writesTenants ? '' : can.tenant || '') }),
        field('Processes per node', 'pool_size', { type: 'number', min: 1, value: spec.pool_size ?? 2 }),
        h('p.form-error', { role: 'alert' }),
        h('button', { type: 'submit' }, v ? 'Save' : 'Add'),
        h('button', { type: 'button', onclick: () => editor.replaceChildren() }, 'Cancel'));
      form.args.value = (spec.args || []).join('\n');
      form.kind.value = remote ? 'remote (HTTP)' : 'local (stdio)';
      const kind = () => {
        const isRemote = form.kind.value.startsWith('remote');
        form.command.closest('.field').hidden = isRemote;
        form.args.closest('.field').hidden = isRemote;
        form.url.closest('.field').hidden = !isRemote;
      };
      form.kind.addEventListener('change', kind);
      kind();
      form.addEventListener('submit', async (ev) => {
        ev.preventDefault();
        clearErrors(form);
        const isRemote = form.kind.value.startsWith('remote');
        const next = {
          ...spec,
          name: form.name.value.trim(),
          command: isRemote ? '' : form.command.value.trim(),
          args: isRemote ? [] : form.args.value.split('\n').map((a) => a.trim()).filter(Boolean),
          tenant: form.tenant.value.trim() || null,
          pool_size: Number(form.pool_size.value),
        };
        if (isRemote) next.url = form.url.value.trim(); else delete next.url;
        try {
          if (v) {
            await api('PUT', `/servers/${encodeURIComponent(spec.name)}`, next, { headers: { 'if-match': String(v.revision) } });
          } else {
            await api('POST', '/servers', next);
          }
          editor.replaceChildren();
          toast(`${next.name} saved`);
          await refresh();
        } catch (e) {
          showError(form, e);
        }
      });
      editor.replaceChildren(form);
      form.name.focus();
    }

    await refresh();
    return { refresh };
  },
};
