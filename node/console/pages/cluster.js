// Cluster: who leads, at which term and index, and how each member keeps up.

import { api, learn, peek } from '../api.js';
import { h, table, when } from '../view.js';

export default {
  title: 'Cluster',
  async mount(section) {
    const body = h('div');
    section.replaceChildren(h('h1#page-title', {}, 'Cluster'), body);
    const certs = new Map(); // member id -> its /v1/node (certificate expiry), read once a visit
    const refresh = async () => {
      const s = await api('GET', '/cluster/status');
      learn(s.members);
      await Promise.all(s.members.filter((m) => !certs.has(m.id)).map(async (m) => {
        certs.set(m.id, null);
        try {
          certs.set(m.id, await peek(`${location.protocol}//${m.http_addr}/v1/node`));
        } catch { certs.delete(m.id); /* asked again at the next refresh */ }
      }));
      const leader = s.members.find((m) => m.id === s.leader);
      body.replaceChildren(
        h('dl.facts', {},
          fact('Leader', s.leader ? `node ${s.leader}${leader ? ` (${leader.http_addr})` : ''}` : 'none: no quorum'),
          fact('Term', s.term),
          fact('Answered by', `node ${s.node_id} (${s.state})`),
          fact('Committed index', s.committed_index ?? '–'),
          fact('Applied index', s.applied_index ?? '–'),
          fact('Registry revision', s.revision)),
        table('Members', [
          { title: 'Node', cell: (m) => `${m.id}${m.id === s.leader ? ' (leader)' : ''}` },
          { title: 'Address', cell: (m) => m.http_addr },
          { title: 'Voter', cell: (m) => (m.voter ? 'yes' : 'learner') },
          { title: 'Health', cell: (m) => h(`span.badge.${m.health}`, {}, m.health) },
          { title: 'Applied', cell: (m) => m.applied_index ?? '–' },
          { title: 'Matched', cell: (m) => m.matched_index ?? '–' },
          { title: 'Lag', cell: (m) => m.lag ?? '–' },
          { title: 'TLS certificate expires', cell: (m) => expiry(certs.get(m.id)) },
        ], s.members));
    };
    await refresh();
    return { refresh };
  },
};

/** The sooner of a node's two certificates' expiry, flagged when under 7 days away. */
function expiry(node) {
  const times = [node?.edge_cert_expires_at, node?.peer_cert_expires_at].filter(Boolean);
  if (!times.length) return '–';
  const at = Math.min(...times);
  const days = (at - Date.now() / 1000) / 86400;
  return h(`span${days < 7 ? '.badge.open' : ''}`, {}, `${when(at)} (${Math.floor(days)} days)`);
}

function fact(name, value) {
  return h('div', {}, h('dt', {}, name), h('dd', {}, String(value)));
}
