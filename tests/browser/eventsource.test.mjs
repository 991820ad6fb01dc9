// A plain `new EventSource(url)` in headless Chromium — no reconnect code of its own — rides
// out an origin restart through the edge and gets the result produced meanwhile, exactly
// once (issue 13, "Must show"). Run by tests/tests/browser.rs (the second test there), which
// starts nats-server, the stand-in, the origin, `wrangler dev` and the page's server, then
// runs this with UI_URL, SCREENSHOT_DIR and CHROMIUM as console.test.mjs has them.
//
// The page is tests/fixtures/gateway_ui/native.html: one EventSource, nothing else. Two
// scenarios, the same steps: the stream's URL names no client (the server assigns one), or
// names a new client id the page chose itself.
//   1. open the stream, start `demo/slow` (a minute: the stand-in will not call back during
//      the test) for the stream's client;
//   2. the harness kills the origin: the browser's stream breaks and EventSource retries by
//      itself; while the origin is down the edge answers its retries with `stream/unavailable`
//      (200), so it keeps retrying instead of giving up;
//   3. the harness starts the origin again and, at once, posts the run's result callback (as
//      NoETL would): the result is stored while the browser is away;
//   4. the browser's own next retry (same URL, Last-Event-ID) resumes the same client and the
//      result arrives, once;
//   5. the origin is restarted once more and a second run's result is awaited: the first
//      result is not replayed again.
//
// Harness conversation (stdin/stdout): `@@ kill-origin` → `killed`;
// `@@ start-origin-and-call-back <request_id> <execution_id>` → `started <status>`;
// `@@ restart-origin` → `restarted`. Every other stdout line is a log line. Exit 0 when both
// scenarios held; on the first failure it saves failure.png, prints the frames and exits 1.

import { join } from 'node:path';

import { askHarness, check, logger, required, runInChromium } from './common.mjs';

const UI_URL = required('UI_URL', 'eventsource.test.mjs');
const SHOTS = required('SCREENSHOT_DIR', 'eventsource.test.mjs');
const WAIT = 30_000;
const CLOSED = 2;
const say = logger('native');

const frames = (page) => page.evaluate(() => window.nativeStream.state.frames);
const counts = (page) => page.evaluate(() => ({
  opens: window.nativeStream.state.opens,
  errors: window.nativeStream.state.errors,
  readyState: window.nativeStream.readyState(),
}));

/** Polls the page's frames until `pick` finds something; what it found. */
async function frameWhere(page, pick, what, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const found = pick(await frames(page));
    if (found) return found;
    const c = await counts(page);
    check(c.readyState !== CLOSED, `the EventSource gave up (CLOSED) while waiting for ${what}`);
    check(Date.now() < deadline, `${what} not within ${timeout} ms (connection ${c.opens}, readyState ${c.readyState})`);
    await page.waitForTimeout(100);
  }
}

const results = (fs, requestId) => fs.filter((f) => f.name === 'playbook/result' && f.data.params.requestId === requestId);
const inits = (fs) => fs.filter((f) => f.name === 'message' && f.data.result);

async function run(page, path, workload, clientId) {
  const ex = await page.evaluate(([p, w, c]) => window.nativeStream.execute(p, w, c), [path, workload, clientId]);
  check(ex && ex.requestId && ex.executionId, `${path} started: ${JSON.stringify(ex)}`);
  return ex;
}

async function scenario(page, label, chooseId) {
  const chosen = chooseId ? await page.evaluate(() => crypto.randomUUID()) : null;
  const url = await page.evaluate((c) => window.nativeStream.open(c), chosen);
  say(`${label}: new EventSource(${url})`);
  const init = await frameWhere(page, (fs) => inits(fs)[0], 'the init frame');
  const clientId = init.data.result.clientId;
  if (chosen) check(clientId === chosen, `the page's own id is the stream's client (got ${clientId}, chose ${chosen})`);
  check(init.id === `${clientId}.0`, `the init frame's id names the client (got "${init.id}")`);
  const slow = await run(page, 'demo/slow', { seconds: 60 }, clientId);
  say(`${label}: client ${clientId}; demo/slow running (request ${slow.requestId})`);

  const before = await counts(page);
  await askHarness('kill-origin', 'killed');
  say(`${label}: origin killed`);
  // The browser retries by itself; the edge answers each retry while the origin is down
  // with `stream/unavailable`, and EventSource stays CONNECTING (not CLOSED).
  const outage = await frameWhere(
    page,
    (fs) => fs.find((f) => f.name === 'stream/unavailable' && f.connection > before.opens),
    'an edge answer while the origin is down',
  );
  const during = await counts(page);
  check(during.readyState !== CLOSED, 'EventSource is still retrying during the outage');
  check(outage.id.startsWith(`${clientId}.`),
    `the browser keeps its Last-Event-ID through the outage (it holds "${outage.id}")`);
  say(`${label}: the edge said ${outage.data.params.code}; EventSource retrying (${during.errors} errors so far)`);

  const answer = await askHarness(`start-origin-and-call-back ${slow.requestId} ${slow.executionId}`, 'started');
  say(`${label}: origin started again; result callback answered "${answer.slice('started '.length)}"`);
  const result = await frameWhere(page, (fs) => results(fs, slow.requestId)[0], 'the result after the restart');
  check(result.data.params.status === 'COMPLETED', `the result completed: ${JSON.stringify(result.data)}`);
  check(result.connection > during.opens, `the result came on a later connection (${result.connection} > ${during.opens})`);
  const all = await frames(page);
  const resumed = inits(all).filter((f) => f.connection === result.connection);
  check(resumed.length === 1 && resumed[0].data.result.clientId === clientId,
    `the reconnect resumed the same client: ${JSON.stringify(resumed.map((f) => f.data.result.clientId))}`);
  check(!all.some((f) => f.name === 'stream/reset'), 'an exact resume: no stream/reset');
  say(`${label}: the result arrived on the browser's own reconnect #${result.connection} (Last-Event-ID resumed ${clientId})`);

  // Exactly once: another restart, and a marker run whose result comes after anything the
  // resumed stream would replay.
  const beforeRestart = await counts(page);
  await askHarness('restart-origin', 'restarted');
  await frameWhere(page, (fs) => inits(fs).find((f) => f.connection > beforeRestart.opens), 'the stream back after the second restart');
  const marker = await run(page, 'demo/echo', { marker: label }, clientId);
  await frameWhere(page, (fs) => results(fs, marker.requestId)[0], 'the marker run result');
  const after = await frames(page);
  check(results(after, slow.requestId).length === 1,
    `the result came exactly once, got ${results(after, slow.requestId).length}`);
  check(inits(after).every((f) => f.data.result.clientId === clientId), 'every connection was the same client');
  check(await page.evaluate(() => window.nativeStream.readyState()) !== CLOSED, 'EventSource never gave up');
  const c = await counts(page);
  say(`${label}: once, across ${c.opens} connections of one client (${c.errors} errors the browser rode out)`);
  await page.screenshot({ path: join(SHOTS, `eventsource-${chooseId ? 'chosen' : 'assigned'}.png`), fullPage: true });
  await page.evaluate(() => window.nativeStream.close());
}

await runInChromium({
  shots: SHOTS,
  failureShot: 'eventsource-failure.png',
  scenarios: async (page) => {
    await page.goto(new URL('native.html', UI_URL).toString());
    await page.locator('body[data-ready="true"]').waitFor({ timeout: WAIT });
    const user = await page.evaluate((email) => window.nativeStream.login(email), 'grace@example.com');
    say(`logged in as ${user.email}`);
    await scenario(page, 'server-assigned client', false);
    await scenario(page, 'page-chosen client id', true);
    say('both scenarios passed');
  },
  describe: async (page) => {
    const fs = await frames(page).catch(() => []);
    return `--- frames ---\n${fs.map((f) => `#${f.connection} ${f.name} ${f.id} ${JSON.stringify(f.data).slice(0, 160)}`).join('\n')}`;
  },
});
