// The demo console (tests/fixtures/gateway_ui) in headless Chromium, against the real stack
// behind the edge. Run by tests/tests/browser.rs, which starts nats-server, the stand-in,
// the origin, `wrangler dev` and the page's server, then runs this with:
//
//   UI_URL          the page (serve.mjs), e.g. http://127.0.0.1:41234/
//   SCREENSHOT_DIR  where the PNGs go (target/browser)
//   CHROMIUM        optional, default /usr/bin/chromium (Debian's; scripts/setup.sh installs it)
//
// The one step that needs the harness is a conversation on stdin/stdout: this script prints
// `@@ kill-origin` and waits for the line `killed`, then `@@ start-origin` and waits for
// `started`. Every other stdout line is a log line. Exit 0 when every scenario held; on
// the first failure it saves failure.png, prints what the page showed and exits 1.

import { join } from 'node:path';

import { askHarness, check, Failure, logger, required, runInChromium } from './common.mjs';

const UI_URL = required('UI_URL', 'console.test.mjs');
const SHOTS = required('SCREENSHOT_DIR', 'console.test.mjs');
const WAIT = 20_000;
const say = logger('browser');

// ---- assertions --------------------------------------------------------------------------

/** Waits until `[data-testid=run]` has `data-status` = `status` (the page's verdict on the run). */
async function runStatus(page, status, timeout = WAIT) {
  try {
    await page.locator(`[data-testid="run"][data-status="${status}"]`).waitFor({ timeout });
  } catch {
    const now = await page.getByTestId('run').getAttribute('data-status');
    throw new Failure(`the run never showed status "${status}" within ${timeout} ms (it shows "${now}")`);
  }
}

async function connectionState(page, state, timeout = WAIT) {
  try {
    await page.locator(`[data-testid="connection-state"][data-state="${state}"]`).waitFor({ timeout });
  } catch {
    const now = await page.getByTestId('connection-state').textContent();
    throw new Failure(`the connection never showed "${state}" within ${timeout} ms (it shows "${now}")`);
  }
}

async function steps(page) {
  return page.getByTestId('step').evaluateAll((lis) => lis.map((li) => [li.dataset.step, li.dataset.status]));
}

/**
 * Waits until the steps list satisfies `ok`. The result (a callback) and the step states
 * (NoETL's events through the bridge, in bursts) travel separately, so the last step may
 * show up shortly after the result.
 */
async function stepsUntil(page, ok, what, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  let got = await steps(page);
  while (!ok(got) && Date.now() < deadline) {
    await page.waitForTimeout(100);
    got = await steps(page);
  }
  check(ok(got), `${what}, got ${JSON.stringify(got)}`);
  return got;
}

/** The result panel's JSON; a clear failure if it shows none. */
async function resultJson(page, what) {
  const text = await page.getByTestId('result').textContent();
  try {
    return JSON.parse(text);
  } catch {
    throw new Failure(`${what}: the result panel shows no JSON result (it shows ${JSON.stringify(text)})`);
  }
}

async function runPlaybook(page, path, workload) {
  await page.getByLabel('Playbook path').fill(path);
  await page.getByLabel('Workload (JSON)').fill(JSON.stringify(workload));
  await page.getByRole('button', { name: 'Run' }).click();
  say(`run ${path} ${JSON.stringify(workload)}`);
}

// ---- the scenarios -----------------------------------------------------------------------

async function logIn(page, email) {
  await page.goto(UI_URL);
  await page.locator('body[data-ready="true"]').waitFor({ timeout: WAIT });
  check(await page.getByRole('heading', { name: 'Log in as…' }).isVisible(), 'the "Log in as…" form is shown');
  await page.getByLabel('Email').fill(email);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByTestId('who').filter({ hasText: email }).waitFor({ timeout: WAIT })
    .catch(async () => {
      throw new Failure(`login did not show the user: ${await page.getByTestId('login-error').textContent()}`);
    });
  await connectionState(page, 'connected');
  const client = await page.getByTestId('client-id').textContent();
  check(/client [0-9a-f-]{36}/.test(client), `the init frame's client id is shown (got "${client}")`);
  say(`logged in as ${email}, stream connected (${client})`);
}

async function threeStepsAndTheResult(page) {
  await runPlaybook(page, 'demo/steps', { hello: 'browser' });
  await runStatus(page, 'completed');
  const want = JSON.stringify([['step_1', 'done'], ['step_2', 'done'], ['step_3', 'done']]);
  await stepsUntil(page, (got) => JSON.stringify(got) === want, 'demo/steps shows its three steps done');
  const result = await resultJson(page, 'demo/steps');
  check(result.steps === 3 && result.workload && result.workload.hello === 'browser',
    `demo/steps shows its result, got ${JSON.stringify(result)}`);
  check(/^\d+$/.test(await page.getByTestId('execution-id').textContent()), 'the execution id is shown');
  check(await page.getByTestId('progress').evaluate((p) => p.value) === 100, 'a finished run fills the progress bar');
  check(await page.getByTestId('run-error').isHidden(), 'no error is shown for a good run');
  await page.screenshot({ path: join(SHOTS, 'console.png'), fullPage: true });
  say('demo/steps: three steps and the result shown; screenshot console.png');
}

async function progressBar(page) {
  await runPlaybook(page, 'demo/progress', {});
  await runStatus(page, 'completed');
  const bar = page.getByRole('progressbar', { name: 'Progress' });
  check(await bar.evaluate((p) => p.value) === 100, 'demo/progress ends with a full progress bar');
  const text = await page.getByTestId('progress-text').textContent();
  check(text.includes('100%') && text.includes('stage_4'), `the progress message is shown, got "${text}"`);
  say(`demo/progress: progress bar at 100% ("${text}")`);
}

async function failureShowsTheError(page) {
  await runPlaybook(page, 'demo/fail', {});
  await runStatus(page, 'failed');
  const error = page.getByTestId('run-error');
  check(await error.isVisible(), 'demo/fail shows an error');
  const text = await error.textContent();
  check(text.includes('STEP_FAILED') && text.includes('fail_step'), `the error names its code and step, got "${text}"`);
  check(await page.getByRole('alert').filter({ hasText: 'STEP_FAILED' }).count() === 1, 'the error is an alert');
  check((await page.getByTestId('result').textContent()) === '', 'a failed run shows no result');
  await stepsUntil(page, (got) => got.some(([n, st]) => n === 'fail_step' && st === 'failed'), 'the failed step is marked');
  say(`demo/fail: error shown ("${text}")`);
}

async function forbiddenIsSaid(page) {
  await runPlaybook(page, 'admin/purge', {});
  await runStatus(page, 'forbidden');
  const msg = page.getByTestId('forbidden');
  check(await msg.isVisible(), 'admin/purge as a user shows the forbidden message');
  const text = await msg.textContent();
  check(/forbidden/i.test(text) && text.includes('admin/purge'), `the message says forbidden and names the playbook, got "${text}"`);
  check(await page.getByTestId('run-error').isHidden(), 'forbidden is not shown as a generic error');
  check((await steps(page)).length === 0 && (await page.getByTestId('execution-id').textContent()) === '—',
    'nothing ran');
  say(`admin/purge: "${text}"`);
}

async function ridesOutAnOriginRestart(page) {
  await runPlaybook(page, 'demo/slow', { seconds: 6 });
  await runStatus(page, 'running');
  const reconnectsBefore = Number(await page.getByTestId('connection-state').getAttribute('data-reconnects'));
  await askHarness('kill-origin', 'killed');
  say('origin killed');
  await connectionState(page, 'reconnecting', 15_000);
  // Keep the origin down until the browser has tried again (the edge answers each retry
  // with `stream/unavailable`, so EventSource keeps retrying by itself).
  await page.locator('[data-testid="connection-state"][data-state="reconnecting"]:not([data-attempt="1"])')
    .waitFor({ timeout: 15_000 })
    .catch(() => { throw new Failure('the page did not try to reconnect while the origin was down'); });
  say(`page shows "${await page.getByTestId('connection-state').textContent()}"`);
  await askHarness('start-origin', 'started');
  say('origin started again');
  await runStatus(page, 'completed', 40_000);
  await connectionState(page, 'connected');
  const reconnects = Number(await page.getByTestId('connection-state').getAttribute('data-reconnects'));
  check(reconnects > reconnectsBefore, `the page reconnected on its own (reconnects ${reconnectsBefore} → ${reconnects})`);
  const result = await resultJson(page, 'demo/slow after the restart');
  check(result.slept_seconds === 6, `demo/slow's result arrives after the restart, got ${JSON.stringify(result)}`);
  await stepsUntil(page, (got) => got.some(([n, st]) => n === 'sleep' && st === 'done'), 'the sleep step is shown done');
  await page.screenshot({ path: join(SHOTS, 'console-reconnected.png'), fullPage: true });
  say(`demo/slow: result shown after an origin restart (${await page.getByTestId('connection-state').textContent()})`);
}

// ---- main --------------------------------------------------------------------------------

await runInChromium({
  shots: SHOTS,
  failureShot: 'failure.png',
  onConsole: (m) => { if (m.type() === 'error') say(`page console: ${m.text()}`); },
  scenarios: async (page) => {
    await logIn(page, 'ada@example.com');
    await threeStepsAndTheResult(page);
    await progressBar(page);
    await failureShowsTheError(page);
    await forbiddenIsSaid(page);
    await ridesOutAnOriginRestart(page);
    say('all scenarios passed');
  },
  describe: async (page) => {
    const shown = await page.locator('main').innerText().catch(() => '(page unreadable)');
    const log = await page.getByTestId('event-log').evaluate((ol) => [...ol.children].map((li) => li.textContent).join('\n'))
      .catch(() => '');
    return `--- the page showed ---\n${shown}\n--- event log ---\n${log}`;
  },
});
