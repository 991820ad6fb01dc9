// Type declarations for gateway.js, the NoETL edge gateway's browser client.
// The shapes follow docs/openapi.json (REST) and docs/schema.graphql (GraphQL).

/** The executePlaybook mutation the client sends. */
export const EXECUTE_PLAYBOOK: string;

/** The SSE event names the gateway sends (PROTOCOL.md §3). */
export const EVENTS: readonly EventName[];

/** An SSE event name. */
export type EventName =
  | 'message'
  | 'ping'
  | 'playbook/state'
  | 'playbook/progress'
  | 'playbook/result'
  | 'stream/reset'
  | 'stream/evicted'
  | 'stream/unavailable'
  | 'question'
  | 'question/answered'
  | 'question/expired'
  | 'service/event';

/** An error the gateway answered: `code` is its machine code (or GraphQL `extensions.code`). */
export class GatewayError extends Error {
  constructor(code: string, message: string, status?: number);
  /** `{"error":{"code"}}` of the answer, `http_<status>`, `network`, or a GraphQL code. */
  readonly code: string;
  /** The HTTP status (0 when no answer arrived). */
  readonly status: number;
}

/**
 * The edge URL to use from a page: `configured`, except that a loopback edge is reached
 * under the same loopback name as the page (so the session cookie goes along).
 */
export function resolveEdgeUrl(configured: string, page?: { hostname: string } | null): string;

/** A user as the gateway reports it. */
export interface User {
  user_id: string;
  email: string;
  display_name: string;
  roles: string[];
}

/** `POST /api/auth/login` → 200. */
export interface LoginResponse {
  status: 'authenticated';
  session_token: string;
  user: User;
  /** RFC 3339. */
  expires_at: string;
  message: string;
}

/** `POST /api/auth/validate` → 200. */
export interface ValidateResponse {
  valid: true;
  user: User;
  expires_at: string;
  message: string;
}

/** The session the client holds after `login`. */
export interface Session {
  token: string;
  user: User;
  expiresAt: string;
}

/** A GraphQL response. */
export interface GraphqlResponse<T = Record<string, unknown>> {
  data?: T | null;
  errors?: Array<{ message: string; path?: Array<string | number>; extensions?: { code?: string } & Record<string, unknown> }>;
}

/** What executePlaybook returns (compat field names). */
export interface ExecuteResult {
  id: string;
  executionId: string;
  requestId: string | null;
  name: string | null;
  status: string | null;
}

/**
 * A question a service asks one client (human-in-the-loop): the params of a `question`
 * frame, and an entry of the init frame's `result.pendingQuestions`.
 */
export interface Question {
  /** `q-` and 32 hex characters. */
  question_id: string;
  prompt: string;
  /** The answers it accepts; empty: any text. */
  options: string[];
  /** RFC 3339: when the question expires unanswered (a `question/expired` frame follows). */
  expires_at: string;
  /** The registered service that asked. */
  service: string;
  /** The client it was asked of; null for a question to all of the user's clients. */
  client_id: string | null;
}

/** The data of a `question` frame. */
export interface QuestionFrame {
  jsonrpc: '2.0';
  method: 'question';
  params: Question;
}

/** The data of a `question/answered` frame: the question is closed with `answer`. */
export interface QuestionAnsweredFrame {
  jsonrpc: '2.0';
  method: 'question/answered';
  params: { question_id: string; answer: string };
}

/** The data of a `question/expired` frame: the question closed unanswered. */
export interface QuestionExpiredFrame {
  jsonrpc: '2.0';
  method: 'question/expired';
  params: { question_id: string };
}

/** The data of a `service/event` frame: an event a registered service sent this client. */
export interface ServiceEventFrame {
  jsonrpc: '2.0';
  method: 'service/event';
  params: { service: string; event: string; data: unknown };
}

/** `POST /api/v1/events/{client_id}/response` → 200. */
export interface AnswerResponse {
  question_id: string;
  status: 'answered';
}

/** Options of a Gateway. */
export interface GatewayOptions {
  /** Store the session token as the `session_token` cookie on login (default: in a browser). */
  cookie?: boolean;
  /** The fetch to use (default: the global one). */
  fetch?: typeof fetch;
}

/** Calls to the edge with the session of the logged-in user. */
export class Gateway {
  constructor(edgeUrl: string, options?: GatewayOptions);
  /** The edge's origin, without a trailing slash. */
  readonly edgeUrl: string;
  /** The logged-in session, or null. */
  session: Session | null;
  /** Whether login stores the session cookie. */
  readonly cookie: boolean;
  /** One call to the edge: the parsed JSON answer; rejects with a GatewayError. */
  request<T = unknown>(path: string, init?: { method?: string; body?: unknown }): Promise<T>;
  /** `POST /api/auth/login` with an ID token (`auth0_token`); keeps the session. */
  login(idToken: string): Promise<LoginResponse>;
  /** `POST /api/auth/validate` for the current session (or `token`). */
  validate(token?: string | null): Promise<ValidateResponse>;
  /** `POST /api/auth/logout`, then forgets the session (and its cookie). */
  logout(): Promise<void>;
  /** `POST /api/events/ticket`: a 30-second, single-use ticket for `eventsUrl`. */
  ticket(): Promise<string>;
  /** `POST /graphql`: the whole reply. */
  graphql<T = Record<string, unknown>>(query: string, variables?: Record<string, unknown>): Promise<GraphqlResponse<T>>;
  /** Runs the playbook at `path` for `clientId` (its frames come on that client's stream). */
  executePlaybook(path: string, workload?: unknown, clientId?: string | null): Promise<ExecuteResult>;
  /**
   * `POST /api/v1/events/{clientId}/response` `{question_id, answer}`: answers a question
   * asked of `clientId`; rejects with a GatewayError `question_not_found` (404),
   * `question_closed` (409) or `invalid_answer` (400).
   */
  answerQuestion(clientId: string, questionId: string, answer: string): Promise<AnswerResponse>;
  /** The `/events` URL for a (re)connection. */
  eventsUrl(clientId?: string | null, lastEventId?: string | null, options?: { ticket?: string }): string;
}

/** A connection state an EventStream reports. */
export type StreamState = 'connecting' | 'connected' | 'reconnecting' | 'offline' | 'signed-out';

/** Handlers of an EventStream. */
export interface EventStreamHandlers {
  /** The connection's state; `info` has `attempt`, `clientId`, `reconnects` as they apply. */
  onState?: (state: StreamState, info: { attempt?: number; clientId?: string; reconnects?: number }) => void;
  /** One frame: its event name, its parsed JSON data, and its id (null for frames without one). */
  onFrame?: (event: EventName, data: any, id: string | null) => void;
}

/**
 * The SSE stream of one client, kept open by the browser's own EventSource; a reconnection
 * resumes with `Last-Event-ID` and loses nothing (PROTOCOL.md §3).
 */
export class EventStream {
  constructor(gateway: Gateway, handlers?: EventStreamHandlers);
  /** The client id, once the init frame named it. */
  readonly clientId: string | null;
  /** The id of the last frame received. */
  readonly lastEventId: string | null;
  /** Successful reconnections since `start`. */
  readonly reconnects: number;
  /** Consecutive failed attempts. */
  readonly failures: number;
  /**
   * The questions open for this client: the init frame's `pendingQuestions`, plus each
   * `question` frame, less each `question/answered` and `question/expired`.
   */
  readonly pendingQuestions: readonly Question[];
  /** Opens the stream as a new client. */
  start(): void;
  /** Closes it; reports `state` (default `offline`). */
  stop(state?: StreamState): void;
  /** Resolves with the client id once the init frame has named it. */
  clientReady(timeoutMs?: number): Promise<string>;
}
