// Rush: the flash sale. setup() signs buyers up and creates a deal of
// RUSH_STOCK units, at most RUSH_LIMIT per buyer, that opens RUSH_LEAD after
// the warm-up ends. During the warm-up every VU reads the (still scheduled)
// deal; then the main scenario's VUs each run once: wait for the opening
// instant and buy one unit per order (POST /v1/orders, a fresh
// Idempotency-Key each) with each of their buyers in turn, RUSH_LIMIT units
// per buyer, until the answer is 409 SOLD_OUT. Each VU has enough buyers that
// together they could buy more than the stock, so the sale always sells out.
//
// Metrics:
//   rush_orders_accepted  Counter  orders confirmed
//   rush_units_accepted   Counter  units in them
//   rush_sold_out         Counter  409 problem+json with code SOLD_OUT
//   rush_unexpected       Counter  any other non-2xx (5xx, LIMIT_EXCEEDED
//                                  for a buyer under the limit, …)
//   rush_accept_ms        Trend    per accepted order, ms from the opening
//                                  to its answer: max = time to sell out
// teardown() reads the deal and every buyer's orders back through the public
// API and checks (tag rush:oversell) that the units in orders are at most the
// stock, that no buyer holds more than RUSH_LIMIT, and that they equal the
// units taken from the deal.
//
// Thresholds: rush_unexpected count == 0; the oversell checks all pass;
// rush_units_accepted count <= RUSH_STOCK; at least one SOLD_OUT; in the main
// scenario < 1% failed requests (409s are expected answers there), p(99) <
// 2000 ms, and no VU's run ended in an exception.
//
// Env: BASE_URL, VUS, DURATION (the longest the sale may take), WARMUP,
// ADMIN_EMAIL, ADMIN_PASSWORD, RUSH_STOCK (1000), RUSH_LIMIT (2), RUSH_LEAD
// (1s). Raise the gateway's FLASHMESH_RATE_LIMIT_IP and
// FLASHMESH_RATE_LIMIT_USER for a load run.

import http from 'k6/http';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import {
  DURATION,
  VUS,
  WARMUP_MS,
  adminToken,
  body,
  checkedIteration,
  createDeal,
  durationMs,
  get,
  logFailure,
  orderRequest,
  positiveInt,
  request,
  scenarios,
  signUpUsers,
} from './lib/flashmesh.js';

const STOCK = positiveInt('RUSH_STOCK', 1000);
const LIMIT = positiveInt('RUSH_LIMIT', 2);
if (LIMIT > 100) {
  // teardown() reads each buyer's orders in one page of ListOrders (at most
  // 100); a buyer over the limit still shows, with more than LIMIT units.
  throw new Error(`RUSH_LIMIT must be at most 100, got ${LIMIT}`);
}
const LEAD_MS = durationMs(__ENV.RUSH_LEAD || '1s');
/**
 * Buyers per VU: twice a fair share of the stock, plus one, so a VU that
 * outruns the others still has buyers left when the stock runs out.
 */
const BUYERS_PER_VU = Math.ceil((2 * STOCK) / (LIMIT * VUS)) + 1;

const ordersAccepted = new Counter('rush_orders_accepted');
const unitsAccepted = new Counter('rush_units_accepted');
const soldOut = new Counter('rush_sold_out');
const unexpected = new Counter('rush_unexpected');
const acceptMs = new Trend('rush_accept_ms', true);

/** 2xx and 409 (SOLD_OUT) are the answers a rush expects. */
const RUSH_ANSWERS = http.expectedStatuses({ min: 200, max: 299 }, 409);

export const options = {
  scenarios: scenarios({
    executor: 'per-vu-iterations',
    vus: VUS,
    iterations: 1,
    maxDuration: DURATION,
    exec: 'rush',
  }),
  thresholds: {
    rush_unexpected: ['count==0'],
    rush_units_accepted: [`count<=${STOCK}`],
    rush_sold_out: ['count>0'],
    'checks{rush:oversell}': ['rate==1'],
    'checks{scenario:main}': ['rate==1'],
    'http_req_failed{scenario:main}': ['rate<0.01'],
    'http_req_duration{scenario:main}': ['p(99)<2000'],
    // Exported for loadtest/compare: the sale's requests.
    'http_reqs{scenario:main}': ['count>0'],
  },
  setupTimeout: '10m',
};

export function setup() {
  const admin = adminToken();
  const buyers = signUpUsers(BUYERS_PER_VU * VUS, 'k6-rush').map((user) => user.token);
  // Opens RUSH_LEAD after the main scenario starts, which is WARMUP after
  // setup returns, so every VU is waiting when the sale opens.
  const deal = createDeal(admin, {
    name: 'k6 rush product',
    stock: STOCK,
    perUserLimit: LIMIT,
    startsAtMs: Date.now() + WARMUP_MS + LEAD_MS,
    openForMs: 3600 * 1000,
  });
  return { dealId: deal.id, startsAtMs: Date.parse(deal.starts_at), buyers };
}

/** The warm-up: connections and the deal's cache, before the sale opens. */
function readDeal(data) {
  get(`/v1/deals/${data.dealId}`, { name: 'GET /v1/deals/{id}', op: 'get_deal' });
}

/** What one order attempt got. */
const ACCEPTED = 'accepted';
const SOLD_OUT = 'sold out';
const TOO_EARLY = 'too early';
const UNEXPECTED = 'unexpected';

function buy(data, token) {
  const response = http.request(...orderRequest(token, data.dealId, RUSH_ANSWERS));
  const answer = body(response);
  if (response.status === 200 && answer?.order) {
    ordersAccepted.add(1);
    unitsAccepted.add(answer.order.items.reduce((units, item) => units + item.quantity, 0));
    acceptMs.add(Date.now() - data.startsAtMs);
    return ACCEPTED;
  }
  if (response.status === 409 && answer?.code === 'SOLD_OUT') {
    soldOut.add(1);
    return SOLD_OUT;
  }
  // A clock a few ms ahead of the server's: the deal is still scheduled.
  const early = Date.now() - data.startsAtMs < 1000;
  if (response.status === 409 && answer?.code === 'DEAL_NOT_ACTIVE' && early) {
    return TOO_EARLY;
  }
  unexpected.add(1);
  logFailure('an unexpected answer in the rush', response);
  return UNEXPECTED;
}

export const rush = checkedIteration((data) => {
  if (exec.scenario.name !== 'main') {
    readDeal(data);
    return;
  }
  // Per-vu-iterations with one iteration each: 0..VUS-1, one per VU.
  const slot = exec.scenario.iterationInTest;
  const mine = data.buyers.slice(slot * BUYERS_PER_VU, (slot + 1) * BUYERS_PER_VU);
  const wait = data.startsAtMs - Date.now();
  if (wait > 0) {
    sleep(wait / 1000);
  }
  for (const token of mine) {
    let bought = 0;
    while (bought < LIMIT) {
      const outcome = buy(data, token);
      if (outcome === SOLD_OUT) {
        return;
      }
      if (outcome === UNEXPECTED) {
        break; // counted; this buyer's state is unknown, go on with the next
      }
      if (outcome === ACCEPTED) {
        bought += 1;
      } else {
        sleep(0.005);
      }
    }
  }
});

/**
 * The confirmed units of the deal in the buyers' orders: in all, the most
 * one buyer holds, and how many buyers could not be read.
 */
function unitsInOrders(data) {
  const histories = http.batch(
    data.buyers.map((token) =>
      request('GET', '/v1/orders?page_size=100', undefined, { token, name: 'GET /v1/orders' }),
    ),
  );
  let units = 0;
  let mostPerBuyer = 0;
  let unreadable = 0;
  for (const response of histories) {
    const orders = body(response)?.orders;
    if (response.status !== 200 || !orders) {
      unreadable += 1;
      continue;
    }
    let held = 0;
    for (const order of orders) {
      for (const item of order.items) {
        if (item.deal_id === data.dealId && order.state === 'ORDER_STATE_CONFIRMED') {
          held += item.quantity;
        }
      }
    }
    units += held;
    mostPerBuyer = Math.max(mostPerBuyer, held);
  }
  return { units, mostPerBuyer, unreadable };
}

/** How long teardown waits for the deal's cached stock to catch up with the last sale. */
const SETTLE_MS = 5000;

export function teardown(data) {
  const orders = unitsInOrders(data);
  // Deal reads are cached (FLASHMESH_CACHE_L1_TTL + _L2_TTL, 1 s by
  // default), so the stock may lag the last sale for that long.
  const settleBy = Date.now() + SETTLE_MS;
  let deal = null;
  let taken = NaN;
  while (Date.now() < settleBy) {
    deal = body(get(`/v1/deals/${data.dealId}`, { name: 'GET /v1/deals/{id}' }))?.deal ?? null;
    taken = deal ? deal.stock - deal.remaining_stock : NaN;
    if (taken === orders.units) {
      break;
    }
    sleep(0.25);
  }
  console.log(
    `rush: ${STOCK} units on sale; ${taken} taken from the deal; ${orders.units} in ` +
      `confirmed orders of ${data.buyers.length} buyers (${orders.unreadable} unreadable)`,
  );
  check(
    { deal, taken, orders },
    {
      "deal and every buyer's orders read back": (r) => r.deal !== null && r.orders.unreadable === 0,
      'no oversell: units in orders <= stock': (r) => r.orders.units <= STOCK,
      'no buyer above the per-buyer limit': (r) => r.orders.mostPerBuyer <= LIMIT,
      'units in orders == units taken from the deal': (r) => r.orders.units === r.taken,
    },
    { rush: 'oversell' },
  );
}
