// A page using the client, as its types allow: `tsc -p clients/js` (tests/tests/contracts.rs)
// fails when gateway.d.ts stops describing this usage. Never run; only type-checked.

import {
  EVENTS,
  EventStream,
  Gateway,
  GatewayError,
  resolveEdgeUrl,
  type EventName,
  type ExecuteResult,
  type LoginResponse,
  type AnswerResponse,
  type Question,
  type QuestionFrame,
  type StreamState,
} from './gateway.js';

export async function example(idToken: string): Promise<void> {
  const gw = new Gateway(resolveEdgeUrl('https://gateway.example.com', location), { cookie: true });
  const login: LoginResponse = await gw.login(idToken);
  const roles: string[] = login.user.roles;
  const valid = await gw.validate();
  const stillValid: true = valid.valid;

  const states: StreamState[] = [];
  const stream = new EventStream(gw, {
    onState: (state, info) => {
      states.push(state);
      if (info.clientId) console.log(info.clientId, info.reconnects ?? 0);
    },
    onFrame: (event: EventName, data, id) => {
      if (event === 'playbook/result') console.log(id, data);
      if (event === 'question') {
        const q: Question = (data as QuestionFrame).params;
        console.log(q.prompt, q.options.join('/'), q.expires_at, q.client_id ?? 'all clients');
      }
    },
  });
  stream.start();
  const clientId: string = await stream.clientReady(5000);

  const open: readonly Question[] = stream.pendingQuestions;
  for (const q of open) {
    const answer: string = q.options[0] ?? 'ok';
    try {
      const done: AnswerResponse = await gw.answerQuestion(clientId, q.question_id, answer);
      const status: 'answered' = done.status;
      console.log(status);
    } catch (e) {
      if (e instanceof GatewayError && e.code === 'question_closed') continue;
      throw e;
    }
  }

  const run: ExecuteResult = await gw.executePlaybook('catalog/demo', { n: 1 }, clientId);
  const me = await gw.graphql<{ me: { userId: string } }>('{ me { userId } }');
  const userId: string | undefined = me.data?.me.userId;

  const ticket: string = await gw.ticket();
  const url: string = gw.eventsUrl(null, null, { ticket });
  const names: readonly EventName[] = EVENTS;

  try {
    await gw.logout();
  } catch (e) {
    if (e instanceof GatewayError) console.log(e.code, e.status);
  }
  stream.stop('signed-out');
  console.log(roles, stillValid, run.executionId, userId, url, names, states, stream.lastEventId);
}
