// Policies: the ordered rules that allow or deny MCP calls, and a box that asks the cluster
// what it would decide for a call.

import { api } from '../api.js';
import { h, table, field, showError, clearErrors, toast } from '../view.js';

const list = (s) => s.split(/[\s,]+/).map((x) => x.trim()).filter(Boolean);

export default {
  title: 'Policies',
  async mount(section, can) {
    const rules = h('div');
    const editor = h('div');
    section.replaceChildren(
      h('h1#page-title', {}, 'Policies'),
      h('p.muted', {}, 'Rules are evaluated in order on the node that receives a call; the first that matches decides, and a call no rule matches is allowed.'),
      can.writesPolicies ? h('button', { type: 'button', onclick: () => edit(null) }, 'Add rule') : null,
      editor,
      rules,
      testForm());

    const refresh = async () => {
      const page = await api('GET', '/policies');
      rules.replaceChildren(table('Rules', [
        { title: 'Order', cell: (v) => v.spec.order },
        { title: 'Name', cell: (v) => v.spec.name },
        { title: 'Effect', cell: (v) => h(`span.badge.${v.spec.effect}`, {}, v.spec.effect) },
        { title: 'Targets', cell: (v) => v.spec.targets.join(' ') || 'every call' },
        { title: 'Callers', cell: (v) => callers(v.spec) },
        { title: 'Condition', cell: (v) => (v.spec.condition ? h('code', {}, v.spec.condition) : '–') },
        { title: 'Actions', cell: (v) => (can.writesPolicies ? [h('button', { type: 'button', onclick: () => edit(v) }, 'Edit'), h('button.danger', {
          type: 'button',
          onclick: async () => {
            if (!confirm(`Delete rule ${v.spec.name}?`)) return;
            try {
              await api('DELETE', `/policies/${encodeURIComponent(v.spec.name)}`, undefined, { headers: { 'if-match': String(v.revision) } });
              toast(`rule ${v.spec.name} deleted`);
              await refresh();
            } catch (e) {
              toast(e.message);
            }
          },
        }, 'Delete')] : '') },
      ], page.items, 'No rules: every call a role allows is allowed.'));
    };

    function callers(s) {
      const parts = [];
      if (s.tenants.length) parts.push(`tenants ${s.tenants.join(' ')}`);
      if (s.roles.length) parts.push(`roles ${s.roles.join(' ')}`);
      if (s.subjects.length) parts.push(`subjects ${s.subjects.join(' ')}`);
      if (s.groups.length) parts.push(`groups ${s.groups.join(' ')}`);
      return parts.join('; ') || 'anyone';
    }

    function edit(v) {
      const spec = v ? v.spec : {
        name: '', order: 100, effect: can.writesTenants ? 'allow' : 'deny', targets: [],
        tenants: can.writesTenants ? [] : [can.tenant], roles: [], subjects: [], groups: [], condition: null,
      };
      const title = v ? `Edit rule ${spec.name}` : 'Add a rule';
      const form = h('form.card', { 'aria-label': title },
        h('h2', {}, title),
        field('Name', 'name', { required: true, value: spec.name, readonly: Boolean(v) }),
        field('Order (lower first)', 'order', { type: 'number', min: 0, value: spec.order }),
        field('Effect', 'effect', { tag: 'select', options: can.writesTenants ? ['allow', 'deny'] : ['deny'] }),
        field('Targets (server:NAME, tool:SERVER__TOOL, prompt:…, resource:URI; globs)', 'targets', { value: spec.targets.join(' ') }),
        field('Tenants', 'tenants', { value: spec.tenants.join(' ') }),
        field('Roles', 'roles', { value: spec.roles.join(' ') }),
        field('Subjects', 'subjects', { value: spec.subjects.join(' ') }),
        field('Groups', 'groups', { value: spec.groups.join(' ') }),
        field('Condition (CEL)', 'condition', { value: spec.condition || '', placeholder: 'args.path.startsWith("/srv/")' }),
        h('p.form-error', { role: 'alert' }),
        h('button', { type: 'submit' }, v ? 'Save rule' : 'Add rule'),
        h('button', { type: 'button', onclick: () => editor.replaceChildren() }, 'Cancel'));
      form.effect.value = spec.effect;
      form.addEventListener('submit', async (ev) => {
        ev.preventDefault();
        clearErrors(form);
        const next = {
          ...spec,
          name: form.name.value.trim(),
          order: Number(form.order.value),
          effect: form.effect.value,
          targets: list(form.targets.value),
          tenants: list(form.tenants.value),
          roles: list(form.roles.value),
          subjects: list(form.subjects.value),
          groups: list(form.groups.value),
          condition: form.condition.value.trim() || null,
        };
        try {
          if (v) {
            await api('PUT', `/policies/${encodeURIComponent(spec.name)}`, next, { headers: { 'if-match': String(v.revision) } });
          } else {
            await api('POST', '/policies', next);
          }
          toast(`rule ${next.name} saved`);
          editor.replaceChildren();
          await refresh();
        } catch (e) {
          showError(form, e);
        }
      });
      editor.replaceChildren(form);
      form.order.focus();
    }

    function testForm() {
      const verdict = h('p#verdict', { 'aria-live': 'polite' });
      const form = h('form.card', { 'aria-label': 'Test a call' },
        h('h2', {}, 'Test this call'),
        field('Role', 'role', { tag: 'select', options: ['user', 'tenant-admin', 'cluster-admin'] }),
        field('Tenant', 'tenant', { value: can.tenant || '' }),
        field('Subject', 'subject'),
        field('Groups', 'groups'),
        field('Target (tool:SERVER__TOOL, server:NAME, ...)', 'target', { required: true }),
        field('Arguments (JSON)', 'args', { tag: 'textarea', rows: 2, placeholder: '{"path": "/srv/a"}' }),
        h('p.form-error', { role: 'alert' }),
        h('button', { type: 'submit' }, 'Test'),
        verdict);
      form.addEventListener('submit', async (ev) => {
        ev.preventDefault();
        clearErrors(form);
        let args = {};
        try {
          args = form.args.value.trim() ? JSON.parse(form.args.value) : {};
        } catch (e) {
          showError(form, { field: 'args', message: `not JSON: ${e.message}` });
          return;
        }
        try {
          const v = await api('POST', '/policies/test', {
            role: form.role.value,
            tenant: form.tenant.value.trim() || null,
            subject: form.subject.value.trim() || null,
            groups: list(form.groups.value),
            target: form.target.value.trim(),
            args,
          });
          verdict.textContent = `${v.allowed ? 'Allowed' : 'Denied'}${v.rule ? ` by rule ${v.rule}` : ' (no rule matched)'}`;
        } catch (e) {
          showError(form, e);
        }
      });
      return form;
    }

    await refresh();
    return { refresh };
  },
};
