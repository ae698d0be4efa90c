// Order history: logged-in buyers read their orders through the gateway.
// Each iteration lists the buyer's orders (GET /v1/orders, newest first,
// items included) and reads one of them (GET /v1/orders/{id}). Authenticated
// reads: the gateway verifies the JWT, the order service reads its storage.
//
// Seeds (setup, through the public API): HISTORY_USERS (20) buyers signed up,
// each with HISTORY_ORDERS (5) orders on an open deal. VU n reads as buyer
// n mod HISTORY_USERS. Their access tokens come from sign-up, so a run must
// end within FLASHMESH_ACCESS_TOKEN_TTL (15 min by default).
//
// Thresholds (main scenario): < 1% failed requests, > 99% checks passed,
// p(99) < 500 ms over all requests.
//
// Env: BASE_URL, VUS, DURATION, WARMUP, ADMIN_EMAIL, ADMIN_PASSWORD,
// HISTORY_USERS, HISTORY_ORDERS. Raise the gateway's FLASHMESH_RATE_LIMIT_IP
// and FLASHMESH_RATE_LIMIT_USER for a load run (each VU is one user).

import exec from 'k6/execution';
import {
  DURATION,
  VUS,
  adminToken,
  body,
  checkedIteration,
  createOpenDeal,
  expectAnswer,
  get,
  httpThresholds,
  pick,
  placeOrders,
  positiveInt,
  scenarios,
  signUpUsers,
} from './lib/flashmesh.js';

const USERS = positiveInt('HISTORY_USERS', 20);
const ORDERS = positiveInt('HISTORY_ORDERS', 5);
/** The first page holds every order of a buyer, up to ListOrders' maximum. */
const PAGE_SIZE = Math.min(ORDERS, 100);

export const options = {
  scenarios: scenarios({ executor: 'constant-vus', vus: VUS, duration: DURATION, exec: 'history' }),
  thresholds: httpThresholds(500),
  setupTimeout: '5m',
};

export function setup() {
  const admin = adminToken();
  const deal = createOpenDeal(admin, 'k6 history product', USERS * ORDERS, ORDERS);
  const users = signUpUsers(USERS, 'k6-history');
  const orders = users.map(() => []);
  for (let round = 0; round < ORDERS; round++) {
    placeOrders(users, deal.id).forEach((id, i) => orders[i].push(id));
  }
  return { buyers: users.map((user, i) => ({ token: user.token, orderIds: orders[i] })) };
}

export const history = checkedIteration((data) => {
  const buyer = data.buyers[(exec.vu.idInTest - 1) % data.buyers.length];
  const list = get(`/v1/orders?page_size=${PAGE_SIZE}`, {
    token: buyer.token,
    name: 'GET /v1/orders',
    op: 'list_orders',
  });
  expectAnswer(
    list,
    'orders listed',
    (r) => r.status === 200 && (body(r)?.orders?.length ?? 0) === PAGE_SIZE,
  );

  const id = pick(buyer.orderIds);
  const order = get(`/v1/orders/${id}`, {
    token: buyer.token,
    name: 'GET /v1/orders/{id}',
    op: 'get_order',
  });
  expectAnswer(order, 'order read', (r) => r.status === 200 && body(r)?.order?.id === id);
});
