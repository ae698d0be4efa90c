// gRPC GetDeal: flashmesh.catalog.v1.CatalogService/GetDeal on the catalog
// service, called directly (no gateway), always for the same deal, so every
// read after the first is served from the cache (L1 moka, then L2 Redis).
// Compare with health.js for what the catalog adds to a no-op call, and with
// browse.js's GET /v1/deals/{id} for what the gateway adds.
//
// Seeds (setup, as the admin, through the gateway at BASE_URL): one open deal.
//
// Thresholds (main scenario): > 99% checks passed (status OK, the deal),
// p(99) < 100 ms.
//
// Env: CATALOG_ADDR (127.0.0.1:50052), BASE_URL, VUS, DURATION, WARMUP,
// ADMIN_EMAIL, ADMIN_PASSWORD. gRPC mode only.

import grpc from 'k6/net/grpc';
import { adminToken, checkedIteration, createOpenDeal, expectAnswer } from '../lib/flashmesh.js';
import { catalog, grpcScenarios, grpcThresholds } from '../lib/grpc.js';

export const options = {
  scenarios: grpcScenarios('getDeal'),
  thresholds: grpcThresholds(100),
};

export function setup() {
  return { dealId: createOpenDeal(adminToken(), 'k6 grpc get-deal product', 1000, 10).id };
}

export const getDeal = checkedIteration((data) => {
  const response = catalog().invoke('flashmesh.catalog.v1.CatalogService/GetDeal', {
    id: data.dealId,
  });
  expectAnswer(
    response,
    'deal read',
    (r) => r.status === grpc.StatusOK && r.message.deal.id === data.dealId,
  );
});
