// Shared pieces of the k6 scripts: the environment knobs, the warm-up +
// main scenario pair, and the public API calls that seed data (an admin
// logs in through POST /v1/auth/login and creates products and deals through
// the gateway's admin routes; buyers sign up through POST /v1/auth/signup).
// Nothing here touches a database.
//
// Every request from k6 comes from one IP and each buyer is one user, so the
// gateway's per-IP and per-user limits (FLASHMESH_RATE_LIMIT_IP,
// FLASHMESH_RATE_LIMIT_USER; 200/s and 50/s by default) must be raised for a
// load run, or the scripts measure 429s.

import http from 'k6/http';
import { check, fail } from 'k6';

/** The gateway, e.g. `flashmesh up`'s. */
export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
/** Concurrent virtual users in the warm-up and in the main scenario. */
export const VUS = positiveInt('VUS', 10);
/** Length of the main scenario, the one thresholds and figures are about. */
export const DURATION = __ENV.DURATION || '30s';
/** Length of the warm-up scenario before it ("0s": none). */
export const WARMUP = __ENV.WARMUP || '5s';
/** An admin made with `flashmesh admin --email E` (password on stdin). */
export const ADMIN_EMAIL = __ENV.ADMIN_EMAIL || 'admin@example.com';
export const ADMIN_PASSWORD = __ENV.ADMIN_PASSWORD || 'flashmesh admin password';
/** The password of every user the scripts sign up. */
export const USER_PASSWORD = 'k6 load test password';

/** Accepts 2xx only: a 3xx is as wrong as a 4xx for this API. */
const ONLY_2XX = http.expectedStatuses({ min: 200, max: 299 });

export function positiveInt(name, fallback) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') {
    return fallback;
  }
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 1) {
    throw new Error(`${name} must be a positive integer, got ${JSON.stringify(raw)}`);
  }
  return value;
}

const DURATION_UNITS_MS = { ms: 1, s: 1000, m: 60000, h: 3600000 };

/** Milliseconds in a k6 duration such as "500ms", "5s", "1m30s". */
export function durationMs(text) {
  const value = String(text);
  if (!/^(\d+(\.\d+)?(ms|s|m|h))+$/.test(value)) {
    throw new Error(`not a duration: ${JSON.stringify(text)} (expected e.g. 500ms, 5s, 1m30s)`);
  }
  let total = 0;
  for (const [, amount, unit] of value.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h)/g)) {
    total += Number(amount) * DURATION_UNITS_MS[unit];
  }
  return total;
}

export const WARMUP_MS = durationMs(WARMUP);

/**
 * The scenarios of a script: a warm-up of WARMUP (same function, same VUs;
 * its requests carry scenario=warmup and count in no threshold), then
 * `main` (an executor config without startTime) right after it.
 */
export function scenarios(main) {
  const all = {};
  if (WARMUP_MS > 0) {
    all.warmup = {
      executor: 'constant-vus',
      vus: VUS,
      duration: WARMUP,
      exec: main.exec,
      // Cut short at the end so the warm-up never overlaps the main run.
      gracefulStop: '0s',
    };
  }
  all.main = { ...main, startTime: WARMUP_MS > 0 ? WARMUP : '0s' };
  return all;
}

/**
 * `iteration` as a scenario function whose exceptions count as a failed
 * check (and still end the iteration). A threshold on a metric with no
 * samples passes, so an iteration that threw before its checks would
 * otherwise leave `checks` empty and the run green.
 */
export function checkedIteration(iteration) {
  return (data) => {
    try {
      iteration(data);
    } catch (error) {
      check(error, { 'iteration ran to its end': () => false });
      throw error;
    }
  };
}

/**
 * Thresholds every HTTP script shares, on the main scenario only: under 1%
 * failed requests, every check passing at least 99% of the time, p(99) of
 * all requests under `p99Ms`, and at least one request made.
 */
export function httpThresholds(p99Ms) {
  return {
    'http_req_failed{scenario:main}': ['rate<0.01'],
    'http_req_duration{scenario:main}': [`p(99)<${p99Ms}`],
    'http_reqs{scenario:main}': ['count>0'],
    'checks{scenario:main}': ['rate>0.99'],
  };
}

function headers(token, extra) {
  const all = { 'content-type': 'application/json', ...extra };
  if (token) {
    all.authorization = `Bearer ${token}`;
  }
  return all;
}

/**
 * Request options: the bearer `token`, `extraHeaders`, `name` (the route
 * template, so ids do not split the metrics) and `op` (a short tag for
 * per-operation thresholds), and a `responseCallback` when some non-2xx
 * answers are expected.
 */
export function params({ token, name, op, extraHeaders, responseCallback } = {}) {
  const tags = {};
  if (name) {
    tags.name = name;
  }
  if (op) {
    tags.op = op;
  }
  return {
    headers: headers(token, extraHeaders),
    tags,
    responseCallback: responseCallback || ONLY_2XX,
  };
}

/** A request as `http.batch` takes it: JSON `payload` (if any) to BASE_URL + `path`. */
export function request(method, path, payload, options) {
  return [
    method,
    `${BASE_URL}${path}`,
    payload === undefined ? null : JSON.stringify(payload),
    params(options),
  ];
}

export function get(path, options) {
  return http.request(...request('GET', path, undefined, options));
}

export function post(path, payload, options) {
  return http.request(...request('POST', path, payload, options));
}

/** The JSON body of `response`, or null when it has none or is not JSON. */
export function body(response) {
  try {
    return response.json();
  } catch (_) {
    return null;
  }
}

/** Failed answers logged per VU at most, so a broken run does not flood the output. */
const MAX_LOGGED_FAILURES = 5;
let loggedFailures = 0;

/** What came back in `response` (HTTP, or gRPC from k6/net/grpc), for a log line. */
function answerText(response) {
  return response.body !== undefined
    ? `HTTP ${response.status} ${response.error || ''} ${String(response.body).slice(0, 500)}`
    : `gRPC status ${response.status} ${JSON.stringify(response.error)}`;
}

/** Logs what came back when `what` went wrong, the first few times in each VU. */
export function logFailure(what, response) {
  if (loggedFailures < MAX_LOGGED_FAILURES) {
    loggedFailures += 1;
    console.warn(`${what}: ${answerText(response)}`);
  }
}

/**
 * Checks `response` with `predicate` under `name`, logging the answer when
 * it fails (see logFailure). Returns whether it passed.
 */
export function expectAnswer(response, name, predicate) {
  const passed = check(response, { [name]: predicate });
  if (!passed) {
    logFailure(`check "${name}" failed`, response);
  }
  return passed;
}

/** Stops the run (in setup or teardown) with what the server said. */
function refuse(what, response) {
  fail(`${what}: ${answerText(response)}`);
}

/** The JSON body of a 200 answer; anything else stops the run. */
function expectOk(what, response) {
  const parsed = response.status === 200 ? body(response) : null;
  if (parsed === null) {
    refuse(what, response);
  }
  return parsed;
}

/** An email no other run or iteration uses. */
export function uniqueEmail(prefix) {
  return `${prefix}-${crypto.randomUUID()}@example.com`;
}

/** Logs in; returns the token pair. Stops the run if it fails. */
export function login(email, password) {
  return expectOk(
    `login of ${email}`,
    post('/v1/auth/login', { email, password }, { name: 'POST /v1/auth/login', op: 'login' }),
  ).tokens;
}

/** The admin's access token (ADMIN_EMAIL, ADMIN_PASSWORD). */
export function adminToken() {
  const response = post(
    '/v1/auth/login',
    { email: ADMIN_EMAIL, password: ADMIN_PASSWORD },
    { name: 'POST /v1/auth/login', op: 'admin_login' },
  );
  if (response.status !== 200) {
    refuse(
      `the admin ${ADMIN_EMAIL} cannot log in at ${BASE_URL} (create it with ` +
        '`flashmesh admin --email E`, then pass -e ADMIN_EMAIL=E -e ADMIN_PASSWORD=P)',
      response,
    );
  }
  return body(response).tokens.access_token;
}

export function createProduct(admin, name) {
  return expectOk(
    'CreateProduct',
    post(
      '/v1/products',
      { name, description: 'Seeded by a k6 script.', price_cents: 12900 },
      { token: admin, name: 'POST /v1/products', op: 'create_product' },
    ),
  ).product;
}

/**
 * A deal on a new product: `stock` units, at most `perUserLimit` per buyer,
 * open from `startsAtMs` (epoch ms; in the past means open now) for
 * `openForMs`.
 */
export function createDeal(admin, { name, stock, perUserLimit, startsAtMs, openForMs }) {
  const product = createProduct(admin, name);
  return expectOk(
    'CreateDeal',
    post(
      '/v1/deals',
      {
        product_id: product.id,
        price_cents: 9900,
        stock,
        per_user_limit: perUserLimit,
        starts_at: new Date(startsAtMs).toISOString(),
        ends_at: new Date(startsAtMs + openForMs).toISOString(),
      },
      { token: admin, name: 'POST /v1/deals', op: 'create_deal' },
    ),
  ).deal;
}

/** A deal that is open now and for a day. */
export function createOpenDeal(admin, name, stock, perUserLimit) {
  return createDeal(admin, {
    name,
    stock,
    perUserLimit,
    startsAtMs: Date.now() - 1000,
    openForMs: 24 * 3600 * 1000,
  });
}

/** Signing up hashes a password, so they go in parallel batches. */
const SIGNUP_BATCH = 16;

/**
 * Signs up `count` new users, `SIGNUP_BATCH` at a time; returns
 * `[{ email, token }]` with each one's access token (valid for
 * FLASHMESH_ACCESS_TOKEN_TTL, 15 minutes by default).
 */
export function signUpUsers(count, prefix) {
  const users = [];
  while (users.length < count) {
    const batch = Math.min(SIGNUP_BATCH, count - users.length);
    const emails = Array.from({ length: batch }, () => uniqueEmail(prefix));
    const responses = http.batch(
      emails.map((email) =>
        request(
          'POST',
          '/v1/auth/signup',
          { email, password: USER_PASSWORD },
          { name: 'POST /v1/auth/signup', op: 'signup' },
        ),
      ),
    );
    responses.forEach((response, i) => {
      const signedUp = expectOk(`sign-up of ${emails[i]}`, response);
      users.push({ email: emails[i], token: signedUp.tokens.access_token });
    });
  }
  return users;
}

/**
 * An order for one unit of `dealId` with a fresh Idempotency-Key, as a
 * request for `http.request` or `http.batch`.
 */
export function orderRequest(token, dealId, responseCallback) {
  return request(
    'POST',
    '/v1/orders',
    { deal_id: dealId, quantity: 1 },
    {
      token,
      name: 'POST /v1/orders',
      op: 'place_order',
      extraHeaders: { 'idempotency-key': crypto.randomUUID() },
      responseCallback,
    },
  );
}

/** One order per user in `users` for `dealId`, in parallel; returns their ids. */
export function placeOrders(users, dealId) {
  const responses = http.batch(users.map((user) => orderRequest(user.token, dealId)));
  return responses.map((response) => expectOk('PlaceOrder', response).order.id);
}

/** One of `items`, at random. */
export function pick(items) {
  return items[Math.floor(Math.random() * items.length)];
}
