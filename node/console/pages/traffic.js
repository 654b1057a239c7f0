// Traffic: calls per second, errors, and p50/p99 latency per server over the last minutes,
// as the node this page talks to saw them (each node keeps its own; Grafana has the rest).

import { api } from '../api.js';
import { h } from '../view.js';

export default {
  title: 'Traffic',
  async mount(section) {
    const note = h('p.muted');
    const charts = h('div.charts');
    section.replaceChildren(h('h1#page-title', {}, 'Traffic'), note, charts);
    const drawn = new Map(); // server -> { plot, el }

    const refresh = async () => {
      const r = await api('GET', '/traffic');
      note.textContent = `Node ${r.node}: tool calls, resource reads and prompt gets it received over the last ${Math.round(r.window_s / 60)} minutes, in ${r.bucket_s}-second points.`;
      const names = Object.keys(r.servers);
      if (!names.length) {
        charts.replaceChildren(h('p.muted', {}, 'No calls yet.'));
        drawn.clear();
        return;
      }
      for (const name of names) draw(name, r.servers[name], r);
      for (const [name, d] of drawn) {
        if (!r.servers[name]) { d.plot.destroy(); d.el.remove(); drawn.delete(name); }
      }
    };

    function series(points, r) {
      // Every bucket of the window, empty ones as gaps.
      const start = r.now - r.window_s + r.bucket_s - ((r.now - r.window_s) % r.bucket_s);
      const at = new Map(points.map((p) => [p.t, p]));
      const t = [], rate = [], errs = [], p50 = [], p99 = [];
      for (let s = start; s <= r.now; s += r.bucket_s) {
        const p = at.get(s);
        t.push(s);
        rate.push(p ? p.calls / r.bucket_s : 0);
        errs.push(p ? p.errors / r.bucket_s : 0);
        p50.push(p ? p.p50_ms : null);
        p99.push(p ? p.p99_ms : null);
      }
      return [t, rate, errs, p50, p99];
    }

    function draw(name, points, r) {
      const data = series(points, r);
      const total = points.reduce((a, p) => a + p.calls, 0);
      const errors = points.reduce((a, p) => a + p.errors, 0);
      let d = drawn.get(name);
      if (!d) {
        const summary = h('p.summary');
        const plotEl = h('div', { role: 'img' });
        const el = h('figure.chart', {}, h('figcaption', {}, name), summary, plotEl);
        charts.append(el);
        const plot = new window.uPlot({
          width: Math.min(760, charts.clientWidth || 760),
          height: 220,
          series: [
            {},
            { label: 'calls/s', stroke: '#1f6feb', scale: 'rate' },
            { label: 'errors/s', stroke: '#cf222e', scale: 'rate' },
            { label: 'p50 ms', stroke: '#2da44e', scale: 'ms' },
            { label: 'p99 ms', stroke: '#9a6700', scale: 'ms' },
          ],
          axes: [{}, { scale: 'rate', label: 'per second' }, { scale: 'ms', side: 1, label: 'ms', grid: { show: false } }],
        }, data, plotEl);
        d = { plot, el, summary, plotEl };
        drawn.set(name, d);
      } else {
        d.plot.setData(data);
      }
      d.summary.textContent = `${total} calls, ${errors} errors (${total ? ((100 * errors) / total).toFixed(1) : 0} %)`;
      d.plotEl.setAttribute('aria-label', `${name}: ${total} calls and ${errors} errors in the window`);
    }

    await refresh();
    return { refresh };
  },
};
