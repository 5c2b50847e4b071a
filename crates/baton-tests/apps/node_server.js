// A Node `http` server for `baton run`: it listens on the socket at fd 3
// (systemd socket activation) and stops gracefully on SIGTERM.
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

server.listen({ fd: 3 }, () => {
  console.error(`node generation ${generation} pid ${process.pid} listening on fd 3`);
});

process.on('SIGTERM', () => {
  console.error(`node generation ${generation} pid ${process.pid}: SIGTERM, closing`);
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 20000).unref();
});
