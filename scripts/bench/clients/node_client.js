// Node `http` keep-alive client for scripts/bench/run.sh (the `clients`
// scenario); see README.md here for the protocol.
//
//   node node_client.js URL WORKERS MAX_GAP_MS DEADLINE_S
//
// One http.Agent({keepAlive: true}) shared by the workers; Node does not
// retry a request whose reused socket turns out to be closed.
'use strict';
const http = require('http');

const [url, workersArg, gapArg, deadlineArg] = process.argv.slice(2);
const WORKERS = Number(workersArg);
const MAX_GAP = Number(gapArg);
const DEADLINE = Date.now() + Number(deadlineArg) * 1000;
// CLIENT_METHOD=POST sends a small body with each request (the tests).
const METHOD = process.env.CLIENT_METHOD || 'GET';
const POST_BODY = 'x'.repeat(1024);
const agent = new http.Agent({ keepAlive: true, maxSockets: WORKERS });

const totals = { client: 'node-http', ok: 0, errors: 0, kinds: {}, samples: [] };
let stopping = false;
let running = WORKERS;

function error(kind, msg) {
  totals.errors++;
  totals.kinds[kind] = (totals.kinds[kind] || 0) + 1;
  if (totals.samples.length < 10) totals.samples.push(msg);
}

function worker() {
  if (stopping || Date.now() > DEADLINE) {
    if (--running === 0) finish();
    return;
  }
  let done = false;
  const next = () => {
    if (done) return;
    done = true;
    setTimeout(worker, Math.floor(Math.random() * (MAX_GAP + 1)));
  };
  const req = http.request(url, { agent, method: METHOD }, (res) => {
    res.resume();
    res.on('end', () => {
      if (res.statusCode === 200) totals.ok++;
      else error(`status ${res.statusCode}`, `status ${res.statusCode}`);
      next();
    });
    res.on('error', (e) => { error(e.code || 'response error', String(e)); next(); });
  });
  req.setTimeout(5000, () => req.destroy(Object.assign(new Error('timeout'), { code: 'TIMEOUT' })));
  req.on('error', (e) => { error(e.code || e.message, `${e.code}: ${e.message}`); next(); });
  req.end(METHOD === 'POST' ? POST_BODY : undefined);
}

function finish() {
  clearInterval(progress);
  agent.destroy();
  process.stdout.write(JSON.stringify(totals) + '\n');
  process.exit(0);
}

const progress = setInterval(() => {
  process.stderr.write(`progress ${totals.ok} ${totals.errors}\n`);
  if (Date.now() > DEADLINE) stopping = true;
}, 1000);

process.stdin.setEncoding('utf8');
process.stdin.on('data', (d) => { if (d.includes('stop')) stopping = true; });
process.stdin.on('end', () => { stopping = true; });

for (let i = 0; i < WORKERS; i++) worker();
