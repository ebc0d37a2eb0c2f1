// kiln dashboard: a single page in plain JavaScript (no framework, no build step).
//
// Routes live in the URL hash (#/jobs, #/jobs/ID, #/files, #/models). The API key is kept in
// sessionStorage (this tab only) and sent as `Authorization: Bearer` on every call. A job's
// events arrive over the server-sent events stream, read with fetch() because EventSource
// cannot send headers. Nothing is loaded from anywhere but this server.
'use strict';

(() => {
  const KEY_STORAGE = 'kiln.apiKey';
  const JOB_POLL_MS = 2000;
  const LIST_POLL_MS = 3000;
  const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
  const STATUSES = ['running', 'queued', 'paused', 'validating_files', 'succeeded', 'failed', 'cancelled'];
  const SERIES_COLORS = {
    train_loss: '#2563eb',
    valid_loss: '#ea580c',
    valid_accuracy: '#16a34a',
    valid_macro_f1: '#9333ea',
    valid_micro_f1: '#0891b2',
    valid_roc_auc: '#db2777',
    valid_label_accuracy: '#ca8a04',
    valid_mean_token_accuracy: '#16a34a',
  };
  const EXTRA_COLORS = ['#0d9488', '#7c3aed', '#b45309', '#be123c', '#4d7c0f', '#1d4ed8'];

  const app = document.getElementById('app');
  const toasts = document.getElementById('toasts');
  let key = sessionStorage.getItem(KEY_STORAGE);
  let view = null; // the current page's lifetime (see newView)
  let shell = null; // the top bar and the main element, built once per sign-in

  // ---------------------------------------------------------------- DOM helpers

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    if (!attrs) return;
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.setAttribute('class', v);
      else if (k === 'style') Object.assign(el.style, v);
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'value') el.value = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function replace(el, ...children) {
    el.replaceChildren();
    append(el, children);
    return el;
  }

  // ---------------------------------------------------------------- formatting

  function fmtAge(unix) {
    if (!unix) return '—';
    const s = Math.max(0, Date.now() / 1000 - unix);
    if (s < 10) return 'just now';
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    if (s < 86400 * 30) return `${Math.floor(s / 86400)} d ago`;
    return fmtDate(unix);
  }

  function fmtDate(unix) {
    if (!unix) return '—';
    return new Date(unix * 1000).toLocaleString(undefined, {
      year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
    });
  }

  function fmtTime(unix) {
    return new Date(unix * 1000).toLocaleTimeString(undefined, { hour12: false });
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return '—';
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`;
    return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')} min`;
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return '—';
    const units = ['B', 'KB', 'MB', 'GB', 'TB'];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return `${i === 0 ? v : v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
  }

  function fmtMetric(v) {
    if (typeof v !== 'number' || !isFinite(v)) return '—';
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(2);
    return v.toFixed(4);
  }

  function fmtCount(n) {
    if (n >= 1e9) return `${(n / 1e9).toFixed(1)}B`;
    if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
    if (n >= 1e3) return `${(n / 1e3).toFixed(0)}K`;
    return String(n);
  }

  function fmtInt(n) {
    return typeof n === 'number' ? n.toLocaleString() : '—';
  }

  const METRIC_NAMES = {
    train_loss: 'training loss',
    valid_loss: 'validation loss',
    valid_accuracy: 'accuracy',
    valid_macro_f1: 'macro F1',
    valid_micro_f1: 'micro F1',
    valid_roc_auc: 'ROC AUC',
    valid_label_accuracy: 'label accuracy',
    valid_mean_token_accuracy: 'token accuracy',
  };

  function metricName(name) {
    return METRIC_NAMES[name] || name.replace(/^valid_/, '').replace(/^train_/, 'training ').replace(/_/g, ' ');
  }

  function fmtRate(v) {
    if (typeof v !== 'number' || !isFinite(v)) return '—';
    return v >= 100 ? Math.round(v).toLocaleString() : v.toFixed(1);
  }

  function shortKey(k) {
    if (!k) return '';
    return k.length > 14 ? `${k.slice(0, 8)}…${k.slice(-4)}` : '••••';
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  function authHeaders(extra) {
    return Object.assign({ Authorization: `Bearer ${key}` }, extra || {});
  }

  async function failure(res) {
    const text = await res.text().catch(() => '');
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
    const message = (body && body.error && body.error.message) || `${res.status} ${res.statusText}`.trim();
    if (res.status === 401) signOut(`The server rejected the key: ${message}`);
    return new ApiError(res.status, message, body);
  }

  async function api(path, opts = {}) {
    const init = { method: opts.method || 'GET', headers: authHeaders(), signal: opts.signal };
    if (opts.json !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(opts.json);
    } else if (opts.form) {
      init.body = opts.form;
    }
    const res = await fetch(path, init);
    if (!res.ok) throw await failure(res);
    const text = await res.text();
    return text ? JSON.parse(text) : null;
  }

  // Splits a text/event-stream into messages. Lines end with \n, \r\n or \r; a blank line
  // ends a message; `data:` lines of one message are joined with \n; `:` lines are comments.
  function eventStreamParser(onMessage) {
    let buffer = '';
    let data = [];
    let type = '';
    return (chunk) => {
      buffer += chunk;
      let start = 0;
      for (;;) {
        const rest = buffer.slice(start);
        const m = /\r\n|\r|\n/.exec(rest);
        if (!m) break;
        // A \r at the very end may be the first half of a \r\n still in flight.
        if (m[0] === '\r' && m.index === rest.length - 1) break;
        const line = rest.slice(0, m.index);
        start += m.index + m[0].length;
        if (line === '') {
          if (data.length) onMessage({ type: type || 'message', data: data.join('\n') });
          data = [];
          type = '';
        } else if (line[0] !== ':') {
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? '' : line.slice(colon + 1);
          if (value[0] === ' ') value = value.slice(1);
          if (field === 'data') data.push(value);
          else if (field === 'event') type = value;
        }
      }
      buffer = buffer.slice(start);
    };
  }

  // Reads a job's event stream until `[DONE]` (returns true) or the connection ends (false).
  async function readEventStream(jobId, signal, onEvent) {
    const res = await fetch(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?stream=true`, {
      headers: authHeaders({ Accept: 'text/event-stream' }),
      signal,
      cache: 'no-store',
    });
    if (!res.ok) throw await failure(res);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let done = false;
    const feed = eventStreamParser((msg) => {
      if (msg.data === '[DONE]') { done = true; return; }
      try { onEvent(JSON.parse(msg.data)); } catch (e) { console.warn('unreadable event', e); }
    });
    for (;;) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      feed(value);
      if (done) { reader.cancel().catch(() => {}); break; }
    }
    return done;
  }

  // ---------------------------------------------------------------- toasts & dialogs

  function toast(message, opts = {}) {
    const el = h('div', { class: `toast${opts.error ? ' error' : ''}`, role: opts.error ? 'alert' : 'status' },
      h('div', { class: 'msg' }, opts.title ? h('strong', null, opts.title) : null, message),
      h('button', { type: 'button', 'aria-label': 'Dismiss', onclick: () => el.remove() }, '×'));
    toasts.append(el);
    setTimeout(() => el.remove(), opts.error ? 9000 : 4500);
  }

  function toastError(e, title) {
    if (e && e.name === 'AbortError') return;
    if (e instanceof ApiError && e.status === 401) return; // signOut already explains
    toast(e && e.message ? e.message : String(e), { error: true, title: title || 'Request failed' });
  }

  function confirmDialog({ title, body, confirm, cancel, danger }) {
    return new Promise((resolve) => {
      const close = (answer) => { backdrop.remove(); document.removeEventListener('keydown', onKey); resolve(answer); };
      const onKey = (e) => { if (e.key === 'Escape') close(false); };
      const ok = h('button', { class: `btn ${danger ? 'danger solid' : 'primary'}`, type: 'button', onclick: () => close(true) }, confirm);
      const backdrop = h('div', { class: 'backdrop', onclick: (e) => { if (e.target === backdrop) close(false); } },
        h('div', { class: 'dialog', role: 'dialog', 'aria-modal': 'true', 'aria-labelledby': 'dialog-title' },
          h('h2', { id: 'dialog-title' }, title),
          h('p', null, body),
          h('div', { class: 'actions' },
            h('button', { class: 'btn', type: 'button', onclick: () => close(false) }, cancel || 'Back'),
            ok)));
      document.addEventListener('keydown', onKey);
      document.body.append(backdrop);
      ok.focus();
    });
  }

  // ---------------------------------------------------------------- redrawing under the pointer

  // A periodic redraw that replaces the element under a pressed mouse button swallows the
  // click (mousedown and mouseup land on different elements). Redraws wait for the release.
  let pointerDown = false;
  const deferred = new Set();
  document.addEventListener('pointerdown', () => { pointerDown = true; }, true);
  const release = () => {
    pointerDown = false;
    setTimeout(() => {
      const fns = [...deferred];
      deferred.clear();
      fns.forEach((fn) => fn());
    }, 0);
  };
  document.addEventListener('pointerup', release, true);
  document.addEventListener('pointercancel', release, true);

  function calmly(fn) {
    if (pointerDown) deferred.add(fn);
    else fn();
  }

  // ---------------------------------------------------------------- page lifetime

  // Everything a page starts (timers, fetches, streams) ends when the route changes.
  function newView() {
    if (view) view.close();
    const controller = new AbortController();
    const timers = [];
    const closers = [];
    let open = true;
    view = {
      signal: controller.signal,
      get open() { return open; },
      every(fn, ms) {
        let running = false;
        const tick = async () => {
          if (running || !open) return;
          running = true;
          try { await fn(); } catch (e) { toastError(e); } finally { running = false; }
        };
        tick();
        timers.push(setInterval(tick, ms));
      },
      onClose(fn) { closers.push(fn); },
      close() {
        open = false;
        controller.abort();
        timers.forEach(clearInterval);
        closers.forEach((fn) => fn());
      },
    };
    return view;
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      if (signal) signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
    });
  }

  // ---------------------------------------------------------------- routing

  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, '');
    const q = raw.indexOf('?');
    const path = q < 0 ? raw : raw.slice(0, q);
    const params = new URLSearchParams(q < 0 ? '' : raw.slice(q + 1));
    const parts = path.split('/').filter(Boolean).map((p) => {
      try { return decodeURIComponent(p); } catch (_) { return p; }
    });
    return { parts, params };
  }

  function route() {
    if (!key) { renderSignIn(); return; }
    const { parts, params } = parseHash();
    const section = parts[0] || '';
    if (!['jobs', 'files', 'models'].includes(section)) { location.replace('#/jobs'); return; }
    ensureShell(section);
    const v = newView();
    const main = replace(shell.main);
    if (section === 'jobs' && parts[1] === 'new') newJobPage(v, main);
    else if (section === 'jobs' && parts[1]) jobPage(v, main, parts[1]);
    else if (section === 'jobs') jobsPage(v, main, params);
    else if (section === 'files') filesPage(v, main);
    else modelsPage(v, main, params);
    window.scrollTo(0, 0);
  }

  function ensureShell(section) {
    if (!shell) {
      const links = {};
      const nav = h('nav', { class: 'nav', 'aria-label': 'Sections' },
        ['jobs', 'files', 'models'].map((s) => {
          links[s] = h('a', { href: `#/${s}` }, s[0].toUpperCase() + s.slice(1));
          return links[s];
        }));
      const top = h('header', { class: 'topbar' },
        h('a', { class: 'brand', href: '#/jobs' }, h('img', { src: '/assets/favicon.svg', alt: '' }), 'kiln', h('small', null, 'fine-tuning')),
        nav,
        h('div', { class: 'spacer' }),
        h('div', { class: 'whoami' },
          h('span', { title: 'The API key this tab signed in with' }, 'Key ', h('code', null, shortKey(key))),
          h('button', { class: 'btn small', type: 'button', onclick: () => signOut() }, 'Sign out')));
      const main = h('main', { class: 'page', id: 'main' });
      shell = { links, main };
      replace(app, top, main);
    }
    for (const [s, a] of Object.entries(shell.links)) a.classList.toggle('active', s === section);
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    key = null;
    if (view) { view.close(); view = null; }
    shell = null;
    renderSignIn(message);
  }

  // ---------------------------------------------------------------- sign in

  function renderSignIn(message) {
    document.title = 'Sign in · kiln';
    const input = h('input', {
      class: 'input', id: 'api-key', name: 'api-key', type: 'password', autocomplete: 'off',
      spellcheck: 'false', placeholder: 'sk-kiln-…', required: true,
    });
    const error = h('div', { class: 'error', role: 'alert' }, message || '');
    const button = h('button', { class: 'btn primary', type: 'submit' }, 'Sign in');
    const form = h('form', {
      onsubmit: async (e) => {
        e.preventDefault();
        const candidate = input.value.trim();
        if (!candidate) { error.textContent = 'Paste an API key first.'; return; }
        button.disabled = true;
        error.textContent = '';
        try {
          const res = await fetch('/v1/fine_tuning/jobs?limit=1', { headers: { Authorization: `Bearer ${candidate}` } });
          if (!res.ok) {
            const body = await res.json().catch(() => null);
            throw new Error((body && body.error && body.error.message) || `The server answered ${res.status}.`);
          }
          key = candidate;
          sessionStorage.setItem(KEY_STORAGE, key);
          shell = null;
          if (!parseHash().parts.length) location.hash = '#/jobs';
          route();
        } catch (err) {
          error.textContent = err.message;
          button.disabled = false;
          input.select();
        }
      },
    },
    h('div', null, h('label', { class: 'field', for: 'api-key' }, 'API key'), input),
    error,
    button);
    replace(app, h('div', { class: 'signin' },
      h('div', { class: 'card' },
        h('div', { class: 'brand' }, h('img', { src: '/assets/favicon.svg', alt: '' }), 'kiln'),
        h('h1', null, 'Sign in'),
        h('p', null, 'Use an API key of this kiln server. It stays in this browser tab (session storage) and is sent only to this server.'),
        form)));
    input.focus();
  }

  // ---------------------------------------------------------------- shared pieces

  function jobState(job) {
    if (job.paused) return 'paused';
    if (job.cancel_requested) return 'cancelling';
    return job.status;
  }

  function badge(status, big) {
    const label = { validating_files: 'validating', uploaded: 'validating' }[status] || status;
    return h('span', { class: `badge ${status}${big ? ' big' : ''}`, dataset: { status } }, label);
  }

  function methodOf(job) {
    const type = (job.method && job.method.type) || 'supervised';
    const hp = (job.method && job.method[type] && job.method[type].hyperparameters) || {};
    return { type, hp, strategy: typeof hp.strategy === 'string' ? hp.strategy : null };
  }

  function progressOf(job) {
    const p = job.progress || {};
    const total = Number(p.total_steps) || 0;
    const step = Number(p.step) || 0;
    let fraction = total > 0 ? Math.min(1, step / total) : 0;
    if (job.status === 'succeeded') fraction = 1;
    return { step, total, fraction, eta: p.eta_seconds, speed: p.examples_per_second, epoch: p.epoch };
  }

  function progressBar(state, fraction, big) {
    return h('div', { class: `bar ${state}${big ? ' big' : ''}`, role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': Math.round(fraction * 100) },
      h('span', { style: { width: `${(fraction * 100).toFixed(1)}%` } }));
  }

  function copyButton(text) {
    return h('button', {
      class: 'btn ghost small', type: 'button', title: 'Copy',
      onclick: async (e) => {
        e.stopPropagation();
        try { await navigator.clipboard.writeText(text); toast('Copied to the clipboard.'); } catch (_) { toast('Copying is not allowed here.', { error: true }); }
      },
    }, 'Copy');
  }

  function pageHead(title, sub, actions) {
    return h('div', { class: 'page-head' },
      h('div', { class: 'titles' }, h('h1', null, title), sub ? h('div', { class: 'sub' }, sub) : null),
      actions ? h('div', { class: 'actions' }, actions) : null);
  }

  // ---------------------------------------------------------------- jobs list

  function jobsPage(v, main, params) {
    document.title = 'Jobs · kiln';
    let filter = params.get('status') || 'all';
    let jobs = null;
    let hasMore = false;
    const chips = h('div', { class: 'chips', role: 'tablist', 'aria-label': 'Filter by status' });
    const body = h('div', { class: 'card-body flush' }, h('div', { class: 'loading' }, h('span', { class: 'spinner' })));
    main.append(
      pageHead('Fine-tuning jobs', 'Every job of this key\'s project, newest first. The list refreshes by itself.',
        h('a', { class: 'btn primary', href: '#/jobs/new', id: 'new-job' }, 'New job')),
      h('div', { class: 'card' },
        h('div', { class: 'card-head' }, chips),
        body));

    function drawChips() {
      const counts = { all: jobs.length };
      for (const j of jobs) { const s = jobState(j) === 'cancelling' ? 'running' : jobState(j); counts[s] = (counts[s] || 0) + 1; }
      const options = ['all', ...STATUSES.filter((s) => counts[s] || s === filter || ['running', 'queued', 'succeeded', 'failed'].includes(s))];
      replace(chips, options.map((s) => h('button', {
        type: 'button', role: 'tab', 'aria-selected': String(s === filter),
        class: `chip${s === filter ? ' active' : ''}`, dataset: { filter: s },
        onclick: () => {
          filter = s;
          history.replaceState(null, '', s === 'all' ? '#/jobs' : `#/jobs?status=${s}`);
          draw();
        },
      }, s === 'all' ? 'All' : (s === 'validating_files' ? 'Validating' : s[0].toUpperCase() + s.slice(1)), h('span', { class: 'count' }, counts[s] || 0))));
    }

    function draw() {
      drawChips();
      const shown = jobs.filter((j) => {
        if (filter === 'all') return true;
        const s = jobState(j);
        return s === filter || (filter === 'running' && s === 'cancelling');
      });
      if (!jobs.length) {
        replace(body, h('div', { class: 'empty' },
          h('strong', null, 'No fine-tuning jobs yet'),
          'Upload a dataset on the Files page, then create a job with the API:',
          h('pre', { class: 'code' }, `curl ${location.origin}/v1/fine_tuning/jobs \\\n  -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \\\n  -d '{"model": "sentence-transformers/all-MiniLM-L6-v2", "training_file": "file-…"}'`)));
        return;
      }
      if (!shown.length) {
        replace(body, h('div', { class: 'empty' }, h('strong', null, 'No jobs with this status'), 'Choose another filter above.'));
        return;
      }
      const rows = shown.map((j) => {
        const state = jobState(j);
        const m = methodOf(j);
        const p = progressOf(j);
        const running = j.status === 'running';
        return h('tr', { class: 'clickable', dataset: { job: j.id }, onclick: (e) => { if (!e.target.closest('a')) location.hash = `#/jobs/${j.id}`; } },
          h('td', null,
            h('a', { class: 'id', href: `#/jobs/${j.id}` }, j.id),
            h('div', { class: 'sub' }, j.user_provided_suffix ? `suffix: ${j.user_provided_suffix}` : (j.fine_tuned_model ? 'model exported' : ' '))),
          h('td', null, badge(state)),
          h('td', null, h('div', { class: 'ellipsis', title: j.model }, j.model)),
          h('td', null, m.type, m.strategy ? h('span', { class: 'muted' }, ` · ${m.strategy}`) : null),
          h('td', null, h('div', { class: 'progress' },
            progressBar(state, p.fraction),
            h('span', { class: 'label' }, p.total ? `${fmtInt(p.step)} / ${fmtInt(p.total)}` : (j.status === 'succeeded' ? 'done' : '—')))),
          h('td', { class: 'nowrap num' }, running && p.eta !== null && p.eta !== undefined ? fmtDuration(p.eta) : h('span', { class: 'muted' }, '—')),
          h('td', { class: 'nowrap', title: fmtDate(j.created_at) }, fmtAge(j.created_at)));
      });
      replace(body, h('div', { class: 'table-wrap' },
        h('table', { class: 'table', id: 'jobs-table' },
          h('thead', null, h('tr', null, ['Job', 'Status', 'Model', 'Method', 'Progress', 'ETA', 'Created'].map((c) => h('th', null, c)))),
          h('tbody', null, rows))),
      hasMore ? h('div', { class: 'empty small' }, 'Showing the newest 100 jobs.') : null);
    }

    v.every(async () => {
      const list = await api('/v1/fine_tuning/jobs?limit=100', { signal: v.signal });
      if (!v.open) return;
      jobs = list.data;
      hasMore = list.has_more;
      calmly(draw);
    }, LIST_POLL_MS);
  }

  // ---------------------------------------------------------------- charts

  function niceStep(range, count) {
    const raw = range / Math.max(1, count);
    const mag = 10 ** Math.floor(Math.log10(raw));
    const norm = raw / mag;
    return (norm >= 5 ? 10 : norm >= 2 ? 5 : norm >= 1 ? 2 : 1) * mag;
  }

  function ticks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const step = niceStep(hi - lo, count);
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
    return out;
  }

  function tickLabel(t, span) {
    if (span >= 1000 && Math.abs(t) >= 1000) return `${+(t / 1000).toFixed(1)}k`;
    const digits = span >= 10 ? 0 : span >= 1 ? 1 : span >= 0.1 ? 2 : 3;
    return t.toFixed(digits);
  }

  // Exponential moving average (TensorBoard-style smoothing) for noisy per-step losses.
  function smooth(points, weight) {
    let last = null;
    return points.map(([x, y]) => {
      last = last === null ? y : last * weight + y * (1 - weight);
      return [x, last];
    });
  }

  // A line chart in SVG: `series` is [{key, name, color, points: [[step, value]]}].
  // Redraws in place; the caller passes the step range so a running job's curve grows
  // across a fixed axis.
  function lineChart({ id, height = 250, emptyText, yZero, unitRange }) {
    const root = h('div', { class: 'chart', id });
    const legend = h('div', { class: 'legend' });
    const holder = h('div');
    const tooltip = h('div', { class: 'tooltip hidden' });
    root.append(legend, holder, tooltip);
    let last = null;
    let cursorX = null;

    function draw(series, xMax) {
      last = { series, xMax };
      const present = series.filter((s) => s.points.length);
      replace(legend, present.map((s) => h('span', { class: 'item', dataset: { legend: s.key } },
        h('span', { class: 'swatch', style: { background: s.color } }),
        s.name,
        h('span', { class: 'val' }, fmtMetric(s.points[s.points.length - 1][1])))));
      if (!present.length) {
        replace(holder, h('div', { class: 'chart-empty' }, emptyText));
        return;
      }
      const width = Math.max(320, holder.clientWidth || root.clientWidth || 600);
      const pad = { l: 50, r: 14, t: 10, b: 30 };
      const iw = width - pad.l - pad.r;
      const ih = height - pad.t - pad.b;
      const xs = present.flatMap((s) => s.points.map((p) => p[0]));
      const ys = present.flatMap((s) => s.points.map((p) => p[1]));
      // The step axis fits the data (ending on a round step), so a young run is readable;
      // it widens as the run goes on.
      const x0 = 0;
      const xTicks = Math.max(3, Math.floor(iw / 90));
      const xMaxData = Math.max(...xs, 1);
      const xstep = niceStep(xMaxData, xTicks);
      const x1 = Math.min(Math.ceil(xMaxData / xstep - 1e-9) * xstep, Math.max(xMax || 0, xMaxData));
      let y0 = Math.min(...ys);
      let y1 = Math.max(...ys);
      // Accuracies and F1 scores live in [0, 1]: show up to 1, from a round value below.
      if (unitRange && y0 >= 0 && y1 <= 1) { y0 = Math.max(0, Math.floor((y0 - 0.05) * 10) / 10); y1 = 1; }
      if (yZero && y0 > 0) y0 = 0;
      if (y1 - y0 < 1e-9) { y1 += Math.abs(y1) * 0.1 || 1; y0 -= yZero ? 0 : Math.abs(y0) * 0.1 || 1; }
      // The axis starts and ends on a tick.
      const ystep = niceStep(y1 - y0, 5);
      y0 = Math.floor(y0 / ystep + 1e-9) * ystep;
      y1 = Math.ceil(y1 / ystep - 1e-9) * ystep;
      const yt = ticks(y0, y1, 5);
      const xt = ticks(x0, x1, xTicks);
      const sx = (x) => pad.l + ((x - x0) / (x1 - x0)) * iw;
      const sy = (y) => pad.t + ih - ((y - y0) / (y1 - y0)) * ih;
      const pathOf = (pts) => pts.map(([x, y], i) => `${i ? 'L' : 'M'}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join('');

      const g = svg('svg', { viewBox: `0 0 ${width} ${height}`, height, role: 'img', 'aria-label': present.map((s) => s.name).join(', ') });
      for (const t of yt) {
        g.append(svg('line', { class: 'grid-line', x1: pad.l, x2: pad.l + iw, y1: sy(t), y2: sy(t) }));
        g.append(svg('text', { class: 'tick', x: pad.l - 8, y: sy(t) + 3.5, 'text-anchor': 'end' }, tickLabel(t, y1 - y0)));
      }
      g.append(svg('line', { class: 'axis-line', x1: pad.l, x2: pad.l + iw, y1: pad.t + ih, y2: pad.t + ih }));
      for (const t of xt) {
        g.append(svg('line', { class: 'axis-line', x1: sx(t), x2: sx(t), y1: pad.t + ih, y2: pad.t + ih + 4 }));
        // The axis title takes the place of the first label (step 0).
        if (t !== x0) g.append(svg('text', { class: 'tick', x: sx(t), y: pad.t + ih + 17, 'text-anchor': 'middle' }, tickLabel(t, x1 - x0)));
      }
      g.append(svg('text', { class: 'tick', x: pad.l - 8, y: pad.t + ih + 17, 'text-anchor': 'end' }, 'step'));
      for (const s of present) {
        const dense = s.points.length > 60;
        if (dense && s.smooth) {
          g.append(svg('path', { class: 'series raw', d: pathOf(s.points), stroke: s.color, dataset: { series: s.key, points: s.points.length } }));
          g.append(svg('path', { class: 'series', d: pathOf(smooth(s.points, 0.6)), stroke: s.color }));
        } else {
          g.append(svg('path', { class: 'series', d: pathOf(s.points), stroke: s.color, dataset: { series: s.key, points: s.points.length } }));
        }
        if (!dense) {
          for (const [x, y] of s.points) g.append(svg('circle', { class: 'dot', cx: sx(x), cy: sy(y), r: 3, fill: s.color }));
        }
      }
      const cursor = svg('line', { class: 'cursor hidden', y1: pad.t, y2: pad.t + ih });
      g.append(cursor);
      const overlay = svg('rect', { class: 'overlay', x: pad.l, y: pad.t, width: iw, height: ih });
      const showAt = (clientX) => {
        const box = g.getBoundingClientRect();
        const scale = width / box.width;
        const px = (clientX - box.left) * scale;
        const step = x0 + ((px - pad.l) / iw) * (x1 - x0);
        let best = null;
        for (const s of present) for (const p of s.points) if (best === null || Math.abs(p[0] - step) < Math.abs(best - step)) best = p[0];
        if (best === null) return;
        cursorX = clientX;
        cursor.setAttribute('x1', sx(best));
        cursor.setAttribute('x2', sx(best));
        cursor.classList.remove('hidden');
        const rows = present.map((s) => {
          let near = null;
          for (const p of s.points) if (near === null || Math.abs(p[0] - best) < Math.abs(near[0] - best)) near = p;
          return near && Math.abs(near[0] - best) <= Math.max(1, (x1 - x0) / 50)
            ? h('div', { class: 'row' }, h('span', { class: 'swatch', style: { background: s.color, width: '10px', height: '3px', display: 'inline-block' } }), h('span', null, s.name), h('span', null, fmtMetric(near[1])))
            : null;
        });
        replace(tooltip, h('div', { class: 'title' }, `Step ${fmtInt(best)}`), rows);
        tooltip.classList.remove('hidden');
        const left = sx(best) / scale + (box.left - root.getBoundingClientRect().left);
        const tw = tooltip.offsetWidth;
        tooltip.style.left = `${left + 12 + tw > root.clientWidth ? left - tw - 12 : left + 12}px`;
        tooltip.style.top = `${legend.offsetHeight + 8}px`;
      };
      overlay.addEventListener('mousemove', (e) => showAt(e.clientX));
      overlay.addEventListener('mouseleave', () => { cursorX = null; cursor.classList.add('hidden'); tooltip.classList.add('hidden'); });
      g.append(overlay);
      replace(holder, g);
      if (cursorX !== null) showAt(cursorX);
    }

    const resize = new ResizeObserver(() => { if (last) draw(last.series, last.xMax); });
    resize.observe(root);
    return { el: root, draw, stop: () => resize.disconnect() };
  }

  // ---------------------------------------------------------------- job page

  const EVAL_MESSAGE = /^Evaluation at step (\d+): ([\s\S]*)$/;

  function jobPage(v, main, jobId) {
    document.title = `${jobId} · kiln`;
    let job = null;
    const seen = new Set();
    const series = new Map(); // metric name -> Map(step -> value)
    let lastMetrics = null; // data of the newest metrics event
    let evaluation = null; // {step, details} of the newest evaluation message
    let showMetricEvents = false;
    const events = []; // oldest first
    let drawQueued = false;
    let lastHeadKey = null;
    let lastDetailsKey = null;
    let lastCheckpoints = null;
    const ageText = document.createTextNode('');

    const head = h('div', { class: 'page-head' });
    const alertBox = h('div');
    const stats = h('div', { class: 'stats' });
    const lossChart = lineChart({ id: 'loss-chart', emptyText: 'The loss curve appears with the first training step.', yZero: true });
    const metricChart = lineChart({ id: 'metrics-chart', emptyText: 'Validation metrics appear after the first evaluation on the validation set.', unitRange: true });
    v.onClose(() => { lossChart.stop(); metricChart.stop(); });
    const matrixBody = h('div', { class: 'card-body' });
    const matrixHint = h('span', { class: 'hint' });
    const checkpointsBody = h('div', { class: 'card-body flush' }, h('div', { class: 'loading' }, h('span', { class: 'spinner' })));
    const checkpointsHint = h('span', { class: 'hint' }, 'each one is served as a model');
    const eventsBody = h('div', { class: 'events', id: 'events-log' });
    const eventsHint = h('span', { class: 'hint' });
    const detailsBody = h('div', { class: 'card-body' });
    const live = h('span', { class: 'live-dot off' }, 'connecting');

    main.append(
      head, alertBox, stats,
      h('div', { class: 'grid two' },
        h('section', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', null, 'Loss'), h('span', { class: 'hint' }, 'training and validation')),
          h('div', { class: 'card-body' }, lossChart.el)),
        h('section', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', null, 'Validation metrics')),
          h('div', { class: 'card-body' }, metricChart.el))),
      h('div', { class: 'grid side-main' },
        h('section', { class: 'card', id: 'confusion' },
          h('div', { class: 'card-head' }, h('h2', null, 'Confusion matrix'), matrixHint),
          matrixBody),
        h('section', { class: 'card', id: 'checkpoints' },
          h('div', { class: 'card-head' }, h('h2', null, 'Checkpoints'), checkpointsHint),
          checkpointsBody)),
      h('div', { class: 'grid main-side' },
        h('section', { class: 'card events-card' },
          h('div', { class: 'card-head' },
            h('h2', null, 'Events ', eventsHint),
            h('label', { class: 'toggle' },
              h('input', { type: 'checkbox', id: 'show-metric-events', onchange: (e) => { showMetricEvents = e.target.checked; drawEvents(); } }),
              'show every step'),
            live),
          eventsBody),
        h('section', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', null, 'Details')),
          detailsBody)));

    // -- header, stats and details from the job object

    async function act(verb) {
      if (verb === 'cancel') {
        const yes = await confirmDialog({
          title: 'Cancel this job?',
          body: `${jobId} stops within seconds and cannot be resumed. Checkpoints saved so far stay available as models.`,
          confirm: 'Cancel job', cancel: 'Keep running', danger: true,
        });
        if (!yes) return;
      }
      try {
        job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/${verb}`, { method: 'POST', json: {} });
        toast({ cancel: 'Cancellation requested.', pause: 'Pausing: the job checkpoints and releases its slot.', resume: 'Resumed: the job continues from its latest checkpoint.' }[verb]);
        drawJob();
      } catch (e) {
        toastError(e, `Could not ${verb} the job`);
      }
    }

    function drawJob() {
      const state = jobState(job);
      const m = methodOf(job);
      const p = progressOf(job);
      const step = lastMetrics && job.status === 'running' ? Math.max(p.step, lastMetrics.step || 0) : p.step;
      const total = p.total || (lastMetrics && lastMetrics.total_steps) || 0;
      const fraction = job.status === 'succeeded' ? 1 : total ? Math.min(1, step / total) : 0;
      const eta = job.status === 'running' ? (lastMetrics && lastMetrics.eta_seconds !== undefined ? lastMetrics.eta_seconds : p.eta) : null;
      const headKey = JSON.stringify([state, job.paused, job.cancel_requested, job.status, job.model, job.method && job.method.type]);
      if (headKey !== lastHeadKey) {
        lastHeadKey = headKey;
        drawHead(state, m);
      }
      ageText.textContent = ` · created ${fmtAge(job.created_at)}`;

      // While it trains: the latest evaluation; once it ended: the selected checkpoint's.
      const ended = TERMINAL.has(job.status) && job.metrics && typeof job.metrics.valid_accuracy === 'number';
      const valAcc = ended ? job.metrics.valid_accuracy : (series.get('valid_accuracy') ? lastOf(series.get('valid_accuracy')) : null);
      const trainLoss = series.get('train_loss') ? lastOf(series.get('train_loss')) : null;
      replace(stats,
        stat('Progress', total ? `${Math.round(fraction * 100)}%` : (job.status === 'succeeded' ? '100%' : '—'),
          total ? `step ${fmtInt(step)} of ${fmtInt(total)}${lastMetrics && lastMetrics.epoch ? ` · epoch ${Number(lastMetrics.epoch).toFixed(2)}` : ''}` : 'waiting for the first step',
          progressBar(state, fraction, true), 'stat-progress'),
        timeStat(eta),
        stat('Training loss', trainLoss === null ? '—' : fmtMetric(trainLoss), 'latest step'),
        stat('Validation accuracy', valAcc === null ? '—' : `${(valAcc * 100).toFixed(1)}%`,
          ended ? 'selected checkpoint' : 'latest evaluation'),
        stat('Throughput', fmtRate(p.speed || (lastMetrics && lastMetrics.examples_per_second)), 'examples per second'));

      const detailsKey = JSON.stringify([job.status, job.fine_tuned_model, job.trained_tokens, job.finished_at, job.method, job.attempt]);
      if (detailsKey !== lastDetailsKey) {
        lastDetailsKey = detailsKey;
        calmly(() => drawDetails(m));
      }
    }

    function drawHead(state, m) {
      const buttons = [];
      if (!TERMINAL.has(job.status)) {
        if (job.paused) buttons.push(h('button', { class: 'btn primary', type: 'button', id: 'resume-job', onclick: () => act('resume') }, 'Resume'));
        else buttons.push(h('button', { class: 'btn', type: 'button', id: 'pause-job', disabled: job.cancel_requested, onclick: () => act('pause') }, 'Pause'));
        buttons.push(h('button', { class: 'btn danger', type: 'button', id: 'cancel-job', disabled: job.cancel_requested, onclick: () => act('cancel') }, job.cancel_requested ? 'Cancelling…' : 'Cancel'));
      }
      replace(head,
        h('div', { class: 'titles' },
          h('div', { class: 'crumbs' }, h('a', { href: '#/jobs' }, 'Jobs'), ' / ', jobId),
          h('div', { class: 'title-row' }, h('h1', { class: 'mono' }, jobId), h('span', { id: 'job-status' }, badge(state, true))),
          h('div', { class: 'sub' }, `${m.type}${m.strategy ? ` · ${m.strategy}` : ''} on `, h('code', null, job.model), ageText)),
        h('div', { class: 'actions' }, buttons));
      replace(alertBox,
        job.error && job.error.message ? h('div', { class: 'alert' }, h('strong', null, 'Failed:'), h('span', null, job.error.message)) : null,
        job.paused ? h('div', { class: 'alert info' }, h('strong', null, 'Paused.'), h('span', null, 'The job holds no training slot; resume it to continue from its latest checkpoint.')) : null);
    }

    function drawDetails(m) {
      const hp = Object.entries(m.hp).filter(([, val]) => val !== null && val !== undefined);
      replace(detailsBody, h('dl', { class: 'kv' },
        kv('Base model', h('code', null, job.model)),
        kv('Fine-tuned model', job.fine_tuned_model ? h('a', { href: `#/models?model=${encodeURIComponent(job.fine_tuned_model)}`, class: 'mono' }, job.fine_tuned_model) : h('span', { class: 'muted' }, 'when it succeeds')),
        kv('Training file', h('a', { href: '#/files', class: 'mono' }, job.training_file)),
        kv('Validation file', job.validation_file ? h('a', { href: '#/files', class: 'mono' }, job.validation_file) : h('span', { class: 'muted' }, 'none')),
        kv('Seed', job.seed), kv('Priority', job.priority), kv('Attempt', job.attempt),
        job.trained_tokens ? kv('Trained tokens', fmtInt(job.trained_tokens)) : null,
        kv('Created', fmtDate(job.created_at)),
        job.finished_at ? kv('Finished', fmtDate(job.finished_at)) : null),
      h('h3', { class: 'kv-title' }, 'Hyperparameters'),
      h('dl', { class: 'kv compact' },
        hp.map(([k2, val]) => kv(k2.replace(/_/g, ' '), Array.isArray(val) ? val.join(', ') : (typeof val === 'object' ? JSON.stringify(val) : String(val))))));
    }

    function timeStat(eta) {
      if (job.paused) return stat('Time left', '—', 'paused: resume to continue');
      if (job.status === 'running') {
        return stat('Time left', fmtDuration(eta), job.estimated_finish ? `done around ${fmtTime(job.estimated_finish)}` : 'estimating');
      }
      if (job.finished_at) return stat('Duration', fmtDuration(job.finished_at - job.created_at), `finished ${fmtAge(job.finished_at)}`);
      return stat('Waiting', fmtDuration(Date.now() / 1000 - job.created_at), 'in the queue');
    }

    function stat(k, value, sub, extra, id) {
      return h('div', { class: 'card stat', id }, h('div', { class: 'k' }, k), h('div', { class: 'v' }, value), h('div', { class: 's' }, sub), extra || null);
    }

    function kv(k, value) {
      return [h('dt', null, k), h('dd', null, value)];
    }

    function lastOf(map) {
      let best = null;
      for (const [step, val] of map) if (best === null || step >= best[0]) best = [step, val];
      return best ? best[1] : null;
    }

    // -- charts, confusion matrix and events from the event stream

    function color(name, i) {
      return SERIES_COLORS[name] || EXTRA_COLORS[i % EXTRA_COLORS.length];
    }

    function seriesOf(names) {
      return names.filter((n) => series.has(n)).map((n, i) => ({
        key: n,
        name: metricName(n),
        color: color(n, i),
        smooth: n === 'train_loss',
        points: [...series.get(n)].sort((a, b) => a[0] - b[0]),
      }));
    }

    function drawCharts() {
      drawQueued = false;
      const total = (job && job.progress && job.progress.total_steps) || (lastMetrics && lastMetrics.total_steps) || 0;
      lossChart.draw(seriesOf(['train_loss', 'valid_loss']), total);
      const metricNames = [...series.keys()].filter((n) => n.startsWith('valid_') && n !== 'valid_loss').sort((a, b) => {
        const order = ['valid_accuracy', 'valid_macro_f1'];
        return (order.indexOf(a) + 1 || 9) - (order.indexOf(b) + 1 || 9) || a.localeCompare(b);
      });
      metricChart.draw(seriesOf(metricNames), total);
      if (job) drawJob();
    }

    function queueDraw() {
      if (drawQueued) return;
      drawQueued = true;
      requestAnimationFrame(drawCharts);
    }

    function drawMatrix() {
      if (!evaluation) {
        matrixHint.textContent = '';
        replace(matrixBody, h('div', { class: 'chart-empty' }, 'Classification jobs show their latest evaluation here: rows are true labels, columns predictions.'));
        return;
      }
      const d = evaluation.details;
      matrixHint.textContent = `latest evaluation, step ${fmtInt(evaluation.step)}`;
      const labels = d.labels || [];
      const parts = [];
      if (Array.isArray(d.confusion_matrix) && d.confusion_matrix.length) {
        const cm = d.confusion_matrix;
        const headRow = h('tr', null, h('th', null), h('th', { class: 'axis-label', colspan: labels.length }, 'predicted'));
        const labelRow = h('tr', null, h('th', { class: 'axis-label row-label' }, 'true'), labels.map((l) => h('th', null, l)));
        const rows = cm.map((row, i) => {
          const total = row.reduce((a, b) => a + b, 0) || 1;
          return h('tr', null, h('th', { class: 'row-label' }, labels[i] || i),
            row.map((n, j) => {
              const share = n / total;
              const alpha = n ? 0.12 + 0.88 * share : 0;
              return h('td', {
                class: `cell${alpha > 0.55 ? ' hot' : ''}`,
                title: `true ${labels[i]}, predicted ${labels[j]}: ${n} (${(share * 100).toFixed(1)}% of ${labels[i]})`,
                style: n ? { background: `rgba(var(--heat), ${alpha.toFixed(3)})` } : null,
                dataset: { row: i, col: j },
              }, String(n), h('small', null, `${Math.round(share * 100)}%`));
            }));
        });
        parts.push(h('div', { class: 'matrix-wrap' }, h('table', { class: 'matrix', id: 'confusion-matrix' }, h('thead', null, headRow, labelRow), h('tbody', null, rows))));
      }
      if (Array.isArray(d.per_class) && d.per_class.length) {
        parts.push(h('div', { class: 'per-class table-wrap' }, h('table', { class: 'table' },
          h('thead', null, h('tr', null, ['Label', 'Precision', 'Recall', 'F1', 'Support'].map((c, i) => h('th', { class: i ? 'num' : null }, c)))),
          h('tbody', null, d.per_class.map((c) => h('tr', null,
            h('td', null, c.label), h('td', { class: 'num' }, fmtMetric(c.precision)), h('td', { class: 'num' }, fmtMetric(c.recall)),
            h('td', { class: 'num' }, fmtMetric(c.f1)), h('td', { class: 'num' }, fmtInt(c.support))))))));
      }
      replace(matrixBody, parts.length ? parts : h('div', { class: 'chart-empty' }, 'This evaluation has no per-class figures.'));
    }

    function eventRow(e, fresh) {
      let message = e.message;
      if (e.type === 'message' && EVAL_MESSAGE.test(message)) message = `Evaluation at step ${EVAL_MESSAGE.exec(message)[1]} (confusion matrix and per-class figures above)`;
      return h('div', { class: `event ${e.level} ${e.type}${fresh ? ' fresh' : ''}`, dataset: { event: e.id } },
        h('span', { class: 'time', title: fmtDate(e.created_at) }, fmtTime(e.created_at)),
        h('span', { class: 'lvl' }, e.level),
        h('span', { class: 'msg' }, message));
    }

    function visible(e) {
      return showMetricEvents || e.type !== 'metrics' || !!(e.data && Object.keys(e.data).some((k) => k.startsWith('valid_')));
    }

    function drawEvents() {
      const shown = events.filter(visible);
      const newest = shown.slice(-500).reverse();
      replace(eventsBody, newest.length ? newest.map((e) => eventRow(e, false)) : h('div', { class: 'empty' }, 'No events yet.'));
      eventsHint.textContent = `${fmtInt(events.length)} in all, newest first`;
    }

    function onEvent(e) {
      if (seen.has(e.id)) return;
      seen.add(e.id);
      events.push(e);
      if (e.type === 'metrics' && e.data && typeof e.data.step === 'number') {
        lastMetrics = e.data;
        for (const [name, val] of Object.entries(e.data)) {
          if (typeof val !== 'number' || !isFinite(val)) continue;
          if (name !== 'train_loss' && !name.startsWith('valid_')) continue;
          if (!series.has(name)) series.set(name, new Map());
          series.get(name).set(e.data.step, val);
        }
        queueDraw();
      } else if (e.type === 'message') {
        const m = EVAL_MESSAGE.exec(e.message || '');
        if (m) {
          try { evaluation = { step: Number(m[1]), details: JSON.parse(m[2]) }; drawMatrix(); } catch (_) { /* not JSON: leave the matrix as it was */ }
        }
      }
      if (!initialLoad && visible(e)) {
        const empty = eventsBody.querySelector('.empty');
        if (empty) empty.remove();
        eventsBody.prepend(eventRow(e, true));
        while (eventsBody.childElementCount > 500) eventsBody.lastElementChild.remove();
        eventsHint.textContent = `${fmtInt(events.length)} in all, newest first`;
      }
    }

    // The stream replays history first; draw the log once the backlog has arrived, then
    // prepend live events one by one.
    let initialLoad = true;
    function setLive(text, on) {
      live.textContent = text;
      live.classList.toggle('off', !on);
    }

    async function follow() {
      let attempts = 0;
      while (v.open) {
        setLive(attempts ? 'reconnecting' : 'connecting', false);
        let backlogTimer = null;
        const endBacklog = () => {
          if (backlogTimer) { clearTimeout(backlogTimer); backlogTimer = null; }
          if (initialLoad) { initialLoad = false; drawEvents(); }
          setLive('live', true);
        };
        backlogTimer = setTimeout(endBacklog, 400);
        try {
          const done = await readEventStream(jobId, v.signal, (e) => {
            onEvent(e);
            if (backlogTimer) { clearTimeout(backlogTimer); backlogTimer = setTimeout(endBacklog, 150); }
          });
          endBacklog();
          if (done) {
            setLive('finished', false);
            await refreshJob();
            await refreshCheckpoints();
            return;
          }
        } catch (e) {
          if (backlogTimer) clearTimeout(backlogTimer);
          if (!v.open || (e && e.name === 'AbortError')) return;
          if (e instanceof ApiError && (e.status === 401 || e.status === 404)) return;
          console.warn('event stream interrupted', e);
        }
        attempts += 1;
        setLive('reconnecting', false);
        await sleep(Math.min(10000, 1000 * attempts), v.signal);
      }
    }

    // -- checkpoints

    async function refreshCheckpoints() {
      const list = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/checkpoints?limit=100`, { signal: v.signal });
      if (!v.open) return;
      const rows = list.data;
      const key2 = JSON.stringify(rows);
      if (key2 === lastCheckpoints) return;
      lastCheckpoints = key2;
      calmly(() => drawCheckpoints(rows, list.has_more));
    }

    function drawCheckpoints(rows, hasMore) {
      if (!rows.length) {
        replace(checkpointsBody, h('div', { class: 'empty' }, 'No checkpoints yet. They are saved every checkpoint_every_steps steps and at evaluations.'));
        return;
      }
      checkpointsHint.textContent = `${rows.length}${hasMore ? '+' : ''} saved, each one served as a model`;
      const keys = [];
      for (const c of rows) for (const k2 of Object.keys(c.metrics || {})) if (k2 !== 'step' && !keys.includes(k2)) keys.push(k2);
      const order = ['train_loss', 'valid_loss', 'valid_accuracy', 'valid_macro_f1'];
      keys.sort((a, b) => (order.indexOf(a) + 1 || 9) - (order.indexOf(b) + 1 || 9) || a.localeCompare(b));
      const shownKeys = keys.slice(0, 4);
      replace(checkpointsBody, h('div', { class: 'table-wrap scroll' }, h('table', { class: 'table compact', id: 'checkpoints-table' },
        h('thead', null, h('tr', null, h('th', { class: 'num' }, 'Step'), shownKeys.map((k2) => h('th', { class: 'num' }, metricName(k2))), h('th', null, 'Model'))),
        h('tbody', null, rows.map((c) => h('tr', null,
          h('td', { class: 'num' }, fmtInt(c.step_number)),
          shownKeys.map((k2) => h('td', { class: 'num' }, fmtMetric(c.metrics ? c.metrics[k2] : null))),
          h('td', null, h('div', { class: 'nowrap' },
            h('a', { href: `#/models?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}`, title: c.fine_tuned_model_checkpoint }, 'try it'),
            ' ', copyButton(c.fine_tuned_model_checkpoint)))))))));
    }

    async function refreshJob() {
      job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`, { signal: v.signal });
      if (v.open) drawJob();
    }

    // -- start

    replace(head, h('div', { class: 'titles' }, h('div', { class: 'crumbs' }, h('a', { href: '#/jobs' }, 'Jobs'), ' / ', jobId), h('h1', { class: 'mono' }, jobId)));
    drawMatrix();
    lossChart.draw([], 0);
    metricChart.draw([], 0);
    refreshJob().then(() => {
      follow();
      let checkpointsAt = 0;
      v.every(async () => {
        if (job && TERMINAL.has(job.status)) return;
        await refreshJob();
        if (Date.now() - checkpointsAt > 5000) { checkpointsAt = Date.now(); await refreshCheckpoints(); }
      }, JOB_POLL_MS);
    }).catch((e) => {
      if (e instanceof ApiError && e.status === 404) {
        replace(main, pageHead('Job not found', null), h('div', { class: 'card' }, h('div', { class: 'empty' }, h('strong', null, e.message), h('a', { href: '#/jobs' }, 'Back to the jobs'))));
      } else {
        toastError(e);
      }
    });
  }

  // ---------------------------------------------------------------- files

  // ---------------------------------------------------------------- new job

  // A form for the common case: a model, a processed file, a few knobs. "Estimate" asks the
  // server for a dry run (the real pipeline and a few timed steps; nothing queued) and shows
  // the plan; "Create job" queues it and opens its page.
  function newJobPage(v, main) {
    document.title = 'New job · kiln';
    const field = (label, input, hint) => h('label', { class: 'field' }, h('span', { class: 'k' }, label), input, hint ? h('span', { class: 'hint' }, hint) : null);
    const model = h('select', { class: 'input', id: 'nj-model' });
    const train = h('select', { class: 'input', id: 'nj-train' });
    const valid = h('select', { class: 'input', id: 'nj-valid' });
    const suffix = h('input', { class: 'input', id: 'nj-suffix', placeholder: 'optional, e.g. reviews' });
    const epochs = h('input', { class: 'input', id: 'nj-epochs', type: 'number', min: '1', max: '100', placeholder: 'auto' });
    const batch = h('input', { class: 'input', id: 'nj-batch', type: 'number', min: '1', max: '4096', placeholder: 'auto' });
    const strategy = h('select', { class: 'input', id: 'nj-strategy' },
      ['auto', 'full', 'freeze', 'head_only', 'lora'].map((s) => h('option', { value: s }, s)));
    const plan = h('div', { class: 'card-body', id: 'nj-plan' }, h('div', { class: 'muted' }, 'Estimate a job to see what it would do and how long it would take on this server.'));
    const estimateButton = h('button', { class: 'btn', type: 'button', id: 'nj-estimate', onclick: () => submit(true) }, 'Estimate');
    const createButton = h('button', { class: 'btn primary', type: 'button', id: 'nj-create', onclick: () => submit(false) }, 'Create job');
    main.append(
      pageHead('New fine-tuning job', 'Pick a model and a processed dataset. Values left on auto are chosen from the data.'),
      h('div', { class: 'grid two' },
        h('div', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', null, 'Job')),
          h('div', { class: 'card-body form' },
            field('Model', model),
            field('Training file', train, 'processed fine-tune files'),
            field('Validation file', valid, 'none: a tenth of the training data is held out'),
            field('Suffix', suffix),
            h('div', { class: 'row' }, field('Epochs', epochs), field('Batch size', batch), field('Strategy', strategy)),
            h('div', { class: 'actions' }, estimateButton, createButton))),
        h('div', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', null, 'Plan')),
          plan)));

    (async () => {
      try {
        const [models, files] = await Promise.all([
          api('/v1/models', { signal: v.signal }),
          api('/v1/files?purpose=fine-tune&limit=100', { signal: v.signal }),
        ]);
        const trainable = models.data.filter((m) => m.kind !== 'checkpoint');
        replace(model, trainable.map((m) => h('option', { value: m.id }, m.id)));
        const ready = files.data.filter((f) => f.status === 'processed');
        const label = (f) => `${f.filename} · ${f.validation && f.validation.format ? f.validation.format : ''} · ${f.id}`;
        replace(train, ready.map((f) => h('option', { value: f.id }, label(f))));
        replace(valid, [h('option', { value: '' }, 'none'), ...ready.map((f) => h('option', { value: f.id }, label(f)))]);
        if (!trainable.length || !ready.length) {
          replace(plan, h('div', { class: 'empty' }, h('strong', null, !trainable.length ? 'No models' : 'No processed files'),
            !trainable.length ? 'Put a base model under the models directory.' : h('a', { href: '#/files' }, 'Upload a dataset first')));
        }
      } catch (e) { if (e.name !== 'AbortError') toastError(e, 'Could not load models and files'); }
    })();

    function body(dryRun) {
      const hp = {};
      if (epochs.value) hp.n_epochs = Number(epochs.value);
      if (batch.value) hp.batch_size = Number(batch.value);
      if (strategy.value !== 'auto') hp.strategy = strategy.value;
      const b = { model: model.value, training_file: train.value };
      if (valid.value) b.validation_file = valid.value;
      if (suffix.value.trim()) b.suffix = suffix.value.trim();
      if (Object.keys(hp).length) b.method = { type: 'supervised', supervised: { hyperparameters: hp } };
      if (dryRun) b.dry_run = true;
      return b;
    }

    async function submit(dryRun) {
      estimateButton.disabled = createButton.disabled = true;
      if (dryRun) replace(plan, h('div', { class: 'loading' }, h('span', { class: 'spinner' }), ' Measuring a few training steps…'));
      try {
        const job = await api('/v1/fine_tuning/jobs', { method: 'POST', json: body(dryRun), signal: v.signal });
        if (!dryRun) { toast(`Created ${job.id}`); location.hash = `#/jobs/${job.id}`; return; }
        showPlan(job);
      } catch (e) {
        if (e.name === 'AbortError') return;
        if (dryRun) replace(plan, h('div', { class: 'error-box' }, e.message));
        toastError(e, dryRun ? 'The estimate failed' : 'The job was not created');
      } finally {
        estimateButton.disabled = createButton.disabled = false;
      }
    }

    function showPlan(job) {
      const e = job.estimate;
      const hp = (job.method[job.method.type] || {}).hyperparameters || {};
      const kv = (k, value) => [h('dt', null, k), h('dd', null, value)];
      replace(plan,
        h('div', { class: 'estimate', id: 'nj-estimate-result' },
          h('div', { class: 'big' }, e.estimated_seconds < 10 ? `${e.estimated_seconds.toFixed(1)} s` : fmtDuration(e.estimated_seconds)),
          h('div', { class: 'muted' }, `estimated on this server: ${e.seconds_per_step.toFixed(3)} s per step over ${e.measured_steps} measured steps, ${e.setup_seconds.toFixed(1)} s setup, ${e.evaluation_seconds.toFixed(1)} s evaluating`)),
        h('dl', { class: 'kv' },
          kv('Task', e.task),
          kv('Examples', `${fmtInt(e.train_examples)} training, ${fmtInt(e.valid_examples)} validation`),
          e.labels && e.labels.length ? kv('Labels', e.labels.join(', ')) : null,
          kv('Steps', fmtInt(e.total_steps)),
          kv('Tokens', `${fmtInt(e.trained_tokens)} (${fmtInt(e.train_tokens_per_epoch)} per epoch)`)),
        h('h3', null, 'Hyperparameters'),
        h('dl', { class: 'kv compact' }, Object.keys(hp).sort().filter((k) => hp[k] !== null).map((k) => kv(k.replace(/_/g, ' '), Array.isArray(hp[k]) ? hp[k].join(', ') : String(hp[k])))),
        e.notes && e.notes.length ? h('ul', { class: 'notes' }, e.notes.map((n) => h('li', null, `Chose ${n}`))) : null);
    }
  }

  function filesPage(v, main) {
    document.title = 'Files · kiln';
    const body = h('div', { class: 'card-body flush' }, h('div', { class: 'loading' }, h('span', { class: 'spinner' })));
    const expanded = new Set();
    let files = [];
    const picker = h('input', { type: 'file', id: 'upload-file', onchange: () => upload() });
    const purpose = h('select', { class: 'input', 'aria-label': 'Purpose' },
      ['fine-tune', 'batch', 'assistants', 'user_data'].map((p) => h('option', { value: p }, p)));
    const uploadButton = h('button', { class: 'btn primary', type: 'button', onclick: () => picker.click() }, 'Upload a file');
    main.append(
      pageHead('Files', 'Datasets and results. Fine-tuning files are validated as soon as they arrive.',
        h('div', { class: 'upload' }, purpose, picker, uploadButton)),
      h('div', { class: 'card' }, body));

    async function upload() {
      const file = picker.files && picker.files[0];
      if (!file) return;
      const form = new FormData();
      form.append('purpose', purpose.value);
      form.append('file', file, file.name);
      uploadButton.disabled = true;
      try {
        const f = await api('/v1/files', { method: 'POST', form, signal: v.signal });
        toast(`${f.filename} uploaded as ${f.id}.`);
        await refresh();
      } catch (e) {
        toastError(e, 'Upload failed');
      } finally {
        uploadButton.disabled = false;
        picker.value = '';
      }
    }

    function validationCell(f) {
      const val = f.validation;
      if (!val) return h('span', { class: 'muted' }, f.status === 'uploaded' ? 'validating…' : '—');
      const problems = val.total_problems || (val.problems || []).length;
      return h('div', null,
        h('div', { class: 'nowrap' }, val.format ? h('b', null, val.format.replace(/_/g, ' ')) : h('span', { class: 'muted' }, 'no format detected')),
        h('div', { class: 'sub nowrap' }, `${fmtInt(val.examples)} example${val.examples === 1 ? '' : 's'} · `,
          problems ? h('span', { class: 'bad' }, `${fmtInt(problems)} problem${problems === 1 ? '' : 's'}`) : 'no problems'));
    }

    function labelsCell(val) {
      if (!val || !val.labels) return h('span', { class: 'muted' }, '—');
      const entries = Object.entries(val.labels).sort((a, b) => b[1] - a[1]);
      return h('div', { class: 'tags' }, entries.slice(0, 6).map(([l, n]) => h('span', { class: 'tag' }, l, h('b', null, fmtInt(n)))),
        entries.length > 6 ? h('span', { class: 'tag' }, `+${entries.length - 6}`) : null);
    }

    function detail(f) {
      const val = f.validation || {};
      const problems = val.problems || [];
      const labels = val.labels ? Object.entries(val.labels).sort((a, b) => b[1] - a[1]) : [];
      const max = labels.length ? labels[0][1] : 1;
      return h('div', { class: 'grid two', style: { marginBottom: '0' } },
        h('div', null,
          h('h3', null, problems.length ? 'Problems' : 'Validation'),
          problems.length
            ? h('ul', { class: 'problems' }, problems.map((p) => h('li', null,
              h('span', { class: 'where' }, p.line ? `line ${p.line}` : (p.file || 'dataset')),
              h('span', null, p.file && p.line ? `${p.file}: ` : '', p.message))),
            (val.total_problems || 0) > problems.length ? h('li', { class: 'muted' }, `and ${fmtInt(val.total_problems - problems.length)} more`) : null)
            : h('p', { class: 'muted small' }, f.status_details || (f.status === 'processed' ? 'Every line is valid.' : 'Not validated.')),
          h('p', { class: 'muted small' }, 'SHA-256 ', h('code', null, f.sha256 || '—'))),
        labels.length ? h('div', null, h('h3', null, 'Label distribution'),
          h('div', { class: 'label-bars', style: { marginTop: '8px' } }, labels.map(([l, n]) => [
            h('span', null, l), h('div', { class: 'bar' }, h('span', { style: { width: `${(100 * n / max).toFixed(1)}%` } })), h('span', { class: 'num muted' }, fmtInt(n))]))) : null);
    }

    function draw() {
      if (!files.length) {
        replace(body, h('div', { class: 'empty' }, h('strong', null, 'No files yet'), 'Upload a JSONL dataset with the button above or with POST /v1/files.'));
        return;
      }
      const rows = [];
      for (const f of files) {
        const problems = f.validation ? (f.validation.total_problems || 0) : 0;
        const open = expanded.has(f.id) || (problems > 0 && !expanded.has(`-${f.id}`));
        rows.push(h('tr', {
          class: 'clickable', dataset: { file: f.id },
          onclick: () => {
            if (open) { expanded.delete(f.id); expanded.add(`-${f.id}`); } else { expanded.add(f.id); expanded.delete(`-${f.id}`); }
            draw();
          },
        },
        h('td', null, h('div', { style: { fontWeight: '600' } }, f.filename), h('div', { class: 'sub mono' }, f.id)),
        h('td', { class: 'nowrap' }, f.purpose),
        h('td', { class: 'num nowrap' }, fmtBytes(f.bytes)),
        h('td', null, badge(f.status)),
        h('td', null, validationCell(f)),
        h('td', null, labelsCell(f.validation)),
        h('td', { class: 'nowrap', title: fmtDate(f.created_at) }, fmtAge(f.created_at))));
        if (open) rows.push(h('tr', { class: 'detail-row' }, h('td', { class: 'detail', colspan: 7 }, detail(f))));
      }
      replace(body, h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'files-table' },
        h('thead', null, h('tr', null, ['File', 'Purpose', 'Size', 'Status', 'Validation', 'Labels', 'Uploaded'].map((c, i) => h('th', { class: i === 2 ? 'num' : null }, c)))),
        h('tbody', null, rows))));
    }

    async function refresh() {
      const list = await api('/v1/files?limit=100', { signal: v.signal });
      if (!v.open) return;
      files = list.data;
      calmly(draw);
    }

    v.every(async () => {
      if (!files.length || files.some((f) => f.status === 'uploaded')) await refresh();
    }, LIST_POLL_MS);
    v.every(refresh, 15000);
  }

  // ---------------------------------------------------------------- models

  // What the "try it" box can do with a model, from what the server serves today:
  // classifications for encoder classifiers, embeddings for other encoders, image
  // classifications for ResNet/ViT classifiers, chat for decoders.
  const GENERATIVE_TASKS = ['text_generation', 'chat', 'completion', 'preference', 'reinforcement', 'causal_domain_adaptation'];
  function tryKind(m) {
    if (m.task === 'text_classification' || m.task === 'multi_label_classification') return 'classify';
    if (m.task === 'image_classification') return 'images';
    if (m.task === 'embeddings' || m.task === 'domain_adaptation') return 'embed';
    if (GENERATIVE_TASKS.includes(m.task)) return 'chat';
    return null;
  }

  const IMAGE_TYPES = ['image/png', 'image/jpeg', 'image/webp'];
  const MAX_TRY_IMAGES = 16;
  // The server takes JSON bodies up to 2 MiB; what is over is scaled down before sending.
  const IMAGE_REQUEST_BUDGET = 1_900_000;

  function readDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error(`${file.name}: ${reader.error ? reader.error.message : 'cannot be read'}`));
      reader.readAsDataURL(file);
    });
  }

  // A square preview of a decoded image (cropped to fill), sharp on high-density screens.
  function thumbCanvas(bitmap, size) {
    const dpr = Math.min(3, window.devicePixelRatio || 1);
    const c = h('canvas', { class: 'thumb-img', width: Math.round(size * dpr), height: Math.round(size * dpr), style: { width: `${size}px`, height: `${size}px` } });
    if (!bitmap) { c.classList.add('broken'); c.title = 'The browser cannot show this image; it is sent as it is.'; return c; }
    const side = Math.min(bitmap.width, bitmap.height);
    c.getContext('2d').drawImage(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side, 0, 0, c.width, c.height);
    return c;
  }

  // The data URLs to send: the files as they are while they fit in one request, else the
  // largest ones re-encoded smaller (the model resizes to its own input size anyway).
  async function fitImageBudget(items) {
    const urls = items.map((it) => it.url);
    const sides = items.map((it) => (it.bitmap ? Math.max(it.bitmap.width, it.bitmap.height) : 0));
    const scaled = items.map(() => null);
    const total = () => urls.reduce((a, u) => a + u.length + 3, 0);
    while (total() > IMAGE_REQUEST_BUDGET) {
      let i = 0;
      urls.forEach((u, j) => { if (u.length > urls[i].length) i = j; });
      const it = items[i];
      if (!it.bitmap || sides[i] <= 96) {
        throw new Error(items.length > 1
          ? 'These images are too large for one request (the server takes up to 2 MB): classify fewer at a time.'
          : `${it.name} is too large to send (the server takes up to 2 MB in one request).`);
      }
      sides[i] = urls[i] === it.url ? Math.min(1024, Math.round(sides[i] * 0.7)) : Math.round(sides[i] * 0.7);
      const scale = sides[i] / Math.max(it.bitmap.width, it.bitmap.height);
      const c = document.createElement('canvas');
      c.width = Math.max(1, Math.round(it.bitmap.width * scale));
      c.height = Math.max(1, Math.round(it.bitmap.height * scale));
      const ctx = c.getContext('2d');
      ctx.fillStyle = '#fff';
      ctx.fillRect(0, 0, c.width, c.height);
      ctx.drawImage(it.bitmap, 0, 0, c.width, c.height);
      urls[i] = c.toDataURL('image/jpeg', 0.92);
      scaled[i] = [c.width, c.height];
    }
    return { urls, scaled };
  }

  function modelsPage(v, main, params) {
    document.title = 'Models · kiln';
    let models = [];
    let selected = params.get('model');
    let tryShownFor;
    let allCheckpoints = false;
    const body = h('div', { class: 'card-body flush' }, h('div', { class: 'loading' }, h('span', { class: 'spinner' })));
    const tryCard = h('section', { class: 'card try', id: 'try-model' });
    main.append(
      pageHead('Models', 'Base models from the models directory, and this project\'s fine-tuned models and checkpoints. Any of them can be fine-tuned further.'),
      h('div', { class: 'grid main-side' }, h('div', { class: 'card' }, body), tryCard));

    function select(id) {
      selected = id;
      history.replaceState(null, '', `#/models?model=${encodeURIComponent(id)}`);
      draw();
      drawTry();
    }

    function draw() {
      if (!models.length) {
        replace(body, h('div', { class: 'empty' }, h('strong', null, 'No models'), 'Put base models (Hugging Face layout) under the models directory, or fine-tune one.'));
        return;
      }
      const groups = [['base', 'Base models'], ['fine_tuned', 'Fine-tuned models'], ['checkpoint', 'Checkpoints']];
      const rows = [];
      for (const [kind, title] of groups) {
        const ms = models.filter((m) => (m.kind || 'base') === kind || (kind === 'fine_tuned' && !['base', 'checkpoint'].includes(m.kind || 'base')));
        if (!ms.length) continue;
        rows.push(h('tr', { class: 'section' }, h('td', { colspan: 4 }, `${title} (${ms.length})`)));
        const limit = kind === 'checkpoint' && !allCheckpoints ? 8 : Infinity;
        for (const m of ms.filter((x, i) => i < limit || x.id === selected)) {
          const acc = m.metrics && typeof m.metrics.valid_accuracy === 'number' ? m.metrics.valid_accuracy : null;
          rows.push(h('tr', { class: `clickable${m.id === selected ? ' selected' : ''}`, dataset: { model: m.id }, onclick: () => select(m.id) },
            h('td', null, h('div', { class: 'id', style: { overflowWrap: 'anywhere' } }, m.id),
              h('div', { class: 'sub' }, [m.architecture, m.parameters ? `${fmtCount(m.parameters)} parameters` : null, m.job ? `from ${m.job}` : null].filter(Boolean).join(' · '),
                m.loaded ? h('span', { class: 'loaded', style: { marginLeft: '8px' } }, 'in memory') : null)),
            h('td', { class: 'nowrap' }, m.task ? m.task.replace(/_/g, ' ') : h('span', { class: 'muted' }, '—')),
            h('td', null, Array.isArray(m.labels) && m.labels.length
              ? h('div', { class: 'tags' }, m.labels.slice(0, 5).map((l) => h('span', { class: 'tag' }, l)), m.labels.length > 5 ? h('span', { class: 'tag' }, `+${m.labels.length - 5}`) : null)
              : h('span', { class: 'muted' }, '—')),
            h('td', { class: 'num' }, acc === null ? h('span', { class: 'muted' }, '—') : `${(acc * 100).toFixed(1)}%`)));
        }
        if (ms.length > limit) {
          rows.push(h('tr', null, h('td', { colspan: 4 }, h('button', {
            class: 'btn ghost small', type: 'button', onclick: () => { allCheckpoints = true; draw(); },
          }, `Show all ${ms.length} checkpoints`))));
        }
      }
      replace(body, h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'models-table' },
        h('thead', null, h('tr', null, h('th', null, 'Model'), h('th', null, 'Task'), h('th', null, 'Labels'), h('th', { class: 'num' }, 'Accuracy'))),
        h('tbody', null, rows))));
    }

    function drawTry() {
      const m = models.find((x) => x.id === selected);
      tryShownFor = m ? m.id : null;
      if (!m) {
        replace(tryCard, h('div', { class: 'card-head' }, h('h2', null, 'Try a model')),
          h('div', { class: 'empty' }, 'Choose a model in the list to classify or embed some text with it, classify images, or chat with it.'));
        return;
      }
      const kind = tryKind(m);
      const headEl = h('div', { class: 'card-head' }, h('h2', null, 'Try it'));
      if (!kind) {
        const why = m.family === 'vision'
          ? 'This image model has no classification head: fine-tune it on labelled images, then try the fine-tuned model here.'
          : `kiln does not serve ${m.task ? m.task.replace(/_/g, ' ') : 'this kind of'} model${m.task ? 's' : ''} yet: classifications and embeddings are served for text encoders, image classifications for ResNet and ViT classifiers, chat for decoders.`;
        replace(tryCard, headEl, h('div', { class: 'card-body' }, h('div', { class: 'model-id' }, m.id),
          h('p', { class: 'muted' }, why)));
        return;
      }
      if (kind === 'chat') { drawChat(m, headEl); return; }
      if (kind === 'images') { drawImages(m, headEl); return; }
      const input = h('textarea', { class: 'input', id: 'try-input', rows: 4, placeholder: 'One text per line' });
      input.value = kind === 'classify' ? 'what a wonderful film\nthe plot was boring and the actors awful' : 'the film was great\nthe movie was excellent\nthe weather is cold';
      const results = h('div', { id: 'try-results' });
      const run = h('button', { class: 'btn primary', type: 'button', id: 'try-run' }, kind === 'classify' ? 'Classify' : 'Embed');
      run.addEventListener('click', async () => {
        const texts = input.value.split('\n').map((t) => t.trim()).filter(Boolean);
        if (!texts.length) { toast('Type some text first.', { error: true }); return; }
        run.disabled = true;
        replace(results, h('div', { class: 'loading' }, h('span', { class: 'spinner' }), ' first use loads the model'));
        try {
          const path = kind === 'classify' ? '/v1/classifications' : '/v1/embeddings';
          const out = await api(path, { method: 'POST', json: { model: m.id, input: texts }, signal: v.signal });
          replace(results, kind === 'classify' ? classifyResults(texts, out) : embedResults(texts, out));
          if (!m.loaded) { m.loaded = true; draw(); }
        } catch (e) {
          replace(results);
          toastError(e, kind === 'classify' ? 'Classification failed' : 'Embedding failed');
        } finally {
          run.disabled = false;
        }
      });
      replace(tryCard, headEl, h('div', { class: 'card-body' },
        h('div', { class: 'model-id', style: { marginBottom: '12px' } }, m.id),
        h('label', { class: 'field', for: 'try-input' }, kind === 'classify' ? 'Texts to classify' : 'Texts to embed'),
        input,
        h('div', { class: 'actions', style: { margin: '10px 0 16px' } }, run,
          h('span', { class: 'muted small' }, kind === 'classify' ? 'POST /v1/classifications' : 'POST /v1/embeddings')),
        results));
    }

    // A conversation with a decoder through /v1/chat/completions; each turn is kept and sent
    // back with the next message, as a chat client does.
    function drawChat(m, headEl) {
      const turns = [];
      const log = h('div', { id: 'try-chat' });
      const input = h('textarea', { class: 'input', id: 'try-input', rows: 3, placeholder: 'Your message' });
      input.value = 'Hello! What can you do?';
      const temperature = h('input', { class: 'input', id: 'try-temperature', type: 'number', min: '0', max: '2', step: '0.1', value: '0', style: { width: '80px' } });
      const run = h('button', { class: 'btn primary', type: 'button', id: 'try-run' }, 'Send');
      const drawLog = () => replace(log, turns.map((t) => h('div', { class: `result chat-${t.role}` },
        h('div', { class: 'muted small' }, t.role === 'user' ? 'You' : 'Model'),
        h('div', { class: 'text', style: { whiteSpace: 'pre-wrap' } }, t.content),
        t.usage ? h('div', { class: 'muted small' }, `${t.usage.completion_tokens} tokens · ${t.finish_reason}`) : null)));
      run.addEventListener('click', async () => {
        const text = input.value.trim();
        if (!text) { toast('Type a message first.', { error: true }); return; }
        run.disabled = true;
        turns.push({ role: 'user', content: text });
        drawLog();
        log.append(h('div', { class: 'loading' }, h('span', { class: 'spinner' }), ' first use loads the model'));
        try {
          const out = await api('/v1/chat/completions', {
            method: 'POST',
            json: { model: m.id, messages: turns.map((t) => ({ role: t.role, content: t.content })), max_tokens: 256, temperature: Number(temperature.value) || 0 },
            signal: v.signal,
          });
          const choice = out.choices[0];
          turns.push({ role: 'assistant', content: choice.message.content, usage: out.usage, finish_reason: choice.finish_reason });
          input.value = '';
          if (!m.loaded) { m.loaded = true; draw(); }
        } catch (e) {
          turns.pop();
          toastError(e, 'The model did not answer');
        } finally {
          drawLog();
          run.disabled = false;
        }
      });
      replace(tryCard, headEl, h('div', { class: 'card-body' },
        h('div', { class: 'model-id', style: { marginBottom: '12px' } }, m.id),
        log,
        h('label', { class: 'field', for: 'try-input' }, 'Message'),
        input,
        h('div', { class: 'actions', style: { margin: '10px 0 16px' } }, run,
          h('label', { class: 'muted small', for: 'try-temperature' }, 'temperature'), temperature,
          h('span', { class: 'muted small' }, 'POST /v1/chat/completions'))));
    }

    // Image classification: files picked or dropped are previewed (decoded into canvases:
    // the page's CSP allows no data: or blob: images), read as data URLs and sent as JSON.
    function drawImages(m, headEl) {
      let items = []; // { file, name, bitmap (null when the browser cannot decode it), url }
      const picker = h('input', { type: 'file', id: 'try-files', class: 'visually-hidden', accept: IMAGE_TYPES.join(','), multiple: true });
      const thumbs = h('div', { class: 'thumbs', id: 'try-thumbs' });
      const results = h('div', { id: 'try-results' });
      const run = h('button', { class: 'btn primary', type: 'button', id: 'try-run', disabled: true }, 'Classify');
      const clear = h('button', { class: 'btn ghost small', type: 'button', id: 'try-clear' }, 'Clear');
      const count = h('span', { class: 'muted small' });
      const bar = h('div', { class: 'thumbs-bar' }, count, clear);
      const drop = h('label', { class: 'dropzone', for: 'try-files', id: 'try-drop' },
        svg('svg', { viewBox: '0 0 24 24', 'aria-hidden': 'true' },
          svg('rect', { x: 3, y: 4, width: 18, height: 16, rx: 2.5 }),
          svg('circle', { cx: 9, cy: 9.5, r: 1.8 }),
          svg('path', { d: 'M4 17.5l5-5 3.5 3.5 2.5-2.5 5 5' })),
        h('span', null, h('strong', null, 'Choose images'), ' or drop them here'),
        h('span', { class: 'muted small' }, `PNG, JPEG or WebP · up to ${MAX_TRY_IMAGES} at a time`));

      const drawThumbs = () => {
        replace(thumbs, items.map((it, i) => h('figure', { class: 'thumb', title: it.name },
          thumbCanvas(it.bitmap, 64),
          h('figcaption', null, it.name),
          h('button', { type: 'button', class: 'remove', 'aria-label': `Remove ${it.name}`, onclick: () => { items.splice(i, 1); drawThumbs(); } }, '×'))));
        run.disabled = !items.length;
        bar.hidden = !items.length;
        count.textContent = `${items.length} image${items.length === 1 ? '' : 's'}`;
      };

      const add = async (fileList) => {
        const files = [...fileList];
        const images = files.filter((f) => IMAGE_TYPES.includes(f.type));
        if (images.length < files.length) {
          toast(`Only PNG, JPEG and WebP images can be classified: ${files.length - images.length} file${files.length - images.length === 1 ? ' was' : 's were'} left out.`, { error: true, title: 'Not an image' });
        }
        const room = MAX_TRY_IMAGES - items.length;
        if (images.length > room) toast(`Up to ${MAX_TRY_IMAGES} images at a time: ${images.length - room} left out.`, { error: true, title: 'Too many images' });
        const chosen = images.slice(0, Math.max(0, room));
        if (!chosen.length) return;
        try {
          const added = await Promise.all(chosen.map(async (file) => ({
            file, name: file.name, url: await readDataUrl(file), bitmap: await createImageBitmap(file).catch(() => null),
          })));
          if (!v.open) return;
          items = items.concat(added);
          drawThumbs();
        } catch (e) {
          toastError(e, 'Could not read the file');
        }
      };

      // Files dropped anywhere on the box are taken (a drop next to it would open the image
      // in the tab instead).
      const bodyEl = h('div', { class: 'card-body' });
      picker.addEventListener('change', () => { add(picker.files); picker.value = ''; });
      const carriesFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes('Files');
      for (const type of ['dragenter', 'dragover']) {
        bodyEl.addEventListener(type, (e) => {
          if (!carriesFiles(e)) return;
          e.preventDefault();
          e.dataTransfer.dropEffect = 'copy';
          drop.classList.add('over');
        });
      }
      bodyEl.addEventListener('dragleave', (e) => { if (!bodyEl.contains(e.relatedTarget)) drop.classList.remove('over'); });
      bodyEl.addEventListener('drop', (e) => {
        if (!carriesFiles(e)) return;
        e.preventDefault();
        drop.classList.remove('over');
        add(e.dataTransfer.files);
      });
      clear.addEventListener('click', () => { items = []; drawThumbs(); replace(results); });

      run.addEventListener('click', async () => {
        if (!items.length) { toast('Choose an image first.', { error: true }); return; }
        const sent = items.slice();
        run.disabled = true;
        replace(results, h('div', { class: 'loading' }, h('span', { class: 'spinner' }), ' first use loads the model'));
        try {
          const { urls, scaled } = await fitImageBudget(sent);
          const out = await api('/v1/images/classifications', { method: 'POST', json: { model: m.id, input: urls }, signal: v.signal });
          replace(results, imageResults(sent, scaled, out));
          if (!m.loaded) { m.loaded = true; draw(); }
        } catch (e) {
          replace(results);
          // The server names a bad image by its place in the request: say which file it is.
          if (e && typeof e.message === 'string') {
            e.message = e.message.replace(/^input\[(\d+)\]/, (all, i) => (sent[Number(i)] ? `${sent[Number(i)].name}` : all));
          }
          toastError(e, 'Classification failed');
        } finally {
          run.disabled = !items.length;
        }
      });

      append(bodyEl, [
        h('div', { class: 'model-id', style: { marginBottom: '12px' } }, m.id),
        h('label', { class: 'field', for: 'try-files' }, 'Images to classify'),
        picker, drop, bar, thumbs,
        h('div', { class: 'actions', style: { margin: '14px 0 16px' } }, run,
          h('span', { class: 'muted small' }, 'POST /v1/images/classifications')),
        results]);
      replace(tryCard, headEl, bodyEl);
      drawThumbs();
    }

    function imageResults(sent, scaled, out) {
      return out.data.map((r) => {
        const it = sent[r.index] || { name: `image ${r.index + 1}`, bitmap: null };
        const size = it.bitmap ? `${it.bitmap.width}×${it.bitmap.height}` : null;
        const s = scaled[r.index];
        return h('div', { class: 'result image-result' },
          h('div', { class: 'image-head' }, thumbCanvas(it.bitmap, 48),
            h('div', { class: 'image-meta' },
              h('div', { class: 'text', title: it.name }, it.name),
              h('div', { class: 'muted small', title: s ? 'Scaled down in the browser to fit in one request; the model resizes images to its own input size anyway.' : null },
                [size, it.file ? fmtBytes(it.file.size) : null, s ? `sent as ${s[0]}×${s[1]}` : null].filter(Boolean).join(' · '))),
            h('div', { class: 'top-label' }, h('span', { class: 'top' }, r.label), h('span', { class: 'muted small' }, `${(r.score * 100).toFixed(1)}%`))),
          scoreBars(r));
      });
    }

    // One row per label, best first; a model with many labels (ImageNet's 1,000) shows its
    // top ones and sums up the rest.
    function scoreBars(r) {
      const scores = Object.entries(r.scores || {}).sort((a, b) => b[1] - a[1]);
      const chosen = new Set(Array.isArray(r.labels) ? r.labels : [r.label]);
      const shown = scores.length > 10 ? scores.filter(([l], i) => i < 5 || chosen.has(l)) : scores;
      const shownSet = new Set(shown);
      const rest = scores.filter((x) => !shownSet.has(x));
      const restSum = rest.reduce((a, [, s]) => a + s, 0);
      return h('div', { class: 'scores' }, shown.map(([l, s]) => h('div', { class: chosen.has(l) ? 'best' : null },
        h('span', null, l),
        h('div', { class: 'bar' }, h('span', { style: { width: `${(s * 100).toFixed(1)}%` } })),
        h('span', { class: 'num right' }, `${(s * 100).toFixed(1)}%`))),
      rest.length ? h('div', { class: 'more' }, h('span', { class: 'muted' }, `${rest.length} more labels`), h('span'),
        h('span', { class: 'num right muted' }, `${(restSum * 100).toFixed(1)}%`)) : null);
    }

    function classifyResults(texts, out) {
      return out.data.map((r) => h('div', { class: 'result' },
        h('div', { class: 'text' }, '“', texts[r.index] || '', '”'),
        scoreBars(r)));
    }

    function embedResults(texts, out) {
      const vecs = out.data.map((d) => d.embedding);
      const dim = vecs.length ? vecs[0].length : 0;
      const norm = (a) => Math.sqrt(a.reduce((s, x) => s + x * x, 0));
      const cos = (a, b) => a.reduce((s, x, i) => s + x * b[i], 0) / ((norm(a) * norm(b)) || 1);
      const strip = (vec) => {
        const n = Math.min(vec.length, 96);
        const max = Math.max(...vec.slice(0, n).map(Math.abs), 1e-9);
        const w = 300;
        const bw = w / n;
        return svg('svg', { class: 'vector', viewBox: `0 0 ${w} 44`, preserveAspectRatio: 'none' },
          vec.slice(0, n).map((x, i) => svg('rect', {
            x: (i * bw).toFixed(2), width: Math.max(0.5, bw - 0.6).toFixed(2),
            y: x >= 0 ? (22 - 20 * x / max).toFixed(2) : 22, height: Math.max(0.5, 20 * Math.abs(x) / max).toFixed(2),
            fill: x >= 0 ? '#2563eb' : '#ea580c',
          })));
      };
      const parts = [h('p', { class: 'muted small', style: { marginTop: '0' } }, `${dim} dimensions; the first ${Math.min(dim, 96)} are drawn.`)];
      vecs.forEach((vec, i) => parts.push(h('div', { class: 'result' }, h('div', { class: 'text' }, '“', texts[i], '”'), strip(vec),
        h('div', { class: 'muted small' }, `norm ${norm(vec).toFixed(3)}`))));
      if (vecs.length > 1) {
        parts.push(h('div', { class: 'result' }, h('h3', { style: { marginBottom: '8px' } }, 'Cosine similarity'),
          h('div', { class: 'matrix-wrap' }, h('table', { class: 'matrix sim' },
            h('thead', null, h('tr', null, h('th'), vecs.map((_, j) => h('th', null, `#${j + 1}`)))),
            h('tbody', null, vecs.map((a, i) => h('tr', null, h('th', { class: 'row-label', title: texts[i] }, `#${i + 1}`),
              vecs.map((b, j) => {
                const c = cos(a, b);
                const alpha = Math.max(0, c);
                return h('td', { class: `cell${alpha > 0.55 ? ' hot' : ''}`, style: { background: `rgba(var(--heat), ${(0.08 + 0.8 * alpha).toFixed(3)})` }, title: `${texts[i]} · ${texts[j]}` }, c.toFixed(2));
              }))))))));
      }
      return parts;
    }

    v.every(async () => {
      const list = await api('/v1/models', { signal: v.signal });
      if (!v.open) return;
      const before = JSON.stringify(models.map((m) => [m.id, m.loaded]));
      models = list.data;
      if (!selected || !models.some((m) => m.id === selected)) {
        const first = models.find((m) => m.kind === 'fine_tuned' && tryKind(m)) || models.find((m) => tryKind(m)) || models[0];
        selected = first ? first.id : null;
      }
      if (before !== JSON.stringify(models.map((m) => [m.id, m.loaded]))) calmly(draw);
      // Redraw the box only for another model, so a refresh never wipes what was typed.
      if (tryShownFor !== selected) drawTry();
    }, 10000);
  }

  // ---------------------------------------------------------------- start

  window.addEventListener('hashchange', route);
  route();
})();
