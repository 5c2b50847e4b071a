// A Node `http` server for `baton run`: it listens on the socket at fd 3
// (systemd socket activation) and stops gracefully on SIGTERM.
'use strict';
const http = require('http');

const generation = parseInt(process.env.BATON_GENERATION || '0', 10);
const version = process.env.APP_VERSION || 'node-app';

const server = http.createServer((req, res) => {
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
