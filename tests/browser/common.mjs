// What the browser scripts share (console.test.mjs, eventsource.test.mjs): their settings
// from the environment, the Chromium flags, a timestamped log, the stdin/stdout
// conversation with tests/tests/browser.rs, failures, and the run in a throwaway profile
// that saves a screenshot and exits 1 on the first failure.

import { chromium } from 'playwright-core';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

/** Debian's Chromium unless CHROMIUM says otherwise (scripts/setup.sh installs it). */
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

// The flags ../shared/toolchain.md asks for: without the background-networking ones
// Chromium keeps trying to reach the internet.
export const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

/** The environment variable `name`; exits 2 when unset (`script` names the caller). */
export function required(name, script) {
  const v = process.env[name];
  if (!v) {
    console.error(`${script}: ${name} is not set (run it through tests/tests/browser.rs)`);
    process.exit(2);
  }
  return v;
}

/** A log function whose lines say `[tag +seconds]`. */
export function logger(tag) {
  const started = Date.now();
  return (line) => console.log(`[${tag} +${((Date.now() - started) / 1000).toFixed(1)}s] ${line}`);
}

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/**
 * Asks the harness for `request` (a `@@ request` line on stdout) and waits for its answer
 * on stdin, which must start with `answer`; returns the whole answer.
 */
export async function askHarness(request, answer) {
  console.log(`@@ ${request}`);
  const { value, done } = await stdinLines.next();
  if (done || !value.trim().startsWith(answer)) {
    throw new Error(`asked the harness to ${request}; it answered ${JSON.stringify(value)}`);
  }
  return value.trim();
}

/** A failed expectation (reported without a stack). */
export class Failure extends Error {}

/** Throws a [`Failure`] with `message` unless `cond`. */
export function check(cond, message) {
  if (!cond) throw new Failure(message);
}

/**
 * Runs `scenarios(page)` in headless Chromium with a throwaway profile, then exits: 0 when
 * it returned and the page threw nothing, else 1 after saving `failureShot` (in `shots`)
 * and printing `describe(page)` (what the page showed).
 */
export async function runInChromium({ shots, failureShot, scenarios, describe, onConsole }) {
  mkdirSync(shots, { recursive: true });
  const profile = mkdtempSync(join(tmpdir(), 'gw-chromium-'));
  let context;
  let page;
  let code = 0;
  const pageErrors = [];
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: FLAGS,
      viewport: { width: 1120, height: 720 },
      timeout: 30_000,
    });
    page = context.pages()[0] || await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(e.message));
    if (onConsole) page.on('console', onConsole);
    await scenarios(page);
    check(pageErrors.length === 0, `the page threw: ${pageErrors.join(' | ')}`);
  } catch (e) {
    code = 1;
    console.error(`\nBROWSER TEST FAILED: ${e instanceof Failure ? e.message : e.stack || e}`);
    if (pageErrors.length) console.error(`page errors: ${pageErrors.join(' | ')}`);
    if (page) {
      const shot = join(shots, failureShot);
      await page.screenshot({ path: shot, fullPage: true }).catch(() => {});
      const shown = await describe(page).catch(() => '(page unreadable)');
      console.error(`${shown}\n(screenshot ${shot})`);
    }
  } finally {
    if (context) await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
  process.exit(code);
}
