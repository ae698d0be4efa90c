// Shared pieces of the gRPC scripts (loadtest/k6/grpc/): direct calls to the
// catalog service over HTTP/2, bypassing the gateway. They need the stack in
// its default transport (FLASHMESH_TRANSPORT=grpc); in http1-json mode the
// services do not speak gRPC. Seeding still goes through the gateway
// (BASE_URL), as in the HTTP scripts.

import grpc from 'k6/net/grpc';
import { DURATION, VUS, scenarios } from './flashmesh.js';

/** The catalog service's gRPC address, e.g. `flashmesh up`'s. */
export const CATALOG_ADDR = __ENV.CATALOG_ADDR || '127.0.0.1:50052';

// Made in the init context. `contracts` knows the catalog's RPCs from
// proto/; grpc.health.v1 is not there, so `reflected` learns it from the
// service's reflection API when it connects.
const contracts = new grpc.Client();
contracts.load(['../../../proto'], 'flashmesh/catalog/v1/catalog.proto');
const reflected = new grpc.Client();
const connected = new Set();

/**
 * `client` connected to the catalog on this VU's first use: one HTTP/2
 * connection per VU for the whole run, as a service's channel.
 */
function connectOnce(client, reflect) {
  if (!connected.has(client)) {
    client.connect(CATALOG_ADDR, { plaintext: true, reflect, timeout: '10s' });
    connected.add(client);
  }
  return client;
}

/** This VU's client for the catalog's own RPCs. */
export function catalog() {
  return connectOnce(contracts, false);
}

/** This VU's client for whatever the catalog serves (grpc.health.v1), by reflection. */
export function catalogByReflection() {
  return connectOnce(reflected, true);
}

/** A constant-VUs main scenario (after the warm-up) running `exec`. */
export function grpcScenarios(exec) {
  return scenarios({ executor: 'constant-vus', vus: VUS, duration: DURATION, exec });
}

/**
 * Thresholds on the main scenario: every check passing at least 99% of
 * the time, p(99) of the calls under `p99Ms`, and at least one iteration
 * (with `checkedIteration`, each leaves a check).
 */
export function grpcThresholds(p99Ms) {
  return {
    'grpc_req_duration{scenario:main}': [`p(99)<${p99Ms}`],
    'iterations{scenario:main}': ['count>0'],
    'checks{scenario:main}': ['rate>0.99'],
  };
}
