// WebSocket clients for baton's tests (Node `ws`): the same contract as
// ws_clients.py.
//
// usage: node ws_clients.js URL N INTERVAL_MS MAX_SECONDS
'use strict';
const WebSocket = require('ws');

const [url, n, intervalMs, maxS] = [process.argv[2], +process.argv[3], +process.argv[4], +process.argv[5]];
const emit = (o) => process.stdout.write(JSON.stringify(o) + '\n');
let stopping = false;
const stopWaiters = [];
function stop() {
  if (stopping) return;
  stopping = true;
  stopWaiters.forEach((f) => f());
}

function client(i) {
  const st = { client: i, lang: 'node', sent: 0, answers: 0, seq_errors: 0, echo_errors: 0,
    closes: [], errors: [], pids: [], ports: [] };
  return new Promise((resolve) => {
    let done = false;
    const finish = () => { if (!done) { done = true; resolve(st); } };
    // `ws` offers permessage-deflate by default: the server must decline it
    // (its compression state could not move with the connection).
    const ws = new WebSocket(url, { handshakeTimeout: 10000 });
    let expect = 1;
    let k = 0;
    let lastMsg = null;
    let answerTimer = null;
    let firstAnswer = false;
    const send = () => {
      if (stopping) { ws.close(1000); return; }
      k += 1;
      lastMsg = `c${i}-${k}`;
      ws.send(lastMsg);
      st.sent += 1;
      answerTimer = setTimeout(() => { st.errors.push(`no answer to ${lastMsg} within 10 s`); ws.terminate(); }, 10000);
    };
    stopWaiters.push(() => { if (ws.readyState === WebSocket.OPEN && answerTimer === null) ws.close(1000); });
    ws.on('open', () => {
      st.ports.push(ws._socket.localPort);
      if (ws.extensions) st.errors.push(`the server negotiated an extension: ${ws.extensions}`);
      send();
    });
    ws.on('message', (data) => {
      clearTimeout(answerTimer);
      answerTimer = null;
      let a;
      try { a = JSON.parse(data.toString()); } catch (e) { st.errors.push(`bad answer: ${data}`); return; }
      st.answers += 1;
      if (st.answers % 5 === 0) emit({ event: 'count', client: i, answers: st.answers });
      if (a.echo !== lastMsg) st.echo_errors += 1;
      if (a.seq !== expect) { st.seq_errors += 1; st.errors.push(`seq ${a.seq}, expected ${expect}`); }
      expect = a.seq + 1;
      if (st.pids.length === 0 || st.pids[st.pids.length - 1] !== a.pid) {
        st.pids.push(a.pid);
        emit({ event: 'pid', client: i, pid: a.pid });
      }
      const port = ws._socket && ws._socket.localPort;
      if (port !== undefined && port !== st.ports[st.ports.length - 1]) st.ports.push(port);
      if (!firstAnswer) { firstAnswer = true; onFirst(); }
      if (stopping) { ws.close(1000); return; }
      setTimeout(send, intervalMs);
    });
    ws.on('close', (code) => {
      // A close this client did not start is the server's.
      if (!stopping) { st.closes.push(code); st.errors.push(`closed by the server: ${code}`); }
      if (!firstAnswer) { firstAnswer = true; onFirst(); }
      finish();
    });
    ws.on('error', (e) => { st.errors.push(`error: ${e.message}`); });
  });
}

let firsts = 0;
function onFirst() {
  firsts += 1;
  if (firsts === n) emit({ event: 'ready' });
}

const all = [];
for (let i = 0; i < n; i++) all.push(client(i));
process.stdin.on('end', stop);
process.stdin.resume();
setTimeout(stop, maxS * 1000).unref();
Promise.all(all).then((clients) => {
  emit({ event: 'summary', clients });
  process.exit(0);
});
