// Drives the console in Debian's chromium as a person would, for
// runtime/tests/console.rs, which starts the server and checks afterwards,
// through the API, that what was clicked happened. Prints one JSON line:
// the ids of the runs it started.
'use strict';

const assert = require('node:assert/strict');
const path = require('node:path');
const { chromium } = require(process.env.PLAYWRIGHT);

const URL = process.env.STEPBOX_URL;
const TIMEOUT = 30000;

function step(name) {
  process.stderr.write(`console test: ${name}\n`);
}

/** The page, for the failure report. */
let page = null;

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM,
    // As root (CI) chromium's own sandbox cannot start.
    args: ['--no-sandbox'],
  });
  page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  page.setDefaultTimeout(TIMEOUT);
  const problems = [];
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error') problems.push(`console: ${message.text()}`);
  });
  const shot = (name) => page.screenshot({ path: path.join(process.env.SCREENSHOTS, name), fullPage: true });
  const runStatus = (status) => page.locator(`#run-status [data-status="${status}"]`).waitFor();
  const openedRun = async () => {
    await page.waitForURL(/#\/runs\/[^/?]+$/);
    return decodeURIComponent(page.url().split('#/runs/')[1]);
  };

  step('an admin token is refused, with what to use instead');
  await page.goto(`${URL}/`);
  await page.fill('#token', process.env.STEPBOX_ADMIN_TOKEN);
  await page.click('button[type=submit]');
  await page.locator('.notice .error', { hasText: 'sign in with a tenant' }).waitFor();

  step('a tenant signs in from the keyboard');
  await page.fill('#token', process.env.STEPBOX_TOKEN);
  await page.press('#token', 'Enter');
  await page.locator('#who', { hasText: 'tenant acme' }).waitFor();
  await page.locator('#runs').waitFor();

  step('the workflows page lists what is deployed, with versions and triggers');
  await page.click('nav >> text=Workflows');
  await page.locator('#workflows >> text=approval').waitFor();
  await page.click('#workflows >> text=approval');
  await page.locator('#versions >> text=1 (shown)').waitFor();
  await page.locator('#triggers >> text=0 9 * * 1').waitFor();
  await page.locator('#triggers >> text=Europe/Paris').waitFor();
  await page.locator('#triggers code', { hasText: '/v1/hooks/acme/approval' }).waitFor();
  await page.locator('#outline-steps >> text=waits for event approve').waitFor();
  await shot('console-workflow.png');

  step('a run started from the console goes green live');
  await page.goto(`${URL}/#/workflows/pipeline`);
  await page.click('#start-run button[type=submit]');
  const pipeline = await openedRun();
  // The first step sleeps 2.5 s: it is seen running, the rest pending,
  // and then every step turns green without a reload.
  await page.locator('[data-step="fetch"].s-running').waitFor();
  assert.equal(await page.locator('[data-step="join"] text.word').textContent(), 'pending');
  await page.evaluate(() => { window.notReloaded = true; });
  await runStatus('succeeded');
  for (const id of ['fetch', 'left', 'right', 'join']) {
    const node = page.locator(`[data-step="${id}"]`);
    assert.match(await node.getAttribute('class'), /s-succeeded/, id);
    assert.equal(await node.locator('text.word').textContent(), 'succeeded', `${id} says its status in words`);
  }
  assert.equal(await page.evaluate(() => window.notReloaded), true, 'the page followed the run without reloading');
  assert.equal(await page.locator('.graph path.edge').count(), 4, 'fetch→left, fetch→right, left→join, right→join');
  await page.click('[data-step="join"]');
  await page.locator('#step-detail .step-output', { hasText: 'Hello, Hello, left! Hello, right!!' }).waitFor();
  await page.locator('#step-detail .execution-input', { hasText: '"name": "Hello, left! Hello, right!"' }).waitFor();
  await shot('console-run.png');

  step('a failed attempt\'s logs open from the keyboard, and the run is retried');
  await page.goto(`${URL}/#/runs/${encodeURIComponent(process.env.FAILED_RUN)}`);
  await runStatus('failed');
  assert.equal(await page.locator('.graph path.edge.on-failure').count(), 1, 'call→page, dashed');
  await page.focus('[data-step="call"]');
  await page.keyboard.press('Enter');
  const first = page.locator('#step-detail [data-attempt="1"]');
  await first.locator('[data-status="failed"]').waitFor();
  await first.locator('text=the upstream is still warming up').waitFor();
  await first.locator('button[data-logs]').focus();
  await page.keyboard.press('Enter');
  await page.locator('#step-detail .log-lines', { hasText: 'attempt 1: the upstream answered 503' }).waitFor();
  await shot('console-failed-attempt.png');
  await page.click('#run-actions >> text=Retry failed steps');
  await runStatus('succeeded');
  await page.locator('#step-detail [data-attempt="2"] [data-status="succeeded"]').waitFor();

  step('a run of more steps than the graph draws lists them');
  await page.goto(`${URL}/#/runs/${encodeURIComponent(process.env.WIDE_RUN)}`);
  await page.locator('.graph .big-run', { hasText: '401 steps are too many to draw' }).waitFor();
  assert.equal(await page.locator('#steps tbody tr').count(), 401);
  assert.equal(await page.locator('#steps [data-status="succeeded"]').count(), 401);

  step('a run started with inputs waits, and the console approves it');
  await page.goto(`${URL}/#/workflows/approval`);
  await page.fill('#input-count', 'three');
  await page.fill('#input-who', 'Grace');
  await page.click('#start-run button[type=submit]');
  await page.locator('.notice .error', { hasText: 'Input count must be integer' }).waitFor();
  await page.fill('#input-count', '3');
  await page.fill('#start-labels', 'note=<img src=x onerror="window.pwned=1">');
  await page.click('#start-run button[type=submit]');
  const approval = await openedRun();
  await page.locator('[data-step="approve"].s-waiting').waitFor();
  await runStatus('waiting');
  await page.click('[data-step="approve"]');
  await page.fill('#event-payload', '{"by": "Ada"}');
  await page.click('#step-detail >> text=Send event');
  await runStatus('succeeded');
  await page.click('summary');
  await page.locator('#run-outputs', { hasText: 'Hello, Ada!' }).waitFor();
  await page.locator('code', { hasText: 'note=<img src=x onerror="window.pwned=1">' }).waitFor();
  assert.equal(await page.locator('main img').count(), 0, 'a label is shown as text, never as markup');
  assert.equal(await page.evaluate(() => window.pwned), undefined);

  step('a running run is cancelled');
  await page.goto(`${URL}/#/workflows/nap`);
  await page.click('#start-run button[type=submit]');
  const nap = await openedRun();
  await page.locator('[data-step="nap"].s-running').waitFor();
  await page.click('#run-actions >> text=Cancel run');
  await runStatus('cancelled');

  step('the runs page filters by workflow and by status, and stays live');
  await page.click('nav >> text=Runs');
  await page.selectOption('#filter-workflow', 'approval');
  await page.click('form.filters button[type=submit]');
  await page.waitForURL(/workflow=approval/);
  // The filtered list replaces the whole one.
  const onlyRow = (id) => page.waitForFunction((wanted) => {
    const rows = document.querySelectorAll('#runs tbody tr');
    return rows.length === 1 && rows[0].dataset.run === wanted;
  }, id);
  await onlyRow(approval);
  await page.selectOption('#filter-workflow', '');
  await page.selectOption('#filter-status', 'cancelled');
  await page.click('form.filters button[type=submit]');
  await page.waitForURL(/status=cancelled/);
  await onlyRow(nap);
  await page.selectOption('#filter-status', 'running');
  await page.click('form.filters button[type=submit]');
  await page.locator('#runs >> text=No runs match.').waitFor();
  // A run started elsewhere shows up on its own.
  const started = await page.evaluate(async ([token]) => {
    const response = await fetch('/v1/workflows/nap/runs', {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: '{}',
    });
    return (await response.json()).id;
  }, [process.env.STEPBOX_TOKEN]);
  await page.locator(`#runs tr[data-run="${started}"] [data-status="running"]`).waitFor();
  await page.click(`#runs tr[data-run="${started}"] a`);
  await page.click('#run-actions >> text=Cancel run');
  await runStatus('cancelled');

  step('signing out forgets the token');
  await page.click('#sign-out');
  await page.locator('#token').waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem('stepbox.token')), null);

  assert.deepEqual(problems, [], 'the page logged no errors');
  await browser.close();
  console.log(JSON.stringify({ pipeline, approval, nap }));
}

main().catch(async (error) => {
  console.error(error);
  // What the page showed when it failed: its text, and a screenshot.
  if (page) {
    const failed = path.join(process.env.SCREENSHOTS, 'failure.png');
    await page.screenshot({ path: failed, fullPage: true }).catch(() => {});
    console.error(`the page at ${page.url()} (screenshot: ${failed}):`);
    console.error(await page.locator('body').innerText().catch((e) => String(e)));
  }
  process.exit(1);
});
