// The stepbox console: plain JavaScript over the same API every client
// uses (/v1), signed in with a tenant's token. Everything it shows comes
// from the API and goes into the page as text, never as markup.
'use strict';

const FINAL = ['succeeded', 'failed', 'cancelled'];
const RUN_STATUSES = ['running', 'waiting', 'interrupted', 'succeeded', 'failed', 'cancelled'];

// ---- Elements -------------------------------------------------------------

/** An element with attributes (`on…` take listeners) and children. */
function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** An SVG element, as `h` makes an HTML one. */
function s(tag, attrs, ...children) {
  return fill(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);
}

function fill(element, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else if (name === 'text') element.textContent = value;
    else element.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

/** A status as a coloured dot and its word. */
function badge(status) {
  return h('span', { class: `status s-${status}`, 'data-status': status }, status);
}

const view = () => document.getElementById('view');

function say(message, error) {
  const notice = document.getElementById('notice');
  notice.replaceChildren(message ? h('p', { class: error ? 'error' : '' }, message) : '');
}

// ---- Formatting -----------------------------------------------------------

const when = (ms) => (ms ? new Date(ms).toLocaleString() : '');

function took(from, to) {
  if (!from) return '';
  const ms = (to || Date.now()) - from;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

const json = (value) => JSON.stringify(value, null, 2);
const enc = encodeURIComponent;

// ---- The API --------------------------------------------------------------

const session = {
  get token() { return sessionStorage.getItem('stepbox.token'); },
  set token(value) {
    if (value) sessionStorage.setItem('stepbox.token', value);
    else sessionStorage.removeItem('stepbox.token');
  },
  tenant: null,
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Calls the API with the token; `signal` stops a page's calls when it is left. */
async function api(method, path, body, signal) {
  const headers = { Authorization: `Bearer ${session.token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) {
    const error = data && data.error;
    if (response.status === 401) signOut('Your token is not valid any more (revoked?); sign in again.');
    throw new ApiError(response.status, error ? error.code : 'http', error ? error.message : `${response.status} ${response.statusText}`);
  }
  return data;
}

/**
 * Follows a run's server-sent events through `fetch` (which, unlike
 * EventSource, sends the token), reconnecting with the last id seen until
 * `signal` aborts: soon after a stream that brought events ends (a parked
 * run goes on when its event comes), later and later after one that
 * brought none or failed. A token that is refused
 * signs out; a run that cannot be read is not followed.
 */
async function follow(runId, signal, onEvent) {
  let last = null;
  let pause = 1000;
  while (!signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${session.token}`, Accept: 'text/event-stream' };
      if (last !== null) headers['Last-Event-ID'] = last;
      const response = await fetch(`/v1/runs/${enc(runId)}/events`, { headers, signal });
      if (response.status === 401) return signOut('Your token is not valid any more (revoked?); sign in again.');
      if (response.status >= 400 && response.status < 500) return;
      if (!response.ok) throw new Error(`the event stream answered ${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      const from = last;
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let data = '';
          for (const line of frame.split('\n')) {
            if (line.startsWith('id:')) last = line.slice(3).trim();
            else if (line.startsWith('data:')) data += line.slice(5).trim();
          }
          if (data) onEvent(JSON.parse(data));
        }
      }
      // A stream that brought nothing (a parked or finished run) is asked
      // again less and less often.
      pause = last === from ? Math.min(pause * 2, 10000) : 1000;
    } catch {
      if (signal.aborted) return;
      pause = Math.min(pause * 2, 30000);
    }
    await sleep(pause * (0.75 + Math.random() / 2), signal);
  }
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  if (signal) signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
});

// ---- Pages ----------------------------------------------------------------

/** What the page now shown needs stopped when another replaces it. */
let leaving = new AbortController();

async function route() {
  leaving.abort();
  leaving = new AbortController();
  const signal = leaving.signal;
  say('');
  if (!session.token) return signInPage();
  if (!session.tenant) {
    try {
      await whoAmI();
    } catch (error) {
      return signInPage(error.message);
    }
    if (signal.aborted) return;
  }
  try {
    const [path, query] = location.hash.replace(/^#/, '').split('?');
    const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
    if (parts.some((part) => part === '.' || part === '..')) throw new Error('No such page.');
    const params = new URLSearchParams(query || '');
    for (const link of document.querySelectorAll('#nav a')) {
      const current = link.getAttribute('href').slice(2) === (parts[0] || 'runs');
      if (current) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
    if (parts[0] === 'runs' && parts[1]) await runPage(parts[1], signal);
    else if (parts[0] === 'workflows' && parts[1]) await workflowPage(parts[1], params, signal);
    else if (parts[0] === 'workflows') await workflowsPage(signal);
    else await runsPage(params, signal);
  } catch (error) {
    if (signal.aborted) return;
    view().replaceChildren(h('h1', {}, 'Something went wrong'), h('p', { class: 'error' }, error.message));
  }
}

async function whoAmI() {
  const me = await api('GET', '/v1/me');
  if (!me.tenant) {
    session.token = null;
    throw new Error('This is an admin token. The console works for one tenant at a time: sign in with a tenant\'s token (`stepbox token create --tenant NAME`).');
  }
  session.tenant = me.tenant;
  document.getElementById('who').textContent = `tenant ${me.tenant}`;
  document.getElementById('nav').hidden = false;
  document.getElementById('sign-out').hidden = false;
}

function signOut(message) {
  session.token = null;
  session.tenant = null;
  document.getElementById('who').textContent = '';
  document.getElementById('nav').hidden = true;
  document.getElementById('sign-out').hidden = true;
  if (message) say(message, true);
  if (location.hash !== '#/') location.hash = '#/';
  else route();
}

function signInPage(problem) {
  const input = h('input', { id: 'token', type: 'password', autocomplete: 'off', required: true, size: 48 });
  const form = h('form', {
    onsubmit: async (event) => {
      event.preventDefault();
      session.token = input.value.trim();
      session.tenant = null;
      try {
        await whoAmI();
        route();
      } catch (error) {
        session.token = null;
        say(error.message, true);
        input.focus();
      }
    },
  },
  h('label', { for: 'token' }, 'API token ', h('span', { class: 'hint' }, '(a tenant\'s: stepbox token create --tenant NAME)')),
  input, ' ', h('button', { type: 'submit' }, 'Sign in'));
  view().replaceChildren(h('h1', {}, 'Sign in'), h('section', { class: 'card' }, form));
  if (problem) say(problem, true);
  input.focus();
}

// ---- Runs -----------------------------------------------------------------

async function runsPage(params, signal) {
  const workflows = (await api('GET', '/v1/workflows', undefined, signal)).workflows;
  if (signal.aborted) return;
  const status = h('select', { id: 'filter-status', name: 'status' },
    h('option', { value: '' }, 'any'),
    RUN_STATUSES.map((name) => h('option', { value: name, selected: params.get('status') === name }, name)));
  const workflow = h('select', { id: 'filter-workflow', name: 'workflow' },
    h('option', { value: '' }, 'any'),
    workflows.map((w) => h('option', { value: w.name, selected: params.get('workflow') === w.name }, w.name)));
  const label = h('input', { id: 'filter-label', name: 'label', placeholder: 'key=value', value: params.getAll('label').join(' ') });
  const filters = h('form', {
    class: 'filters',
    onsubmit: (event) => {
      event.preventDefault();
      const next = new URLSearchParams();
      if (status.value) next.set('status', status.value);
      if (workflow.value) next.set('workflow', workflow.value);
      for (const pair of label.value.split(/\s+/).filter(Boolean)) next.append('label', pair);
      location.hash = `#/runs?${next}`;
    },
  },
  h('div', {}, h('label', { for: 'filter-status' }, 'Status'), status),
  h('div', {}, h('label', { for: 'filter-workflow' }, 'Workflow'), workflow),
  h('div', {}, h('label', { for: 'filter-label' }, 'Labels ', h('span', { class: 'hint' }, 'key=value, space between')), label),
  h('button', { type: 'submit' }, 'Filter'));

  const body = h('tbody');
  const more = h('button', { type: 'button', class: 'quiet', hidden: true }, 'Older runs');
  const table = h('table', { id: 'runs' },
    h('thead', {}, h('tr', {}, ['Run', 'Workflow', 'Status', 'Started', 'Took', 'Labels'].map((name) => h('th', { scope: 'col' }, name)))),
    body);
  view().replaceChildren(h('h1', {}, 'Runs'), filters, h('section', { class: 'card' }, table, h('div', { class: 'actions' }, more)));

  let shown = 20;
  let cursor = null;
  const query = (limit, after) => {
    const q = new URLSearchParams();
    for (const name of ['status', 'workflow']) if (params.get(name)) q.set(name, params.get(name));
    for (const pair of params.getAll('label')) q.append('label', pair);
    q.set('limit', String(limit));
    if (after) q.set('cursor', after);
    return `/v1/runs?${q}`;
  };
  const row = (run) => h('tr', { 'data-run': run.id },
    h('td', {}, h('a', { href: `#/runs/${enc(run.id)}`, class: 'mono' }, run.id)),
    h('td', {}, run.workflow, run.version ? h('span', { class: 'muted' }, ` v${run.version}`) : ''),
    h('td', {}, badge(run.status)),
    h('td', {}, when(run.created_ms)),
    h('td', { class: 'num' }, took(run.created_ms, run.finished_ms)),
    h('td', {}, Object.entries(run.labels).map(([k, v]) => h('code', {}, `${k}=${v} `))));
  const show = (page, append) => {
    // The keyboard's place in the list is kept across a redraw.
    const focused = document.activeElement && document.activeElement.closest && document.activeElement.closest('tr[data-run]');
    const rows = page.runs.map(row);
    if (append) body.append(...rows);
    else body.replaceChildren(...rows);
    if (focused && !focused.isConnected) body.querySelector(`tr[data-run="${CSS.escape(focused.dataset.run)}"] a`)?.focus();
    if (!body.children.length) body.append(h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No runs match.')));
    cursor = page.next_cursor;
    more.hidden = !cursor;
  };
  more.addEventListener('click', async () => {
    try {
      show(await api('GET', query(20, cursor), undefined, signal), true);
      shown = body.children.length;
    } catch (error) {
      if (!signal.aborted) say(error.message, true);
    }
  });
  const refresh = async () => {
    const page = await api('GET', query(Math.min(Math.max(shown, 20), 500)), undefined, signal);
    if (!signal.aborted) show(page, false);
  };
  await refresh();
  // The list stays live: it is read again every two seconds while shown.
  (async () => {
    while (!signal.aborted) {
      await sleep(2000, signal);
      if (signal.aborted) return;
      try { await refresh(); } catch { /* the next round tries again */ }
    }
  })();
}

// ---- A run ----------------------------------------------------------------

async function runPage(runId, signal) {
  const id = enc(runId);
  // The page reads the run's summary (no logs, no inputs) again as it
  // changes, and the chosen step's records only when that step changes.
  const state = {
    report: await api('GET', `/v1/runs/${id}?records=false`, undefined, signal),
    outline: null,
    selected: null,
    records: null,
    open: new Set(),
  };
  const run = state.report;
  if (run.version) {
    try {
      state.outline = await api('GET', `/v1/workflows/${enc(run.workflow)}/outline?version=${run.version}`, undefined, signal);
    } catch { state.outline = null; }
  }
  if (signal.aborted) return;
  const header = h('div');
  const actions = h('div', { class: 'actions', id: 'run-actions' });
  const graph = h('div', { class: 'graph', id: 'graph' });
  const steps = h('tbody');
  const detail = h('section', { class: 'card', id: 'step-detail' });
  view().replaceChildren(
    header, actions,
    h('h2', {}, 'Graph'), graph,
    h('div', { class: 'columns' },
      h('section', {},
        h('h2', {}, 'Steps'),
        h('table', { id: 'steps' }, h('thead', {}, h('tr', {}, ['Step', 'Status', 'Attempts', 'Took'].map((n) => h('th', { scope: 'col' }, n)))), steps)),
      h('section', {}, h('h2', {}, 'Step'), detail)));

  // What a step's records were read for: read again when it changed.
  const changeOf = (step) => step && `${step.status}/${step.finished_ms}/${step.executions.reduce((n, e) => n + e.attempts.length, 0)}`;
  const loadRecords = async (stepId) => {
    const step = flatten(state.report.steps).get(stepId);
    if (!step || (state.records && state.records.id === stepId && state.records.change === changeOf(step))) return;
    const change = changeOf(step);
    try {
      const found = await api('GET', `/v1/runs/${id}/logs?step=${enc(stepId)}`, undefined, signal);
      if (state.selected === stepId) state.records = { id: stepId, change, step: found.steps[0] };
    } catch (error) {
      // A step with no records yet has none to show.
      if (error.status !== 404 && !signal.aborted) say(error.message, true);
    }
  };
  const select = async (stepId) => {
    state.selected = stepId;
    render();
    await loadRecords(stepId);
    if (signal.aborted || state.selected !== stepId) return;
    render();
    detail.querySelector('h3')?.focus();
  };

  // One read at a time; a change during a read asks for one more after it,
  // spaced by how long reads take, so a big run is not read back to back.
  let reading = false;
  let again = false;
  const refresh = async () => {
    if (reading) {
      again = true;
      return;
    }
    reading = true;
    try {
      do {
        again = false;
        const began = performance.now();
        const report = await api('GET', `/v1/runs/${id}?records=false`, undefined, signal);
        if (signal.aborted) return;
        state.report = report;
        if (state.selected) await loadRecords(state.selected);
        if (signal.aborted) return;
        render();
        await sleep(Math.max(100, 2 * (performance.now() - began)), signal);
      } while (again && !signal.aborted);
    } catch (error) {
      if (!signal.aborted) say(error.message, true);
    } finally {
      reading = false;
    }
  };

  let following = null;
  const startFollowing = () => {
    if (following && !following.signal.aborted) return;
    following = new AbortController();
    signal.addEventListener('abort', () => following.abort(), { once: true });
    follow(runId, following.signal, (event) => {
      refresh();
      // A run that ended is no longer followed; an action starts again.
      if (event.type === 'run_finished' && FINAL.includes(event.status)) following.abort();
    });
  };

  const act = async (what, method, path, body) => {
    try {
      await api(method, path, body, signal);
      say(what);
      startFollowing();
      refresh();
    } catch (error) {
      say(error.message, true);
    }
  };

  let drawn = '';
  let shownDetail = null;
  // Each waiting step's event form, made once and put back by every
  // redraw of the panel: what is typed in it, and the focus, survive.
  const eventForms = new Map();
  const rows = new Map();
  function render() {
    // What has the keyboard's focus is found again after the redraw.
    const focused = document.activeElement;
    const again = focused && focused.dataset && (focused.dataset.select !== undefined
      ? `[data-select="${CSS.escape(focused.dataset.select)}"]`
      : focused.dataset.logs !== undefined ? `[data-logs="${CSS.escape(focused.dataset.logs)}"]` : null);
    draw();
    if (again && !focused.isConnected) view().querySelector(again)?.focus();
  }

  function draw() {
    const report = state.report;
    header.replaceChildren(
      h('h1', {}, 'Run ', h('span', { class: 'mono' }, report.id)),
      h('dl', { class: 'meta' },
        h('dt', {}, 'Status'), h('dd', { id: 'run-status', 'aria-live': 'polite' }, badge(report.status), report.cancel_requested ? ' (cancel asked for)' : ''),
        h('dt', {}, 'Workflow'), h('dd', {}, h('a', { href: `#/workflows/${enc(report.workflow)}` }, report.workflow), report.version ? ` version ${report.version}` : ''),
        h('dt', {}, 'Started'), h('dd', {}, when(report.created_ms)),
        h('dt', {}, 'Took'), h('dd', {}, took(report.created_ms, report.finished_ms)),
        Object.keys(report.labels).length ? [h('dt', {}, 'Labels'), h('dd', {}, Object.entries(report.labels).map(([k, v]) => h('code', {}, `${k}=${v} `)))] : [],
        report.error ? [h('dt', {}, 'Error'), h('dd', { class: 'error' }, report.error)] : []),
      h('details', { open: header.querySelector('details')?.open },
        h('summary', {}, 'Inputs and outputs'),
        h('h3', {}, 'Inputs'), h('pre', {}, json(report.inputs)),
        h('h3', {}, 'Outputs'), h('pre', { id: 'run-outputs' }, report.outputs ? json(report.outputs) : 'none yet'),
        report.output_errors.length ? h('p', { class: 'error' }, report.output_errors.join('\n')) : ''));
    const buttons = [];
    if (['running', 'waiting', 'interrupted'].includes(report.status) && !report.cancel_requested) {
      buttons.push(h('button', { type: 'button', class: 'danger', onclick: () => act('Cancelling the run.', 'POST', `/v1/runs/${id}/cancel`) }, 'Cancel run'));
    }
    if (['interrupted', 'failed', 'cancelled'].includes(report.status)) {
      buttons.push(h('button', { type: 'button', onclick: () => act('Resuming the run.', 'POST', `/v1/runs/${id}/resume`) }, 'Resume'));
    }
    if (['failed', 'cancelled'].includes(report.status)) {
      buttons.push(h('button', { type: 'button', onclick: () => act('Retrying the failed steps.', 'POST', `/v1/runs/${id}/retry`, {}) }, 'Retry failed steps'));
    }
    actions.replaceChildren(...buttons);

    const all = flatten(report.steps);
    // The graph is laid out again only when its steps change (a run
    // without an outline shows steps as they start).
    const ids = graphIds(state);
    if (ids.join('\n') !== drawn) {
      drawn = ids.join('\n');
      drawGraph(graph, state, ids, (stepId) => select(stepId));
    }
    for (const node of graph.querySelectorAll('.node')) {
      const step = all.get(node.dataset.step);
      const status = step ? step.status : 'pending';
      const chosen = state.selected === node.dataset.step;
      node.setAttribute('class', `node s-${status}${chosen ? ' selected' : ''}`);
      node.setAttribute('aria-label', `step ${node.dataset.step}: ${status}`);
      node.setAttribute('aria-pressed', chosen ? 'true' : 'false');
      node.querySelector('text.word').textContent = status;
    }
    // Rows are kept and updated in place, so a big run's table is not
    // rebuilt at every change.
    for (const [path, step] of all) {
      let row = rows.get(path);
      if (!row) {
        row = {
          button: h('button', { type: 'button', class: 'quiet mono', 'data-select': path, onclick: () => select(path) }, path),
          status: h('td'), attempts: h('td', { class: 'num' }), took: h('td', { class: 'num' }),
        };
        row.element = h('tr', {}, h('td', {}, row.button), row.status, row.attempts, row.took);
        rows.set(path, row);
        steps.append(row.element);
      }
      row.button.setAttribute('aria-pressed', state.selected === path ? 'true' : 'false');
      if (row.status.dataset.shown !== step.status) {
        row.status.dataset.shown = step.status;
        row.status.replaceChildren(badge(step.status));
      }
      row.attempts.textContent = step.executions.reduce((n, e) => n + e.attempts.length, 0);
      row.took.textContent = took(step.started_ms, step.finished_ms);
    }
    // The step's panel is drawn again only when it changed, so what is
    // typed in it survives events of other steps.
    const step = all.get(state.selected);
    const records = state.records && state.records.id === state.selected ? state.records : null;
    const key = [state.selected, changeOf(step), report.status, records && records.change, [...state.open].join(','), !!state.outline].join('|');
    if (key !== shownDetail) {
      shownDetail = key;
      renderDetail(records ? records.step : step);
    }
  }

  function renderDetail(step) {
    if (!step) {
      detail.replaceChildren(h('p', { class: 'muted' }, 'Choose a step in the graph or the list (Tab to it, then Enter).'));
      return;
    }
    const report = state.report;
    const declared = state.outline && state.outline.steps.find((s) => s.id === step.id);
    const parts = [
      h('h3', { tabindex: '-1' }, 'Step ', h('span', { class: 'mono' }, step.id), ' ', badge(step.status)),
      step.reason ? h('p', {}, step.reason) : '',
      declared && declared.component ? h('p', { class: 'muted' }, `runs component ${declared.component}`) : '',
    ];
    if (step.status === 'waiting' || (declared && declared.kind === 'wait' && !FINAL.includes(step.status) && step.status !== 'skipped')) {
      if (!eventForms.has(step.id)) eventForms.set(step.id, eventForm(report.id, declared ? declared.event : null, act));
      parts.push(eventForms.get(step.id));
    }
    if (['failed', 'cancelled'].includes(report.status)) {
      parts.push(h('div', { class: 'actions' }, h('button', {
        type: 'button',
        class: 'quiet',
        onclick: () => act(`Retrying from ${step.id}.`, 'POST', `/v1/runs/${id}/retry`, { from: step.id }),
      }, 'Retry from this step')));
    }
    // One execution's input comes before the step's output; a fan-out's
    // inputs and outputs are shown by execution.
    const many = step.executions.length > 1;
    const only = !many && step.executions[0];
    if (only) parts.push(inputView(only));
    if (step.output !== null && step.output !== undefined) parts.push(h('h4', {}, 'Output'), h('pre', { class: 'step-output' }, json(step.output)));
    for (const execution of step.executions) parts.push(executionView(execution, many));
    const focused = document.activeElement;
    detail.replaceChildren(...parts.flat(Infinity).filter((part) => part !== ''));
    if (focused && focused !== document.activeElement && detail.contains(focused)) focused.focus();
  }

  function executionView(execution, many) {
    return h('div', { class: 'execution' },
      execution.item !== null && execution.item !== undefined ? h('h4', {}, 'Item ', h('code', {}, JSON.stringify(execution.item))) : '',
      execution.reused ? h('p', { class: 'muted' }, 'Reused: it succeeded before this run was resumed or retried.') : '',
      execution.error ? h('p', { class: 'error' }, execution.error) : '',
      many ? inputView(execution) : '',
      many && execution.output !== null && execution.output !== undefined ? [h('h4', {}, 'Output'), h('pre', {}, json(execution.output))] : '',
      execution.attempts.map((attempt) => attemptView(execution, attempt)));
  }

  function inputView(execution) {
    return execution.input !== undefined && execution.input !== null
      ? [h('h4', {}, 'Input'), h('pre', { class: 'execution-input' }, json(execution.input))]
      : '';
  }

  function attemptView(execution, attempt) {
    const key = `${execution.idempotency_key}#${attempt.attempt}`;
    const open = state.open.has(key);
    const toggle = h('button', {
      type: 'button',
      class: 'quiet',
      'aria-expanded': open ? 'true' : 'false',
      'data-logs': key,
      onclick: () => {
        if (open) state.open.delete(key);
        else state.open.add(key);
        render();
      },
    }, open ? 'Hide logs' : 'Logs');
    const failure = attempt.failure;
    return h('div', { class: 'attempt', 'data-attempt': attempt.attempt },
      h('p', {},
        h('strong', {}, `Attempt ${attempt.attempt} `), badge(attempt.status),
        failure ? [' ', h('code', {}, failure.kind), ' ', h('span', { class: 'failure' }, failure.message)] : ''),
      h('dl', { class: 'meta' },
        h('dt', {}, 'Took'), h('dd', {}, took(attempt.started_ms, attempt.finished_ms)),
        h('dt', {}, 'Fuel'), h('dd', {}, attempt.fuel_consumed.toLocaleString()),
        h('dt', {}, 'Peak memory'), h('dd', {}, bytes(attempt.peak_memory)),
        attempt.delay_before_ms ? [h('dt', {}, 'Backoff before'), h('dd', {}, `${Math.round(attempt.delay_before_ms)} ms`)] : []),
      toggle, open ? h('div', { class: 'logs' }, logsView(attempt)) : '');
  }

  function logsView(attempt) {
    return [
      h('h4', {}, 'Logs'),
      attempt.logs.length
        ? h('pre', { class: 'log-lines' }, attempt.logs.map((line) => h('div', {}, h('span', { class: 'level' }, line.level), `${line.context}: ${line.message}`)))
        : h('p', { class: 'muted' }, 'No log lines.'),
      h('h4', {}, 'stdout'), attempt.stdout.text ? h('pre', { class: 'stdout' }, attempt.stdout.text) : h('p', { class: 'muted' }, 'empty'),
      h('h4', {}, 'stderr'), attempt.stderr.text ? h('pre', { class: 'stderr' }, attempt.stderr.text) : h('p', { class: 'muted' }, 'empty'),
    ];
  }

  render();
  if (!FINAL.includes(state.report.status)) startFollowing();
}

/** A form that sends the event a waiting step waits for. */
function eventForm(runId, event, act) {
  const name = h('input', { id: 'event-name', value: event || '', required: true });
  const payload = h('textarea', { id: 'event-payload', spellcheck: 'false' }, '{}');
  return h('form', {
    class: 'card',
    onsubmit: (e) => {
      e.preventDefault();
      let body;
      try { body = JSON.parse(payload.value || 'null'); } catch (error) {
        say(`The payload is not JSON: ${error.message}`, true);
        payload.focus();
        return;
      }
      act(`Sent event ${name.value}.`, 'POST', `/v1/runs/${enc(runId)}/events/${enc(name.value)}`, body);
    },
  },
  h('label', { for: 'event-name' }, 'Event'), name,
  h('label', { for: 'event-payload' }, 'Payload ', h('span', { class: 'hint' }, '(JSON: the waiting step\'s output)')), payload,
  h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Send event')));
}

/** Every step of a report by path, included workflows' steps after their include step. */
function flatten(steps, into = new Map()) {
  for (const step of steps) {
    into.set(step.id, step);
    flatten(step.steps || [], into);
  }
  return into;
}

/** The most steps the graph draws; a bigger run is shown as its list. */
const MAX_GRAPH = 400;

/** The graph's steps: every declared one, and any the report has beside them. */
function graphIds(state) {
  const declared = state.outline ? state.outline.steps.map((step) => step.id) : [];
  return [...new Set([...declared, ...state.report.steps.map((step) => step.id)])];
}

/**
 * Draws the run's top-level steps as a graph, left to right: a step's
 * column is one past the furthest of the steps it waits for (an
 * `on_failure` handler waits for the step it handles), found in one pass
 * in dependency order. Without an outline (a run not started through the
 * service) the steps stand in one column.
 */
function drawGraph(container, state, ids, select) {
  if (ids.length > MAX_GRAPH) {
    container.replaceChildren(h('p', { class: 'muted big-run' }, `${ids.length} steps are too many to draw; the list below has them all.`));
    return;
  }
  const before = new Map(ids.map((id) => [id, new Set()]));
  const failureEdges = new Set();
  for (const step of state.outline ? state.outline.steps : []) {
    if (!before.has(step.id)) continue;
    for (const dep of step.depends_on) if (before.has(dep)) before.get(step.id).add(dep);
    for (const handler of step.on_failure) {
      if (!before.has(handler)) continue;
      before.get(handler).add(step.id);
      failureEdges.add(`${step.id}>${handler}`);
    }
  }
  // Kahn's order: each step after all it waits for.
  const after = new Map(ids.map((id) => [id, []]));
  const waiting = new Map();
  for (const [id, deps] of before) {
    waiting.set(id, deps.size);
    for (const dep of deps) after.get(dep).push(id);
  }
  const column = new Map();
  const ready = ids.filter((id) => waiting.get(id) === 0);
  for (const id of ready) column.set(id, 0);
  while (ready.length) {
    const id = ready.shift();
    for (const next of after.get(id)) {
      column.set(next, Math.max(column.get(next) || 0, column.get(id) + 1));
      waiting.set(next, waiting.get(next) - 1);
      if (waiting.get(next) === 0) ready.push(next);
    }
  }
  for (const id of ids) if (!column.has(id)) column.set(id, 0);
  const W = 170, H = 50, GX = 70, GY = 22, PAD = 16;
  const rows = new Map();
  const at = new Map();
  for (const id of ids) {
    const c = column.get(id);
    const r = rows.get(c) || 0;
    rows.set(c, r + 1);
    at.set(id, { x: PAD + c * (W + GX), y: PAD + r * (H + GY) });
  }
  const width = PAD * 2 + (Math.max(0, ...column.values()) + 1) * (W + GX) - GX;
  const height = PAD * 2 + Math.max(1, ...rows.values()) * (H + GY) - GY;
  const svg = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'group', 'aria-label': 'The run\'s steps and what each waits for' });
  for (const [id, deps] of before) {
    for (const dep of deps) {
      const from = at.get(dep), to = at.get(id);
      const x1 = from.x + W, y1 = from.y + H / 2, x2 = to.x, y2 = to.y + H / 2, mid = (x1 + x2) / 2;
      svg.append(s('path', {
        class: failureEdges.has(`${dep}>${id}`) ? 'edge on-failure' : 'edge',
        d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`,
      }));
    }
  }
  for (const id of ids) {
    const { x, y } = at.get(id);
    const label = id.length > 20 ? `${id.slice(0, 19)}…` : id;
    svg.append(s('g', {
      class: 'node s-pending', 'data-step': id, tabindex: '0', role: 'button', 'aria-label': `step ${id}`,
      transform: `translate(${x},${y})`,
      onclick: () => select(id),
      onkeydown: (event) => {
        if (event.key === 'Enter' || event.key === ' ') {
          event.preventDefault();
          select(id);
        }
      },
    },
    s('title', {}, id),
    s('rect', { width: W, height: H, rx: 7 }),
    s('rect', { class: 'bar', width: 6, height: H - 8, x: 4, y: 4, rx: 3 }),
    s('text', { x: 18, y: 21 }, label),
    s('text', { class: 'word', x: 18, y: 39 }, 'pending')));
  }
  container.replaceChildren(svg);
}

// ---- Workflows ------------------------------------------------------------

async function workflowsPage(signal) {
  const workflows = (await api('GET', '/v1/workflows', undefined, signal)).workflows;
  if (signal.aborted) return;
  view().replaceChildren(h('h1', {}, 'Workflows'), h('section', { class: 'card' },
    workflows.length
      ? h('table', { id: 'workflows' },
        h('thead', {}, h('tr', {}, ['Workflow', 'Newest version', 'Deployed', 'Digest'].map((n) => h('th', { scope: 'col' }, n)))),
        h('tbody', {}, workflows.map((w) => h('tr', {},
          h('td', {}, h('a', { href: `#/workflows/${enc(w.name)}` }, w.name)),
          h('td', { class: 'num' }, w.version),
          h('td', {}, when(w.created_ms)),
          h('td', { class: 'mono' }, w.digest.slice(0, 12))))))
      : h('p', { class: 'muted' }, 'Nothing is deployed yet: `stepbox deploy WORKFLOW.yaml --server URL --token TOKEN`.')));
}

async function workflowPage(name, params, signal) {
  const versions = (await api('GET', `/v1/workflows/${enc(name)}/versions`, undefined, signal)).versions;
  const wanted = Number(params.get('version')) || versions[0].version;
  const outline = await api('GET', `/v1/workflows/${enc(name)}/outline?version=${wanted}`, undefined, signal);
  if (signal.aborted) return;
  const hook = `${location.origin}/v1/hooks/${enc(session.tenant)}/${enc(name)}`;
  view().replaceChildren(
    h('h1', {}, 'Workflow ', name),
    h('p', {}, h('a', { href: `#/runs?workflow=${enc(name)}` }, 'Runs of this workflow')),
    h('section', { class: 'card' }, h('h2', {}, `Start a run of version ${outline.version}`), startForm(name, outline)),
    h('section', { class: 'card' },
      h('h2', {}, 'Versions'),
      h('table', { id: 'versions' },
        h('thead', {}, h('tr', {}, ['Version', 'Deployed', 'Digest', 'File'].map((n) => h('th', { scope: 'col' }, n)))),
        h('tbody', {}, versions.map((v) => h('tr', {},
          h('td', {}, v.version === outline.version
            ? h('strong', { 'aria-current': 'true' }, `${v.version} (shown)`)
            : h('a', { href: `#/workflows/${enc(name)}?version=${v.version}` }, String(v.version))),
          h('td', {}, when(v.created_ms)),
          h('td', { class: 'mono' }, v.digest.slice(0, 12)),
          h('td', { class: 'mono' }, v.entry)))))),
    h('section', { class: 'card' },
      h('h2', {}, 'Steps'),
      h('table', { id: 'outline-steps' },
        h('thead', {}, h('tr', {}, ['Step', 'Does', 'Waits for', 'On failure'].map((n) => h('th', { scope: 'col' }, n)))),
        h('tbody', {}, outline.steps.map((step) => h('tr', {},
          h('td', { class: 'mono' }, step.id),
          h('td', {}, step.kind === 'run' ? `runs ${step.component}` : step.kind === 'wait' ? `waits for event ${step.event}` : `includes ${step.include}`, step.fan_out ? ' (fans out)' : ''),
          h('td', { class: 'mono' }, step.depends_on.join(', ')),
          h('td', { class: 'mono' }, step.on_failure.join(', '))))))),
    h('section', { class: 'card', id: 'triggers' },
      h('h2', {}, 'Triggers'),
      outline.schedules.length
        ? h('table', {}, h('thead', {}, h('tr', {}, ['Schedule', 'Time zone', 'Missed ticks'].map((n) => h('th', { scope: 'col' }, n)))),
          h('tbody', {}, outline.schedules.map((t) => h('tr', {}, h('td', { class: 'mono' }, t.cron), h('td', {}, t.timezone), h('td', {}, t.catch_up)))))
        : h('p', { class: 'muted' }, 'No schedules.'),
      outline.webhook
        ? h('p', {}, 'Webhook: ', h('code', {}, `POST ${hook}`), ' (signed with the workflow\'s secret)')
        : h('p', { class: 'muted' }, 'No webhook.')));
}

/** The form that starts a run: one field per declared input, and labels. */
function startForm(name, outline) {
  const fields = Object.entries(outline.inputs).map(([input, spec]) => {
    const type = spec.type || 'any';
    const id = `input-${input}`;
    const hint = [type, spec.required ? 'required' : 'optional', spec.default !== undefined && spec.default !== null ? `default ${JSON.stringify(spec.default)}` : '']
      .filter(Boolean).join(', ');
    return {
      input, type,
      element: h('input', { id, name: input, required: spec.required && spec.default == null, placeholder: type === 'string' ? '' : 'JSON' }),
      label: h('label', { for: id }, input, ' ', h('span', { class: 'hint' }, `(${hint})${spec.description ? ` ${spec.description}` : ''}`)),
    };
  });
  const labels = h('textarea', { id: 'start-labels', placeholder: 'key=value, one a line' });
  return h('form', {
    id: 'start-run',
    onsubmit: async (event) => {
      event.preventDefault();
      const inputs = {};
      for (const field of fields) {
        const text = field.element.value;
        if (text === '') continue;
        if (field.type === 'string') inputs[field.input] = text;
        else {
          try { inputs[field.input] = JSON.parse(text); } catch {
            if (field.type === 'any') inputs[field.input] = text;
            else {
              say(`Input ${field.input} must be ${field.type} JSON, like ${field.type === 'boolean' ? 'true' : field.type === 'array' ? '[1, 2]' : field.type === 'object' ? '{"a": 1}' : '42'}.`, true);
              field.element.focus();
              return;
            }
          }
        }
      }
      const runLabels = {};
      for (const line of labels.value.split('\n').map((l) => l.trim()).filter(Boolean)) {
        const at = line.indexOf('=');
        if (at < 1) {
          say(`Label "${line}" is not key=value.`, true);
          labels.focus();
          return;
        }
        runLabels[line.slice(0, at)] = line.slice(at + 1);
      }
      try {
        const run = await api('POST', `/v1/workflows/${enc(name)}/runs`, { inputs, labels: runLabels, version: outline.version });
        location.hash = `#/runs/${enc(run.id)}`;
      } catch (error) {
        say(error.message, true);
      }
    },
  },
  fields.length ? fields.map((f) => [f.label, f.element]) : h('p', { class: 'muted' }, 'It declares no inputs.'),
  h('label', { for: 'start-labels' }, 'Labels ', h('span', { class: 'hint' }, '(optional)')), labels,
  h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Start run')));
}

// ---- Start ----------------------------------------------------------------

window.addEventListener('hashchange', () => {
  route();
  view().focus();
});
document.getElementById('sign-out').addEventListener('click', () => signOut('Signed out.'));
route();
