// Small DOM helpers: elements are built with text nodes only (never innerHTML), so nothing
// the API returns can become markup.

/** h('tag.class#id', {attr: value, onclick: fn}, ...children) */
export function h(spec, attrs = {}, ...children) {
  const [, tag, rest] = spec.match(/^([a-z0-9]+)(.*)$/);
  const el = document.createElement(tag);
  for (const part of rest.match(/[.#][^.#]+/g) || []) {
    if (part[0] === '.') el.classList.add(part.slice(1));
    else el.id = part.slice(1);
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  add(el, children);
  return el;
}

function add(el, children) {
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** A table: columns [{title, cell: row => node|text}], with a caption for screen readers. */
export function table(caption, columns, rows, empty = 'None.') {
  if (!rows.length) return h('p.muted', {}, empty);
  return h('table', {},
    h('caption', {}, caption),
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c.title)))),
    h('tbody', {}, rows.map((r) => h('tr', {}, columns.map((c) => h('td', {}, c.cell(r)))))));
}

let fieldSeq = 0;
/** A labelled input with a slot for the API's message about it (`data-field`). */
export function field(label, name, input = {}) {
  const id = `f${++fieldSeq}`;
  const tag = input.tag || 'input';
  const attrs = { id, name, 'aria-describedby': `${id}-err`, ...input };
  delete attrs.tag;
  delete attrs.options;
  const control = tag === 'select'
    ? h('select', attrs, (input.options || []).map((o) => h('option', { value: o }, o)))
    : h(tag, attrs);
  return h('div.field', { 'data-field': name },
    h('label', { for: id }, label), control, h('span.error', { id: `${id}-err`, 'aria-live': 'polite' }));
}

/** Shows an API error next to its field in `form`, or at the form's foot. */
export function showError(form, err) {
  form.querySelectorAll('.error').forEach((e) => { e.textContent = ''; });
  form.querySelectorAll('[aria-invalid]').forEach((e) => e.removeAttribute('aria-invalid'));
  // `args[2]` or `timeouts.request_ms` is shown at `args` or `timeouts`, if no closer slot.
  const names = err.field ? [err.field, err.field.split(/[.[]/)[0]] : [];
  const slot = names.map((n) => form.querySelector(`[data-field="${CSS.escape(n)}"]`)).find(Boolean);
  if (slot) {
    slot.querySelector('.error').textContent = err.message;
    const control = slot.querySelector('input, select, textarea');
    control.setAttribute('aria-invalid', 'true');
    control.focus();
  } else {
    form.querySelector('.form-error').textContent = err.message;
  }
}

export function clearErrors(form) {
  form.querySelectorAll('.error, .form-error').forEach((e) => { e.textContent = ''; });
}

/** A note that goes away by itself. */
export function toast(text) {
  const t = document.getElementById('toast');
  t.textContent = text;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.textContent = ''; }, 5000);
}

export function when(unix) {
  return unix ? new Date(unix * 1000).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z') : '–';
}
