// gRPC health: grpc.health.v1.Health/Check on the catalog service, called
// directly (no gateway). The no-op call: what tonic, HTTP/2 and the stack's
// server layers (observation, concurrency limit) cost with no work behind
// them, the floor the other gRPC scripts compare with. The health
// service's descriptors come from the catalog's reflection API.
//
// Thresholds (main scenario): > 99% checks passed (status OK, SERVING),
// p(99) < 100 ms.
//
// Env: CATALOG_ADDR (127.0.0.1:50052), VUS, DURATION, WARMUP. gRPC mode only.

import grpc from 'k6/net/grpc';
import { checkedIteration, expectAnswer } from '../lib/flashmesh.js';
import { catalogByReflection, grpcScenarios, grpcThresholds } from '../lib/grpc.js';

export const options = {
  scenarios: grpcScenarios('healthCheck'),
  thresholds: grpcThresholds(100),
};

export const healthCheck = checkedIteration(() => {
  const response = catalogByReflection().invoke('grpc.health.v1.Health/Check', {});
  expectAnswer(
    response,
    'serving',
    (r) => r.status === grpc.StatusOK && r.message.status === 'SERVING',
  );
});
