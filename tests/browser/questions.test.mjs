// The demo console's Questions card (issue 15, "Must show": the browser test answers a
// question in the demo console) in headless Chromium, against the real stack behind the
// edge with the demo service registered as `demo`. Run by tests/tests/browser.rs
// (`the_demo_console_answers_a_question`), with UI_URL, SCREENSHOT_DIR and CHROMIUM as for
// console.test.mjs.
//
// The page asks the demo service to ask it a question ("Ask me": `POST /api/v1/demo/ask`
// through the edge), the question arrives as a `question` frame and shows as a card, the
// script answers it in the card, and the card turns answered. Then it prints
// `@@ answered <question_id> <answer>` and waits for `ok`: the harness checks that the demo
// service received exactly that answer from this user (`GET /answers/<question_id>`). A
// question left unanswered turns expired on its `question/expired` frame, and the script
// asks with `@@ expired <question_id>` for the harness to check the service was told.

import { join } from 'node:path';

import { askHarness, check, Failure, logger, required, runInChromium } from './common.mjs';

const UI_URL = required('UI_URL', 'questions.test.mjs');
const SHOTS = required('SCREENSHOT_DIR', 'questions.test.mjs');
/** Who answers; browser.rs checks the demo service got the answer from this user. */
const EMAIL = 'hitl@example.com';
const WAIT = 20_000;
const say = logger('browser');

async function logIn(page) {
  await page.goto(UI_URL);
  await page.locator('body[data-ready="true"]').waitFor({ timeout: WAIT });
  await page.getByLabel('Email').fill(EMAIL);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.locator('[data-testid="connection-state"][data-state="connected"]').waitFor({ timeout: WAIT })
    .catch(async () => {
      throw new Failure(`the stream never connected after login: ${await page.getByTestId('login-error').textContent()}`);
    });
  check(await page.getByTestId('ask-button').isEnabled(), 'Ask me is enabled once logged in');
  say(`logged in as ${EMAIL} (${await page.getByTestId('client-id').textContent()})`);
}

/** Asks through the "Ask me" form; the question's card once it arrived (its frame). */
async function askMe(page, prompt, options, timeoutSeconds = 300) {
  await page.getByLabel('Question for this page').fill(prompt);
  await page.getByLabel(/^Options/).fill(options);
  await page.getByLabel('Expires after (seconds)').fill(String(timeoutSeconds));
  await page.getByRole('button', { name: 'Ask me' }).click();
  const card = page.getByTestId('question').filter({ hasText: prompt });
  await card.waitFor({ timeout: WAIT }).catch(async () => {
    const err = page.getByTestId('ask-error');
    const why = await err.isVisible() ? await err.textContent() : 'no question frame arrived';
    throw new Failure(`the question "${prompt}" was not shown: ${why}`);
  });
  const id = await card.getAttribute('data-question-id');
  check(/^q-[0-9a-f]{32}$/.test(id || ''), `the card names its question id (got ${id})`);
  check(await card.getAttribute('data-status') === 'pending', 'a new question is pending');
  say(`question ${id} shown: "${prompt}"`);
  return { card, id };
}

async function answered(page, card, id, answer) {
  await page.locator(`[data-testid="question"][data-question-id="${id}"][data-status="answered"]`)
    .waitFor({ timeout: WAIT })
    .catch(async () => {
      throw new Failure(`question ${id} never showed answered (it shows "${await card.getAttribute('data-status')}": `
        + `${await card.getByTestId('question-status').textContent()})`);
    });
  const status = await card.getByTestId('question-status').textContent();
  check(status.includes(`answered: ${answer}`), `the card says what was answered (got "${status}")`);
  check(await card.getByTestId('question-option').count() === 0, 'an answered question offers no buttons');
  await askHarness(`answered ${id} ${answer}`, 'ok');
  say(`question ${id}: the demo service got "${answer}" from ${EMAIL}`);
}

async function answerWithAnOption(page) {
  const { card, id } = await askMe(page, 'Ship release 1.2?', 'ship, hold');
  const buttons = await card.getByTestId('question-option').allTextContents();
  check(JSON.stringify(buttons) === JSON.stringify(['ship', 'hold']), `one button per option (got ${JSON.stringify(buttons)})`);
  await page.screenshot({ path: join(SHOTS, 'questions.png'), fullPage: true });
  await card.getByRole('button', { name: 'ship' }).click();
  await answered(page, card, id, 'ship');
}

async function answerInFreeText(page) {
  const { card, id } = await askMe(page, 'When should it go out?', '');
  check(await card.getByTestId('question-option').count() === 0, 'a question without options has no option buttons');
  await card.getByTestId('question-text').fill('after-lunch');
  await card.getByTestId('question-send').click();
  await answered(page, card, id, 'after-lunch');
}

async function anUnansweredQuestionExpires(page) {
  const { card, id } = await askMe(page, 'Still there?', 'yes', 2);
  await page.locator(`[data-testid="question"][data-question-id="${id}"][data-status="expired"]`)
    .waitFor({ timeout: WAIT })
    .catch(async () => {
      throw new Failure(`question ${id} never showed expired (it shows "${await card.getAttribute('data-status')}")`);
    });
  check(await card.getByTestId('question-option').count() === 0, 'an expired question offers no buttons');
  await askHarness(`expired ${id}`, 'ok');
  say(`question ${id} expired unanswered; the demo service was told`);
}

await runInChromium({
  shots: SHOTS,
  failureShot: 'questions-failure.png',
  onConsole: (m) => { if (m.type() === 'error') say(`page console: ${m.text()}`); },
  scenarios: async (page) => {
    await logIn(page);
    await answerWithAnOption(page);
    await answerInFreeText(page);
    await anUnansweredQuestionExpires(page);
    say('all scenarios passed');
  },
  describe: async (page) => {
    const shown = await page.locator('main').innerText().catch(() => '(page unreadable)');
    const log = await page.getByTestId('event-log').evaluate((ol) => [...ol.children].map((li) => li.textContent).join('\n'))
      .catch(() => '');
    return `--- the page showed ---\n${shown}\n--- event log ---\n${log}`;
  },
});
