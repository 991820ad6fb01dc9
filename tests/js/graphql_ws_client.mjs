// The `graphql-ws` npm client (what Apollo Client and urql use) subscribing to one run's
// `executionEvents`, as a browser app would: the token only in `connectionParams` (a
// browser cannot put headers on a WebSocket upgrade), Node 22's global WebSocket.
//
// Usage: GW_SESSION_TOKEN=… node graphql_ws_client.mjs <ws-url> <execution-id>
// Prints one JSON line per event received, stops after the terminal one (exit 0).
// A refused socket, a GraphQL error or no terminal event within 60 s: a line on stderr
// and a non-zero exit. Run by tests/tests/edge.rs.
import { createClient } from 'graphql-ws';

const [url, executionId] = process.argv.slice(2);
const token = process.env.GW_SESSION_TOKEN;
if (!url || !executionId || !token) {
  console.error('usage: GW_SESSION_TOKEN=… node graphql_ws_client.mjs <ws-url> <execution-id>');
  process.exit(64);
}

const query = `subscription($id: ID!) {
  executionEvents(executionId: $id) { executionId eventType stepName status at terminal } }`;

const client = createClient({
  url,
  webSocketImpl: WebSocket,
  connectionParams: { session_token: token },
  retryAttempts: 0,
});

const describe = (e) =>
  e instanceof Error ? e.message : e && 'code' in e ? `closed ${e.code} ${e.reason}` : JSON.stringify(e);

const timer = setTimeout(() => {
  console.error('no terminal event within 60 s');
  process.exit(3);
}, 60_000);

let terminal = false;
try {
  for await (const result of client.iterate({ query, variables: { id: executionId } })) {
    if (result.errors) {
      console.error(`graphql errors: ${JSON.stringify(result.errors)}`);
      break;
    }
    const event = result.data.executionEvents;
    console.log(JSON.stringify(event));
    if (event.terminal) {
      terminal = true;
      break;
    }
  }
} catch (e) {
  console.error(`subscription failed: ${describe(e)}`);
} finally {
  clearTimeout(timer);
  await client.dispose();
}
process.exit(terminal ? 0 : 1);
