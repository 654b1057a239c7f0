// Audit: every admin change, who made it, from where, and the revision it produced; new
// events appear as they are committed.

import { api } from '../api.js';
import { h, field, table, when } from '../view.js';

export default {
  title: 'Audit',
  async mount(section) {
    const rows = [];
    const body = h('div');
    const head = h('p.muted');
    const form = h('form.inline', { 'aria-label': 'Filter the audit trail' },
      field('Actor (token id or subject)', 'actor'),
      field('Kind (put_server, revoke_token, ...)', 'kind'),
      h('button', { type: 'submit' }, 'Filter'));
    section.replaceChildren(h('h1#page-title', {}, 'Audit'), form, head, body);
    let since = 0;

    const query = () => {
      const q = new URLSearchParams({ since: String(since), limit: '500' });
      if (form.actor.value.trim()) q.set('actor', form.actor.value.trim());
      if (form.kind.value.trim()) q.set('kind', form.kind.value.trim());
      return q;
    };

    const refresh = async () => {
      const page = await api('GET', `/audit?${query()}`);
      for (const e of page.items) rows.unshift(e);
      rows.splice(500);
      if (page.items.length) since = page.items[page.items.length - 1].seq;
      head.textContent = `Chain head: event ${page.head_seq}, ${page.head_hash.slice(0, 16)}…; events from ${page.first_kept} kept.`;
      body.replaceChildren(table('Admin changes, newest first', [
        { title: 'Seq', cell: (e) => e.seq },
        { title: 'When', cell: (e) => when(e.at) },
        { title: 'Who', cell: (e) => `${e.actor.subject || e.actor.token_id}${e.actor.role ? ` (${e.actor.role})` : ''}` },
        { title: 'From', cell: (e) => e.from || '–' },
        { title: 'What', cell: (e) => `${e.kind}${e.object ? ` ${e.object}` : ''}` },
        { title: 'Revision', cell: (e) => e.revision },
      ], rows, 'No events match.'));
    };

    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      rows.length = 0;
      since = 0;
      await refresh();
    });
    await refresh();
    return { refresh };
  },
};
