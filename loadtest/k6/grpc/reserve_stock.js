// gRPC ReserveStock: flashmesh.catalog.v1.CatalogService/ReserveStock on the
// catalog service, called directly as the order service calls it, with a
// fresh reservation_id each time and stock that never runs out: one
// PostgreSQL (or SQLite) transaction on one hot deal row per call, plus the
// Redis stock gate's round trip when Redis is configured.
//
// ReserveStock is internal: only a `role=service` token whose subject is in
// FLASHMESH_STOCK_CALLERS (`order`) may call it. Pass one in SERVICE_TOKEN:
//   -e SERVICE_TOKEN="$(flashmesh token --service order)"
// (run with the stack's configuration, so it signs with the stack's key).
//
// Seeds (setup, as the admin, through the gateway at BASE_URL): one open
// deal with RESERVE_STOCK (10,000,000) units, all of which any one user may
// hold; VU n reserves as user `k6-reserver-n`.
//
// Thresholds (main scenario): > 99% checks passed (status OK, one unit
// reserved), p(99) < 1000 ms.
//
// Env: SERVICE_TOKEN (required), CATALOG_ADDR (127.0.0.1:50052), BASE_URL,
// VUS, DURATION, WARMUP, ADMIN_EMAIL, ADMIN_PASSWORD, RESERVE_STOCK. gRPC
// mode only.

import exec from 'k6/execution';
import grpc from 'k6/net/grpc';
import {
  adminToken,
  checkedIteration,
  createOpenDeal,
  expectAnswer,
  positiveInt,
} from '../lib/flashmesh.js';
import { catalog, grpcScenarios, grpcThresholds } from '../lib/grpc.js';

const STOCK = positiveInt('RESERVE_STOCK', 10000000);
const SERVICE_TOKEN = __ENV.SERVICE_TOKEN || '';

export const options = {
  scenarios: grpcScenarios('reserveStock'),
  thresholds: grpcThresholds(1000),
};

export function setup() {
  if (SERVICE_TOKEN === '') {
    throw new Error(
      'SERVICE_TOKEN is not set: pass the order service\'s token, ' +
        '-e SERVICE_TOKEN="$(flashmesh token --service order)"',
    );
  }
  return { dealId: createOpenDeal(adminToken(), 'k6 grpc reserve product', STOCK, STOCK).id };
}

export const reserveStock = checkedIteration((data) => {
  const response = catalog().invoke(
    'flashmesh.catalog.v1.CatalogService/ReserveStock',
    {
      deal_id: data.dealId,
      user_id: `k6-reserver-${exec.vu.idInTest}`,
      quantity: 1,
      reservation_id: crypto.randomUUID(),
    },
    { metadata: { authorization: `Bearer ${SERVICE_TOKEN}` } },
  );
  expectAnswer(
    response,
    'one unit reserved',
    (r) => r.status === grpc.StatusOK && r.message.reservation.quantity === 1,
  );
});
