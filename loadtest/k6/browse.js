// Browse: anonymous shoppers through the gateway. Each iteration lists the
// open deals (GET /v1/deals), reads one deal (GET /v1/deals/{id}, always the
// same one, so it is cache-hot) and lists products (GET /v1/products); no
// think time, so it measures the read path's throughput and latency.
//
// Seeds (setup, as the admin, through the public API): BROWSE_DEALS (5)
// products, each with an open deal.
//
// Thresholds (main scenario): < 1% failed requests, > 99% checks passed,
// p(99) < 500 ms over all requests.
//
// Env: BASE_URL, VUS, DURATION, WARMUP, ADMIN_EMAIL, ADMIN_PASSWORD,
// BROWSE_DEALS. Every request comes from one IP: raise the gateway's
// FLASHMESH_RATE_LIMIT_IP for a load run.

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
  positiveInt,
  scenarios,
} from './lib/flashmesh.js';

const DEALS = positiveInt('BROWSE_DEALS', 5);

export const options = {
  scenarios: scenarios({ executor: 'constant-vus', vus: VUS, duration: DURATION, exec: 'browse' }),
  thresholds: httpThresholds(500),
};

export function setup() {
  const admin = adminToken();
  const deals = [];
  for (let i = 0; i < DEALS; i++) {
    deals.push(createOpenDeal(admin, `k6 browse product ${i}`, 1000, 10).id);
  }
  return { hotDealId: deals[0] };
}

export const browse = checkedIteration((data) => {
  const deals = get('/v1/deals?states=DEAL_STATE_ACTIVE&page_size=20', {
    name: 'GET /v1/deals',
    op: 'list_deals',
  });
  expectAnswer(deals, 'deals listed', (r) => r.status === 200 && (body(r)?.deals?.length ?? 0) > 0);

  const deal = get(`/v1/deals/${data.hotDealId}`, { name: 'GET /v1/deals/{id}', op: 'get_deal' });
  expectAnswer(deal, 'deal read', (r) => r.status === 200 && body(r)?.deal?.id === data.hotDealId);

  const products = get('/v1/products?page_size=20', {
    name: 'GET /v1/products',
    op: 'list_products',
  });
  expectAnswer(
    products,
    'products listed',
    (r) => r.status === 200 && (body(r)?.products?.length ?? 0) > 0,
  );
});
