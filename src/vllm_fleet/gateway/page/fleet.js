/* vllm-fleet live status page (served at /fleet/, no build step, no dependencies).
 *
 * Polls GET /fleet/overview every 2 s and keeps the DOM in step with it: one keyed card per
 * deployment, one keyed <tbody> per replica, so buttons and open <details> survive each poll.
 * Every string from the server goes in through textContent or an attribute, never innerHTML.
 * When the fleet has keys, the admin key lives in sessionStorage['vllm-fleet-key'] only.
 * Times (uptime, elapsed, "ago") are measured against the gateway's clock (`now`).
 */
(function () {
  'use strict';

  const KEY = 'vllm-fleet-key';
  const POLL_MS = 2000;
  const $ = (id) => document.getElementById(id);
  const store = window.sessionStorage;
  const pending = new Set(); // action paths waiting for an answer
  let timer = 0, busy = false, again = false, locked = false, toastTimer = 0;

  /* ---------------------------------------------------------------- DOM helpers */

  function h(tag, props, ...kids) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === 'class') n.className = v;
      else if (k === 'text') n.textContent = v;
      else if (k === 'on') for (const [ev, fn] of Object.entries(v)) n.addEventListener(ev, fn);
      else n.setAttribute(k, v);
    }
    for (const kid of kids) if (kid != null) n.append(kid); // strings become text nodes
    return n;
  }
  const SVG_NS = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs) {
    const n = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
    return n;
  }
  function text(n, t) { t = t == null ? '' : String(t); if (n.textContent !== t) n.textContent = t; }
  function cls(n, c) { if (n.getAttribute('class') !== c) n.setAttribute('class', c); }
  function attr(n, k, v) { v = String(v); if (n.getAttribute(k) !== v) n.setAttribute(k, v); }
  function show(n, on) { if (n.hidden === !!on) n.hidden = !on; }

  /* Reuse children of `parent` by key: create missing ones, update all, drop the rest, keep order. */
  function keyed(parent, items, keyOf, make, update) {
    const have = parent._keyed || (parent._keyed = new Map());
    const seen = new Set();
    let prev = parent._after || null; // a fixed first child (a table's <thead>) stays first
    for (const item of items) {
      const k = keyOf(item);
      seen.add(k);
      let n = have.get(k);
      if (!n) { n = make(item); have.set(k, n); }
      update(n, item);
      const want = prev ? prev.nextSibling : parent.firstChild;
      if (want !== n) parent.insertBefore(n, want);
      prev = n;
    }
    for (const [k, n] of have) if (!seen.has(k)) { n.remove(); have.delete(k); }
  }

  /* ---------------------------------------------------------------- formatting */

  const isNum = (v) => typeof v === 'number' && isFinite(v);
  function dur(s) {
    if (!isNum(s)) return '—';
    s = Math.max(0, Math.floor(s));
    const d = Math.floor(s / 86400), hr = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${hr}h`;
    if (hr) return `${hr}h ${m}m`;
    if (m) return `${m}m ${s % 60}s`;
    return `${s}s`;
  }
  function num(v, digits) {
    if (!isNum(v)) return '—';
    const f = digits == null ? (Math.abs(v) < 10 && v % 1 ? 1 : 0) : digits;
    return v.toLocaleString('en-US', { minimumFractionDigits: f, maximumFractionDigits: f });
  }
  function compact(v) {
    if (!isNum(v)) return '—';
    const a = Math.abs(v);
    if (a >= 1e9) return num(v / 1e9, 1) + 'B';
    if (a >= 1e6) return num(v / 1e6, 1) + 'M';
    if (a >= 1e4) return num(v / 1e3, 1) + 'k';
    return num(v, 0);
  }
  const ms = (v) => (!isNum(v) ? '—' : v >= 1000 ? num(v / 1000, 2) + ' s' : num(v, 0) + ' ms');
  const pct = (v) => (isNum(v) ? Math.round(v * 100) + '%' : '—');
  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  const gib = (mib) => num(mib / 1024, 1);

  const TONE = {
    ready: 'ok', loaded: 'ok', applied: 'ok', unchanged: 'ok',
    starting: 'warn', loading: 'warn', unloading: 'warn', stopping: 'warn', applying: 'warn',
    failed: 'bad', stalled: 'bad', unreachable: 'bad', invalid: 'bad', refused: 'bad', interrupted: 'bad',
  }; // everything else (stopped, unloaded, sleeping, ...) is grey
  const tone = (state) => TONE[state] || 'idle';
  // The replica list is `upstreams` (the spec's second `replicas` key); `replicas` is their number.
  const replicasOf = (dep) => (Array.isArray(dep.upstreams) ? dep.upstreams : Array.isArray(dep.replicas) ? dep.replicas : []);
  const countOf = (dep) => (isNum(dep.replicas) ? dep.replicas : replicasOf(dep).length);
  function badge(n, state, extra) { text(n, state || '?'); cls(n, `badge ${tone(state)}${extra ? ' ' + extra : ''}`); }

  /* ---------------------------------------------------------------- network */

  async function api(method, path, timeoutMs) {
    const headers = { Accept: 'application/json' };
    const key = store.getItem(KEY);
    if (key) headers.Authorization = 'Bearer ' + key;
    const signal = timeoutMs && AbortSignal.timeout ? AbortSignal.timeout(timeoutMs) : undefined;
    const res = await fetch(path, { method, headers, signal, cache: 'no-store', credentials: 'same-origin' });
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    return { status: res.status, ok: res.ok, body };
  }
  function errorOf(r) {
    const m = r.body && r.body.error && r.body.error.message;
    return m ? String(m) : `HTTP ${r.status}`;
  }

  async function poll() {
    clearTimeout(timer);
    if (busy) { again = true; return; }
    busy = true;
    try {
      const r = await api('GET', 'overview', 10000); // a stalled gateway must not stop the polling
      if (r.status === 401 || r.status === 403) return askKey(r);
      if (!r.ok || !r.body || typeof r.body !== 'object') throw new Error(errorOf(r));
      render(r.body);
      live(true, r.body);
    } catch (e) {
      const why = e instanceof TypeError ? 'Connection lost'
        : e && e.name === 'TimeoutError' ? 'The gateway is not answering' : String((e && e.message) || e);
      live(false, null, why);
    } finally {
      busy = false;
      if (!locked) timer = setTimeout(poll, again ? 0 : POLL_MS);
      again = false;
    }
  }

  let lastGood = 0;
  function live(ok, d, why) {
    const n = $('last-update');
    if (ok) {
      lastGood = d.now;
      text(n, 'Live · updated ' + clock(d.now));
      attr(n, 'data-updated', d.now);
      cls(n, 'live ok');
    } else {
      text(n, why + (lastGood ? ' · last update ' + clock(lastGood) : '') + ' · retrying');
      attr(n, 'title', why);
      cls(n, 'live bad');
    }
    $('app').classList.toggle('stale', !ok);
  }

  /* ---------------------------------------------------------------- sign in / out */

  function clearData() { // what a signed-out tab must not keep
    show($('app'), false);
    for (const box of [$('deployments'), $('gpus'), $('keys'), retiringTable]) {
      for (const n of box._keyed ? box._keyed.values() : []) n.remove();
      box._keyed = null;
    }
    if ($('gpus')._reason) { $('gpus')._reason.remove(); $('gpus')._reason = null; }
  }

  function askKey(r) {
    const tried = !!store.getItem(KEY);
    locked = true;
    store.removeItem(KEY);
    clearData();
    show($('reload'), false);
    show($('sign-out'), false);
    show($('login-panel'), true);
    text($('login-error'), tried || r.status === 403 ? errorOf(r) : '');
    $('sign-in').disabled = false;
    text($('last-update'), 'Sign-in needed');
    cls($('last-update'), 'live');
    $('key').focus();
  }

  $('login').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const key = $('key').value.trim();
    if (!key) return;
    store.setItem(KEY, key);
    $('key').value = '';
    $('sign-in').disabled = true;
    locked = false;
    poll();
  });

  $('sign-out').addEventListener('click', (ev) => {
    ev.preventDefault();
    store.removeItem(KEY);
    show($('app'), false);
    clearData();
    text($('login-error'), '');
    poll();
  });

  /* ---------------------------------------------------------------- actions */

  function toast(kind, message) {
    const t = $('toast');
    clearTimeout(toastTimer);
    t.textContent = '';
    t.append(h('span', { class: 'toast-msg', text: message }),
      h('button', { type: 'button', class: 'toast-close', 'aria-label': 'Dismiss', on: { click: () => show(t, false) } }));
    cls(t, 'toast ' + kind);
    show(t, true);
    if (kind !== 'info') toastTimer = setTimeout(() => show(t, false), kind === 'bad' ? 20000 : 8000);
  }

  function summary(body) {
    if (!body || typeof body !== 'object') return 'done';
    const parts = [body.result || body.state || 'done'];
    if (isNum(body.took_s)) parts[0] += ` in ${num(body.took_s, 1)} s`;
    if (body.message) parts.push(String(body.message));
    return parts.join(' — ');
  }

  async function act(label, question, path) {
    if (pending.has(path) || !window.confirm(question)) return;
    pending.add(path);
    poll(); // re-render now so the button shows it is busy
    // Loading a deployment is answered once it is loaded (minutes): say so if it takes a while.
    const slow = setTimeout(() => toast('info', `${label}: waiting for the gateway's answer…`), 1500);
    try {
      const r = await api('POST', path);
      toast(r.ok ? 'ok' : 'bad', r.ok ? `${label}: ${summary(r.body)}` : `${label} failed (${r.status}): ${errorOf(r)}`);
    } catch (e) {
      toast('bad', `${label}: ${(e && e.message) || 'request failed'}`);
    } finally {
      clearTimeout(slow);
      pending.delete(path);
      poll();
    }
  }

  $('reload').addEventListener('click', () =>
    act('Reload fleet', 'Reload the fleet from its file now?', 'reload'));

  /* ---------------------------------------------------------------- header */

  const FACTS = [['file', 'Fleet file'], ['gen', 'Generation'], ['reload', 'Last reload'],
    ['uptime', 'Gateway uptime'], ['replicas', 'Replicas ready'], ['node', 'Node'], ['version', 'Version']];
  const facts = {};
  for (const [k, label] of FACTS) {
    facts[k] = h('dd', { class: 'fact-' + k });
    $('facts').append(h('div', { class: 'fact' }, h('dt', { text: label }), facts[k]));
  }
  const reloadBadge = h('span'), reloadWhen = h('span', { class: 'muted' });
  facts.reload.append(reloadBadge, ' ', reloadWhen);
  const reloadMsg = h('p', { class: 'alert', id: 'reload-message', hidden: '' });
  $('facts').after(reloadMsg);

  function renderHeader(d) {
    const g = d.gateway || {}, f = d.fleet || {}, rl = f.reload, now = d.now;
    text(facts.file, f.file || '—');
    attr(facts.file, 'title', f.file || '');
    text(facts.gen, f.generation != null ? f.generation : '—');
    if (rl) {
      badge(reloadBadge, rl.result);
      text(reloadWhen, isNum(rl.at) ? dur(now - rl.at) + ' ago' + (rl.via ? ' · ' + rl.via : '') : '');
    }
    show(reloadBadge, rl);
    if (!rl) text(reloadWhen, 'none since start');
    const failed = rl && ['failed', 'invalid', 'refused', 'interrupted'].includes(rl.result) && rl.message;
    text(reloadMsg, failed ? `Reload ${rl.result}: ${rl.message}` : '');
    show(reloadMsg, failed);
    text(facts.uptime, isNum(g.started) ? dur(now - g.started) : '—');
    const deps = d.deployments || [];
    const engines = deps.filter((x) => x.kind !== 'adapter');
    const ready = engines.reduce((a, x) => a + (x.ready || 0), 0), total = engines.reduce((a, x) => a + countOf(x), 0);
    text(facts.replicas, `${ready} / ${total}`);
    text(facts.node, g.node || '—');
    text(facts.version, g.version || '—');
    text($('brand-node'), [g.node, g.host && g.port ? `${g.host}:${g.port}` : ''].filter(Boolean).join(' · '));
    show($('reload'), d.actions && d.actions.reload);
    $('reload').disabled = pending.has('reload');
    show($('sign-out'), !!store.getItem(KEY));
  }

  /* ---------------------------------------------------------------- sparklines */

  const W = 300, H = 64;
  function makeChart(title, color) {
    const area = svg('path', { class: 'area' }), line = svg('path', { class: 'line' });
    const guide = svg('line', { class: 'guide', y1: 0, y2: H, x1: 0, x2: 0, visibility: 'hidden' });
    const grid = svg('path', { class: 'grid', d: `M0 ${H / 2}H${W}` });
    const box = svg('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': title });
    box.append(grid, area, line, guide);
    const now = h('span', { class: 'chart-now' }), peak = h('span', { class: 'chart-peak' });
    const tip = h('span', { class: 'chart-tip', hidden: '' });
    const c = h('figure', { class: 'chart' },
      h('figcaption', null, h('span', { class: 'chart-title', text: title }), now),
      h('div', { class: 'chart-plot' }, box, tip),
      h('div', { class: 'chart-axis' }, h('span', { text: '−5 min' }), peak, h('span', { text: 'now' })));
    c.style.setProperty('--c', color);
    c._r = { area, line, guide, now, peak, tip, pts: [] };
    box.addEventListener('mousemove', (ev) => hover(c._r, box, ev));
    box.addEventListener('mouseleave', () => { show(c._r.tip, false); attr(c._r.guide, 'visibility', 'hidden'); });
    return c;
  }

  function drawChart(c, t, v, now, fmt) {
    const r = c._r;
    t = Array.isArray(t) ? t : []; v = Array.isArray(v) ? v : [];
    const end = t.length ? t[t.length - 1] : now, span = Math.max(300, t.length ? end - t[0] : 300);
    const vals = v.filter(isNum), max = Math.max(...vals, 0) || 1;
    const X = (ts) => ((ts - (end - span)) / span) * W, Y = (val) => H - 2 - (val / max) * (H - 8);
    let line = '', area = '', seg = [];
    const flush = () => {
      if (!seg.length) return;
      line += 'M' + seg.map((p) => p.join(' ')).join('L') + (seg.length === 1 ? 'h0.01' : '');
      area += `M${seg[0][0]} ${H}L` + seg.map((p) => p.join(' ')).join('L') + `L${seg[seg.length - 1][0]} ${H}Z`;
      seg = [];
    };
    r.pts = [];
    v.forEach((val, i) => {
      if (!isNum(val) || !isNum(t[i])) return flush();
      const p = [+X(t[i]).toFixed(1), +Y(val).toFixed(1)];
      seg.push(p);
      r.pts.push({ x: p[0], t: t[i], v: val });
    });
    flush();
    attr(r.line, 'd', line || 'M0 0');
    attr(r.area, 'd', area || 'M0 0');
    const last = [...v].reverse().find(isNum);
    text(r.now, vals.length ? fmt(last) : '—');
    text(r.peak, vals.length ? 'max ' + fmt(Math.max(...vals)) : '');
    r.fmt = fmt;
    c.classList.toggle('empty', !vals.length);
  }

  function hover(r, box, ev) {
    if (!r.pts.length) return;
    const rect = box.getBoundingClientRect();
    const x = ((ev.clientX - rect.left) / rect.width) * W;
    const p = r.pts.reduce((a, b) => (Math.abs(b.x - x) < Math.abs(a.x - x) ? b : a));
    attr(r.guide, 'x1', p.x); attr(r.guide, 'x2', p.x); attr(r.guide, 'visibility', 'visible');
    text(r.tip, `${clock(p.t)} · ${r.fmt(p.v)}`);
    r.tip.style.left = Math.min(Math.max((p.x / W) * 100, 12), 88) + '%';
    show(r.tip, true);
  }

  /* ---------------------------------------------------------------- deployments */

  const STATS = [['rps', 'Requests/s'], ['flight', 'In flight'], ['errors', 'Errors (5xx)'], ['p50', 'TTFT p50'],
    ['p95', 'TTFT p95'], ['tps', 'Tokens/s'], ['running', 'Running'], ['waiting', 'Waiting'], ['kv', 'KV cache']];
  const COLS = ['Replica', 'State', 'PID', 'Node', 'GPUs', 'Endpoint', 'Uptime', 'Restarts', 'Outst.', 'Run', 'Wait', 'KV', ''];

  function makeDeployment(dep) {
    const r = {};
    r.id = h('h3', { class: 'dep-id' });
    r.state = h('span', { class: 'badge' });
    r.model = h('div', { class: 'dep-model mono' });
    r.chips = h('div', { class: 'chips' });
    r.load = h('button', { type: 'button', class: 'btn small load', text: 'Load' });
    r.unload = h('button', { type: 'button', class: 'btn small unload', text: 'Unload' });
    r.load.addEventListener('click', () => act(`Load ${dep.id}`, `Load the deployment “${dep.id}” now? This starts its engines.`,
      `deployments/${encodeURIComponent(dep.id)}/load`));
    r.unload.addEventListener('click', () => act(`Unload ${dep.id}`, `Unload the deployment “${dep.id}”? Its engines drain and stop.`,
      `deployments/${encodeURIComponent(dep.id)}/unload`));
    r.stats = {};
    const stats = h('div', { class: 'stats' });
    for (const [k, label] of STATS) {
      r.stats[k] = h('div', { class: 'stat-value' });
      stats.append(h('div', { class: 'stat stat-' + k }, h('div', { class: 'stat-label', text: label }), r.stats[k]));
    }
    r.kvbar = h('div', { class: 'bar' }, h('span'));
    r.stats.kv.after(r.kvbar);
    r.window = h('span', { class: 'muted' });
    r.rps = makeChart('Requests / s', 'var(--chart-1)');
    r.ttft = makeChart('TTFT p50', 'var(--chart-2)');
    r.rows = replicaTable();
    r.noReplicas = h('p', { class: 'muted empty-note', text: 'No replicas running.' });
    const card = h('section', { class: 'card dep', 'data-deployment': dep.id },
      h('header', { class: 'dep-head' },
        h('div', { class: 'dep-title' }, h('div', { class: 'dep-line' }, r.id, r.state), r.model),
        h('div', { class: 'dep-actions' }, r.load, r.unload)),
      r.chips,
      h('div', { class: 'dep-body' }, h('div', { class: 'stats-wrap' }, stats, r.window),
        h('div', { class: 'charts' }, r.rps, r.ttft)),
      h('div', { class: 'table-wrap' }, r.rows), r.noReplicas);
    card._r = r;
    return card;
  }

  function chip(label, value, extra) {
    return h('span', { class: 'chip' + (extra ? ' ' + extra : '') }, h('span', { class: 'chip-k', text: label }), String(value ?? '—'));
  }

  function updateDeployment(card, dep, d) {
    const r = card._r, now = d.now, rec = dep.recent || {}, eng = dep.engine, ser = dep.series || {};
    text(r.id, dep.id);
    badge(r.state, dep.state, 'dep-state');
    text(r.model, dep.model || '');
    const ready = dep.ready || 0, n = countOf(dep);
    const readyTone = ready >= n && n > 0 ? 'ok' : ready > 0 ? 'warn' : tone(dep.state) === 'idle' ? 'idle' : 'bad';
    const chips = [chip('kind', dep.kind), chip('start', dep.start === 'on_demand' ? 'on demand' : dep.start),
      chip('routing', String(dep.routing || '—').replace(/_/g, ' ')), chip('ready', `${ready}/${n}`, 'tone-' + readyTone)];
    if (dep.base) chips.splice(1, 0, chip('base', dep.base));
    const sig = JSON.stringify([dep.kind, dep.start, dep.routing, ready, n, dep.base, readyTone]);
    if (r.chips._sig !== sig) { r.chips._sig = sig; r.chips.replaceChildren(...chips); }
    const onDemand = dep.start === 'on_demand' && d.actions && d.actions.load;
    show(r.load, onDemand); show(r.unload, onDemand);
    const lp = `deployments/${encodeURIComponent(dep.id)}/`;
    r.load.disabled = pending.has(lp + 'load') || ['loaded', 'loading'].includes(dep.state);
    r.unload.disabled = pending.has(lp + 'unload') || ['unloaded', 'unloading'].includes(dep.state);
    text(r.stats.rps, num(rec.rps, 2));
    text(r.stats.flight, num(rec.in_flight, 0));
    text(r.stats.errors, num(rec.errors, 0));
    r.stats.errors.parentNode.classList.toggle('alarm', rec.errors > 0);
    text(r.stats.p50, ms(rec.ttft_p50_ms));
    text(r.stats.p95, ms(rec.ttft_p95_ms));
    text(r.stats.tps, num(rec.tokens_per_s));
    text(r.stats.running, eng ? num(eng.running, 0) : '—');
    text(r.stats.waiting, eng ? num(eng.waiting, 0) : '—');
    text(r.stats.kv, eng ? pct(eng.kv_cache) : '—');
    meter(r.kvbar, eng ? eng.kv_cache : 0);
    text(r.window, `last ${rec.window_s || 60} s · ${num(rec.requests, 0)} requests`);
    drawChart(r.rps, ser.t, ser.rps, now, (v) => num(v, 2) + ' req/s');
    drawChart(r.ttft, ser.t, ser.ttft_p50_ms, now, ms);
    const reps = replicasOf(dep);
    keyed(r.rows, reps, (x) => x.name, (x) => makeReplica(x, false), (n2, x) => updateReplica(n2, x, d));
    show(r.rows.parentNode, reps.length);
    show(r.noReplicas, !reps.length);
    text(r.noReplicas, dep.base ? `Served by the engines of ${dep.base}.` : tone(dep.state) === 'idle'
      ? `No engines running (${dep.state}).` : 'No replicas.');
  }

  /* A fill bar; `kind` (mem, util) colours it plainly, else it turns amber then red as it fills (KV cache). */
  function meter(bar, frac, kind) {
    const v = Math.max(0, Math.min(1, isNum(frac) ? frac : 0));
    bar.firstChild.style.width = (v * 100).toFixed(1) + '%';
    const extra = bar.classList.contains('tiny') ? ' tiny' : '';
    cls(bar, 'bar' + extra + (kind ? ' ' + kind : v >= 0.9 ? ' hot' : v >= 0.75 ? ' warm' : ''));
  }

  /* ---------------------------------------------------------------- replicas */

  function replicaTable() {
    const head = h('thead', null, h('tr', null, ...COLS.map((c) => h('th', { text: c }))));
    const table = h('table', { class: 'table replicas' }, head);
    table._after = head;
    return table;
  }

  function makeReplica(rep, retiring) {
    const r = { retiring };
    const td = (label, c, ...kids) => h('td', { 'data-label': label, class: c || '' }, ...kids);
    r.name = h('span', { class: 'mono strong' });
    r.ejected = h('span', { class: 'badge bad tiny', hidden: '' });
    r.state = h('span', { class: 'state badge' });
    r.note = h('span', { class: 'state-note' });
    r.pid = h('span', { class: 'pid mono' });
    r.node = h('span'); r.gpus = h('span', { class: 'mono' }); r.ep = h('span', { class: 'mono ep' });
    r.up = h('span'); r.restarts = h('span'); r.out = h('span');
    r.run = h('span'); r.wait = h('span'); r.kv = h('span'); r.kvbar = h('div', { class: 'bar tiny' }, h('span'));
    r.restart = h('button', { type: 'button', class: 'btn small restart', text: 'Restart' });
    r.restart.addEventListener('click', () => act(`Restart ${rep.name}`,
      `Restart the engine “${rep.name}”? Requests in flight on it may fail.`, `engines/${encodeURIComponent(rep.name)}/restart`));
    r.row = h('tr', { class: 'replica', [retiring ? 'data-retiring' : 'data-replica']: rep.name },
      td('Replica', 'cell-name', r.name, ' ', r.ejected, r.sub = h('div', { class: 'rep-sub' })), td('State', 'cell-state', r.state, r.note),
      td('PID', 'num', r.pid), td('Node', 'cell-node', r.node), td('GPUs', '', r.gpus), td('Endpoint', 'cell-ep', r.ep),
      td('Uptime', 'num cell-up', r.up), td('Restarts', 'num', r.restarts), td('Outst.', 'num', r.out),
      td('Run', 'num', r.run), td('Wait', 'num', r.wait), td('KV cache', 'cell-kv', r.kv, r.kvbar),
      td('', 'cell-act', r.restart));
    r.msg = h('p', { class: 'rep-msg' });
    r.logline = h('p', { class: 'logline mono' });
    r.pre = h('pre', { class: 'log' });
    r.details = h('details', { class: 'logtail' }, h('summary', { text: 'Log tail' }), r.pre);
    r.extraCell = h('td', { colspan: COLS.length }, r.msg, r.logline, r.details);
    r.extra = h('tr', { class: 'replica-detail' }, r.extraCell);
    const body = h('tbody', { class: 'replica-group' }, r.row, r.extra);
    body._r = r;
    return body;
  }

  function updateReplica(body, rep, d) {
    const r = body._r, now = d.now, st = rep.state, eng = rep.engine;
    text(r.name, rep.name);
    text(r.ejected, rep.ejected ? 'ejected: ' + rep.ejected : ''); show(r.ejected, rep.ejected);
    badge(r.state, st, 'state');
    const restarting = st === 'starting' && isNum(rep.retry_at);
    attr(r.row, 'data-state', st);
    text(r.note, restarting ? `restarting in ${Math.max(0, Math.ceil(rep.retry_at - now))} s` : '');
    text(r.pid, rep.pid != null ? rep.pid : '—');
    text(r.node, rep.node || '—');
    text(r.gpus, Array.isArray(rep.gpus) && rep.gpus.length ? rep.gpus.join(', ') : '—');
    // A socket path is long and its end is what tells engines apart: show the file name.
    const ep = rep.port != null ? ':' + rep.port : rep.socket ? rep.socket.split('/').pop() : rep.url || '—';
    text(r.ep, ep); attr(r.ep, 'title', rep.socket || rep.url || ep);
    const since = isNum(rep.since) ? now - rep.since : null;
    text(r.up, st === 'ready' ? dur(since) : st === 'starting' ? dur(since) + ' elapsed' : since != null ? 'for ' + dur(since) : '—');
    cls(r.up, st === 'ready' ? '' : 'muted');
    text(r.restarts, num(rep.restarts, 0));
    text(r.out, num(rep.outstanding, 0));
    text(r.run, eng ? num(eng.running, 0) : '—');
    text(r.wait, eng ? num(eng.waiting, 0) : '—');
    text(r.kv, eng ? pct(eng.kv_cache) : '—');
    meter(r.kvbar, eng ? eng.kv_cache : 0); show(r.kvbar, eng);
    const path = `engines/${encodeURIComponent(rep.name)}/restart`;
    show(r.restart, d.actions && d.actions.restart && rep.managed !== false && !r.retiring);
    r.restart.disabled = pending.has(path);
    const tail = Array.isArray(rep.log_tail) ? rep.log_tail.map(String) : [];
    const bad = st === 'failed' || st === 'stalled';
    const why = restarting && rep.last_failure && !String(rep.message).includes(rep.last_failure);
    const msg = [rep.message, why ? 'last failure: ' + rep.last_failure : ''].filter(Boolean).join(' · ');
    const quiet = tone(st) === 'ok'; // a ready engine's message ("ready after 41s") sits under its name
    text(r.sub, quiet ? msg : ''); attr(r.sub, 'title', quiet ? msg : ''); show(r.sub, quiet && msg);
    text(r.msg, quiet ? '' : msg); show(r.msg, !quiet && msg); cls(r.msg, 'rep-msg ' + tone(st));
    text(r.logline, st === 'starting' && tail.length ? tail[tail.length - 1] : '');
    show(r.logline, st === 'starting' && tail.length);
    show(r.details, bad && tail.length);
    if (bad && tail.length) {
      text(r.details.firstChild, `Log tail · last ${tail.length} line${tail.length === 1 ? '' : 's'}`);
      text(r.pre, tail.join('\n'));
    }
    const extra = !!((!quiet && msg) || (st === 'starting' && tail.length) || (bad && tail.length));
    show(r.extra, extra);
    r.row.classList.toggle('has-detail', extra);
  }

  /* ---------------------------------------------------------------- GPUs and keys */

  function renderGpus(g) {
    const box = $('gpus'), list = (g && g.devices) || [];
    const ok = g && g.available;
    if (!ok) {
      if (!box._reason) { box.textContent = ''; box._keyed = null; box._reason = h('p', { class: 'muted' }); box.append(box._reason); }
      text(box._reason, (g && g.reason) || 'GPU figures are not available.');
      text($('gpu-count'), '');
      return;
    }
    if (box._reason) { box._reason.remove(); box._reason = null; }
    text($('gpu-count'), list.length || '');
    keyed(box, list, (x) => x.index, makeGpu, updateGpu);
  }

  function makeGpu() {
    const r = { name: h('span', { class: 'strong' }), model: h('span', { class: 'muted' }),
      mem: h('div', { class: 'bar' }, h('span')), memText: h('span', { class: 'gpu-figure' }),
      util: h('div', { class: 'bar util' }, h('span')), utilText: h('span', { class: 'gpu-figure' }),
      engines: h('div', { class: 'gpu-engines' }) };
    const n = h('div', { class: 'gpu' },
      h('div', { class: 'gpu-id' }, r.name, r.model),
      h('div', { class: 'gpu-meter' }, h('span', { class: 'gpu-label', text: 'Memory' }), r.mem, r.memText),
      h('div', { class: 'gpu-meter' }, h('span', { class: 'gpu-label', text: 'Util' }), r.util, r.utilText),
      r.engines);
    n._r = r;
    return n;
  }

  function updateGpu(n, g) {
    const r = n._r, used = g.memory_used_mib, total = g.memory_total_mib;
    text(r.name, 'GPU ' + g.index);
    text(r.model, g.name || '');
    meter(r.mem, total ? used / total : 0, 'mem');
    text(r.memText, isNum(used) && isNum(total) ? `${gib(used)} / ${gib(total)} GiB` : '—');
    meter(r.util, isNum(g.utilization_pct) ? g.utilization_pct / 100 : 0, 'util');
    text(r.utilText, isNum(g.utilization_pct) ? g.utilization_pct + '%' : '—');
    const engines = Array.isArray(g.engines) ? g.engines.map(String) : [];
    const sig = engines.join('\n');
    if (r.engines._sig !== sig) {
      r.engines._sig = sig;
      r.engines.replaceChildren(...(engines.length ? engines.map((e) => h('span', { class: 'chip mono', text: e }))
        : [h('span', { class: 'muted', text: 'free' })]));
    }
  }

  function renderKeys(keys) {
    keys = Array.isArray(keys) ? keys : [];
    show($('keys-section'), keys.length);
    text($('key-count'), keys.length || '');
    keyed($('keys'), keys, (k) => k.name, () => {
      const labels = ['Key', 'Requests', 'Errors', 'Prompt tokens', 'Completion tokens'];
      const cells = labels.map((label, i) => h('td', { class: i ? 'num' : 'mono strong', 'data-label': label }));
      return h('tr', null, ...cells);
    }, (tr, k) => {
      const c = tr.children;
      text(c[0], k.name); text(c[1], num(k.requests, 0)); text(c[2], num(k.errors, 0));
      text(c[3], compact(k.prompt_tokens)); text(c[4], compact(k.completion_tokens));
      attr(c[3], 'title', num(k.prompt_tokens, 0)); attr(c[4], 'title', num(k.completion_tokens, 0));
    });
  }

  /* ---------------------------------------------------------------- render */

  function render(d) {
    show($('login-panel'), false);
    text($('login-error'), '');
    show($('app'), true);
    renderHeader(d);
    const deps = Array.isArray(d.deployments) ? d.deployments : [];
    text($('dep-count'), deps.length || '');
    const box = $('deployments');
    keyed(box, deps, (x) => x.id, makeDeployment, (c, x) => updateDeployment(c, x, d));
    box.classList.toggle('none', !deps.length);
    const retiring = Array.isArray(d.retiring) ? d.retiring : [];
    show($('retiring-section'), retiring.length);
    text($('retiring-count'), retiring.length || '');
    keyed(retiringTable, retiring, (x) => x.name, (x) => makeReplica(x, true), (b, x) => updateReplica(b, x, d));
    renderGpus(d.gpus);
    renderKeys(d.keys);
  }

  const retiringTable = replicaTable();
  $('retiring').append(retiringTable);

  poll();
})();
