// Auth: the account journey through the gateway. Each iteration signs a new
// user up (POST /v1/auth/signup), logs in (POST /v1/auth/login), rotates
// the refresh token (POST /v1/auth/refresh: a new pair, the old refresh
// token spent) and reads the account with the new access token
// (GET /v1/me). Sign-up and login each verify an argon2id hash, which
// dominates: at the default cost the auth service does ~78 a second on 2
// cores, so this measures the password path more than the transport.
//
// Thresholds (main scenario): < 1% failed requests, > 99% checks passed,
// p(99) < 3000 ms over all requests (hashing queues at one per core).
//
// Env: BASE_URL, VUS, DURATION, WARMUP. Every request comes from one IP:
// raise the gateway's FLASHMESH_RATE_LIMIT_IP for a load run.

import {
  DURATION,
  USER_PASSWORD,
  VUS,
  body,
  checkedIteration,
  expectAnswer,
  get,
  httpThresholds,
  post,
  scenarios,
  uniqueEmail,
} from './lib/flashmesh.js';

export const options = {
  scenarios: scenarios({ executor: 'constant-vus', vus: VUS, duration: DURATION, exec: 'account' }),
  thresholds: httpThresholds(3000),
};

export const account = checkedIteration(() => {
  const email = uniqueEmail('k6-auth');
  const credentials = { email, password: USER_PASSWORD };
  const signedUp = post('/v1/auth/signup', credentials, {
    name: 'POST /v1/auth/signup',
    op: 'signup',
  });
  if (!expectAnswer(signedUp, 'signed up', (r) => r.status === 200)) {
    return;
  }

  const loggedIn = post('/v1/auth/login', credentials, { name: 'POST /v1/auth/login', op: 'login' });
  const tokens = body(loggedIn)?.tokens;
  const hasTokens = expectAnswer(
    loggedIn,
    'logged in',
    (r) => r.status === 200 && Boolean(tokens?.refresh_token),
  );
  if (!hasTokens) {
    return;
  }

  const refreshed = post(
    '/v1/auth/refresh',
    { refresh_token: tokens.refresh_token },
    { name: 'POST /v1/auth/refresh', op: 'refresh' },
  );
  const rotated = body(refreshed)?.tokens;
  const wasRotated = expectAnswer(
    refreshed,
    'refresh token rotated',
    (r) =>
      r.status === 200 &&
      Boolean(rotated?.refresh_token) &&
      rotated.refresh_token !== tokens.refresh_token,
  );
  if (!wasRotated) {
    return;
  }

  const me = get('/v1/me', { token: rotated.access_token, name: 'GET /v1/me', op: 'get_me' });
  expectAnswer(me, 'account read', (r) => r.status === 200 && body(r)?.user?.email === email);
});
