// Journey, the headline scenario: a buyer's whole order path through the
// gateway. Each VU logs in as its buyer (POST /v1/auth/login, once, and again
// before the access token expires), then each iteration browses the open
// deals (GET /v1/deals), reads the deal (GET /v1/deals/{id}), places an
// order for one unit with a fresh Idempotency-Key (POST /v1/orders: the
// order service's claim → the catalog's ReserveStock → the commit) and reads
// it back (GET /v1/orders/{id}).
//
// Seeds (setup, through the public API): one open deal whose stock
// (JOURNEY_STOCK, 10,000,000, the most a deal may have; every buyer may take
// all of it) never runs out during a run, and JOURNEY_USERS (default VUS)
// buyers signed up; VU n is buyer n mod JOURNEY_USERS.
//
// Metric: Counter journey_orders, orders placed.
// Thresholds (main scenario): < 1% failed requests, > 99% checks passed,
// p(99) < 1500 ms over all requests and for POST /v1/orders alone, and
// at least one order placed.
//
// Env: BASE_URL, VUS, DURATION, WARMUP, ADMIN_EMAIL, ADMIN_PASSWORD,
// JOURNEY_STOCK, JOURNEY_USERS. Raise the gateway's FLASHMESH_RATE_LIMIT_IP
// and FLASHMESH_RATE_LIMIT_USER for a load run (each VU is one user).

import http from 'k6/http';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';
import {
  DURATION,
  USER_PASSWORD,
  VUS,
  adminToken,
  body,
  checkedIteration,
  createOpenDeal,
  expectAnswer,
  get,
  httpThresholds,
  login,
  orderRequest,
  positiveInt,
  scenarios,
  signUpUsers,
} from './lib/flashmesh.js';

const STOCK = positiveInt('JOURNEY_STOCK', 10000000);
const USERS = positiveInt('JOURNEY_USERS', VUS);
/** Log in again when the access token has less than this left. */
const RENEW_BEFORE_MS = 60000;

const ordersPlaced = new Counter('journey_orders');

export const options = {
  scenarios: scenarios({ executor: 'constant-vus', vus: VUS, duration: DURATION, exec: 'journey' }),
  thresholds: {
    ...httpThresholds(1500),
    'http_req_duration{scenario:main,op:place_order}': ['p(99)<1500'],
    'journey_orders{scenario:main}': ['count>0'],
  },
  setupTimeout: '5m',
};

export function setup() {
  const admin = adminToken();
  const deal = createOpenDeal(admin, 'k6 journey product', STOCK, STOCK);
  return { dealId: deal.id, emails: signUpUsers(USERS, 'k6-journey').map((user) => user.email) };
}

/** This VU's login: { accessToken, expiresAtMs }. */
let session = null;

function accessToken(data) {
  if (session === null || session.expiresAtMs - Date.now() < RENEW_BEFORE_MS) {
    const email = data.emails[(exec.vu.idInTest - 1) % data.emails.length];
    const tokens = login(email, USER_PASSWORD);
    session = {
      accessToken: tokens.access_token,
      expiresAtMs: Date.parse(tokens.access_token_expires_at),
    };
  }
  return session.accessToken;
}

export const journey = checkedIteration((data) => {
  const token = accessToken(data);

  const deals = get('/v1/deals?states=DEAL_STATE_ACTIVE&page_size=20', {
    name: 'GET /v1/deals',
    op: 'list_deals',
  });
  expectAnswer(deals, 'deals listed', (r) => r.status === 200 && (body(r)?.deals?.length ?? 0) > 0);

  const deal = get(`/v1/deals/${data.dealId}`, { name: 'GET /v1/deals/{id}', op: 'get_deal' });
  expectAnswer(
    deal,
    'deal is active',
    (r) => r.status === 200 && body(r)?.deal?.state === 'DEAL_STATE_ACTIVE',
  );

  const placed = http.request(...orderRequest(token, data.dealId));
  const order = body(placed)?.order;
  const confirmed = expectAnswer(
    placed,
    'order placed',
    (r) => r.status === 200 && order?.state === 'ORDER_STATE_CONFIRMED',
  );
  if (!confirmed) {
    return;
  }
  ordersPlaced.add(1);

  const read = get(`/v1/orders/${order.id}`, { token, name: 'GET /v1/orders/{id}', op: 'get_order' });
  expectAnswer(read, 'order read back', (r) => r.status === 200 && body(r)?.order?.id === order.id);
});
