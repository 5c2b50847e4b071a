// A Node `http` server for `baton run`: it listens on the socket at fd 3
// (systemd socket activation) and stops gracefully on SIGTERM. `GET /ws`
// upgrades to a WebSocket (Node `ws`) that answers each text message with
// `{"echo", "seq", "pid"}` (the contract of ws_clients.*).
'use strict';
const http = require('http');

const generation = parseInt(process.env.BATON_GENERATION || '0', 10);
const version = process.env.APP_VERSION || 'node-app';

const server = http.createServer((req, res) => {
  // /echo: the request body streamed back; /headers: the request headers
  // and the peer address as JSON; /bytes/N: N bytes (i % 251);
  // /slow/MS: the answer after MS ms (the front's tests).
  if (req.url === '/echo') {
    res.writeHead(200, { 'Content-Type': 'application/octet-stream' });
    req.pipe(res);
    return;
  }
  if (req.url === '/headers') {
    const b = JSON.stringify({ headers: req.headers, peer: req.socket.remoteAddress });
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(b) });
    res.end(b);
    return;
  }
  const bytes = /^\/bytes\/(\d+)$/.exec(req.url);
  if (bytes) {
    const n = parseInt(bytes[1], 10);
    const buf = Buffer.alloc(n);
    for (let i = 0; i < n; i++) buf[i] = i % 251;
    res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': n });
    res.end(buf);
    return;
  }
  if (req.url === '/sink') {
    // The whole body read before the answer: its length.
    let n = 0;
    req.on('data', (c) => { n += c.length; });
    req.on('end', () => {
      const b = JSON.stringify({ received: n });
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(b) });
      res.end(b);
    });
    return;
  }
  const slow = /^\/slow\/(\d+)$/.exec(req.url);
  if (slow) {
    setTimeout(() => {
      const b = JSON.stringify({ pid: process.pid, generation, version });
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(b) });
      res.end(b);
    }, parseInt(slow[1], 10));
    return;
  }
  let body;
  let type = 'text/plain';
  if (req.url === '/version') {
    body = JSON.stringify({ pid: process.pid, generation, version });
    type = 'application/json';
  } else if (req.url === '/health') {
    body = 'ok';
  } else {
    body = `hello from node generation ${generation} pid ${process.pid}\n`;
  }
  res.writeHead(200, { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
});

// `ws` is loaded only when a WebSocket arrives: the HTTP tests need no
// node_modules.
let wss = null;
server.on('upgrade', (req, socket, head) => {
  if (req.url !== '/ws') {
    socket.destroy();
    return;
  }
  if (wss === null) {
    const { WebSocketServer } = require('ws');
    wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    let seq = 0;
    ws.on('message', (data) => {
      seq += 1;
      ws.send(JSON.stringify({ echo: data.toString(), seq, pid: process.pid }));
    });
  });
});

server.listen({ fd: 3 }, () => {
  console.error(`node generation ${generation} pid ${process.pid} listening on fd 3`);
});

process.on('SIGTERM', () => {
  console.error(`node generation ${generation} pid ${process.pid}: SIGTERM, closing`);
  // WebSockets get their protocol's close (1001: going away).
  if (wss !== null) wss.clients.forEach((ws) => ws.close(1001, 'server stopping'));
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 20000).unref();
});
