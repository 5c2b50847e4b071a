// An HTTP/2 load client that behaves as RFC 9113 allows (Node's http2
// module, h2c prior knowledge or TLS with ALPN h2): CONNS sessions with
// STREAMS concurrent streams each, GET PATH in a loop. On GOAWAY a session
// takes no new stream and a new session is opened. A stream is:
//   ok       a full 200 response;
//   refused  reset with REFUSED_STREAM, or its id is above the last stream
//            id of a GOAWAY the session received (the server says it never
//            processed it) -- counted apart, and retried;
//   retry    never sent, because its session was already closing (not a
//            refusal: the client chose not to send it);
//   failed   anything else (reset, error, bad status).
// Every GOAWAY frame is logged with its last stream id. Runs until a line
// "stop" arrives on stdin (or DEADLINE_MS passes), then prints one JSON line
// of totals on stdout. While running, prints "progress OK" lines on stderr
// once a second so a test can wait for progress.
//
//   node h2_client.js URL CONNS STREAMS PATH DEADLINE_MS [--ca=CA.pem]
//
// With --ca, TLS connections (ALPN h2) trust that CA; the URL's IP address
// is checked against the certificate's IP SAN.
'use strict';
const http2 = require('http2');

const [url, connsArg, streamsArg, path, deadlineArg] = process.argv.slice(2);
const fs = require('fs');
const caArg = process.argv.find((a) => a.startsWith('--ca='));
const ca = caArg ? fs.readFileSync(caArg.slice(5)) : undefined;
const CONNS = Number(connsArg || 16);
const STREAMS = Number(streamsArg || 8);
const DEADLINE = Date.now() + Number(deadlineArg || 120000);

const totals = { ok: 0, refused: 0, retry: 0, failed: 0, sessions: 0, goaways: 0, pids: {} };
const goaways = [];
const errors = [];
let stopping = false;

function note(list, msg) {
  if (list.length < 20) list.push(msg);
}

function openSession(slot) {
  if (stopping || Date.now() > DEADLINE) return;
  totals.sessions++;
  const opts = ca ? { ca } : {};
  const session = http2.connect(url, opts);
  let goawayLast = null; // the lowest last-stream-id seen in a GOAWAY
  let replaced = false;
  const replace = () => {
    if (!replaced) {
      replaced = true;
      setImmediate(() => openSession(slot));
    }
  };
  session.on('goaway', (code, lastStreamID) => {
    totals.goaways++;
    goaways.push({ slot, code, lastStreamID, at: Date.now() });
    if (goawayLast === null || lastStreamID < goawayLast) goawayLast = lastStreamID;
    replace();
  });
  session.on('error', (e) => note(errors, `session: ${e.code || e.message}`));
  session.on('close', replace);
  const one = () => {
    if (stopping || Date.now() > DEADLINE || session.closed || session.destroyed) {
      return;
    }
    let req;
    try {
      req = session.request({ ':path': path });
    } catch (e) {
      totals.retry++;
      return;
    }
    let status = 0;
    let body = '';
    let done = false;
    // nghttp2 could not send this stream's HEADERS (the session had
    // received GOAWAY first): it never reached the server.
    let notSent = false;
    req.on('frameError', (type) => { if (type === http2.constants.NGHTTP2_HEADERS || type === 1) notSent = true; });
    const finish = (kind, msg) => {
      if (done) return;
      done = true;
      totals[kind]++;
      if (msg && kind !== 'ok') note(errors, msg);
      if (kind === 'ok' || kind === 'refused' || kind === 'retry') {
        setImmediate(one);
      }
    };
    req.setEncoding('utf8');
    req.on('response', (h) => { status = h[':status']; });
    req.on('data', (d) => { body += d; });
    req.on('end', () => {
      if (status === 200) {
        try {
          const v = JSON.parse(body);
          if (v.pid) totals.pids[v.pid] = (totals.pids[v.pid] || 0) + 1;
        } catch (e) { /* not a /version body */ }
        finish('ok');
      } else {
        finish('failed', `stream ${req.id}: status ${status}`);
      }
    });
    req.on('error', (e) => {
      const id = req.id;
      if (notSent) {
        finish('retry');
      } else if (req.rstCode === http2.constants.NGHTTP2_REFUSED_STREAM ||
          (goawayLast !== null && id !== undefined && id > goawayLast)) {
        finish('refused', `stream ${id}: refused (${e.code}, rst ${req.rstCode}, goaway last ${goawayLast})`);
      } else if (id === undefined || e.code === 'ERR_HTTP2_GOAWAY_SESSION') {
        finish('retry');
      } else {
        finish('failed', `stream ${id}: ${e.code || e.message} rst ${req.rstCode}`);
      }
    });
    req.on('close', () => {
      if (done) return;
      const id = req.id;
      if (notSent) {
        finish('retry');
      } else if (req.rstCode === http2.constants.NGHTTP2_REFUSED_STREAM ||
          (goawayLast !== null && id !== undefined && id > goawayLast)) {
        finish('refused', `stream ${id}: closed, refused (rst ${req.rstCode}, goaway last ${goawayLast})`);
      } else {
        finish('failed', `stream ${id}: closed without a response (rst ${req.rstCode})`);
      }
    });
    req.end();
  };
  for (let i = 0; i < STREAMS; i++) one();
}

for (let c = 0; c < CONNS; c++) openSession(c);

const progress = setInterval(() => {
  process.stderr.write(`progress ${totals.ok}\n`);
  if (Date.now() > DEADLINE) end();
}, 200);

function end() {
  if (stopping) return;
  stopping = true;
  clearInterval(progress);
  // Let streams in flight finish (bounded).
  setTimeout(() => {
    process.stdout.write(JSON.stringify({ ...totals, goaway_frames: goaways, errors }) + '\n');
    process.exit(0);
  }, 1000);
}

process.stdin.setEncoding('utf8');
process.stdin.on('data', (d) => { if (d.includes('stop')) end(); });
process.stdin.on('end', end);
