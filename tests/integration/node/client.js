// A Node `ws` client for the integration tests (tests/integration/test_clients.py).
//
// It reads one JSON script on stdin, plays it against the server and prints
// one JSON report on stdout of what it observed, so that the Python test can
// assert behaviour as a Node application sees it. Payloads travel as base64
// so that binary data and UTF-8 split inside a code point survive JSON. Every
// message received is reported, the bus's welcome included: as base64 (the
// exact bytes) and, for a text message, as the text Node decoded, so that the
// Python side can check each envelope against the published schema.
//
// Script:
//   {"url": "ws://127.0.0.1:9100/?echo=true&channel=t:node",
//    "steps": [{"op": "text", "data": "{\"type\":\"event\",\"payload\":{}}"},
//              {"op": "fragments", "parts": ["<b64>", ...], "binary": false},
//              {"op": "binary", "data": "<b64>"},
//              {"op": "ping", "data": "<b64>"}],
//    "expect_messages": 3,                  // close once this many arrived (the welcome counts)...
//    "close": {"code": 1000, "reason": "bye"},  // ...with this; null: wait for the server to close
//    "timeout_ms": 10000}
// Report:
//   {"opened": true, "messages": [{"binary": false, "data": "<b64>", "text": "<utf-8>"}],
//    "pongs": ["<b64>"], "close": {"code": 1000, "reason": "<utf-8>"},
//    "error": null, "timed_out": false}
'use strict';

const WebSocket = require('ws');

function readStdin() {
  return new Promise((resolve, reject) => {
    const chunks = [];
    process.stdin.on('data', (c) => chunks.push(c));
    process.stdin.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    process.stdin.on('error', reject);
  });
}

function b64(buf) {
  return Buffer.from(buf).toString('base64');
}

function unb64(s) {
  return Buffer.from(s, 'base64');
}

async function main() {
  const script = JSON.parse(await readStdin());
  const report = { opened: false, messages: [], pongs: [], close: null, error: null, timed_out: false };
  let pingsSent = 0;
  let closing = false;
  let done = false;

  function finish(code) {
    if (done) return;
    done = true;
    process.stdout.write(JSON.stringify(report) + '\n', () => process.exit(code));
  }

  const ws = new WebSocket(script.url);
  const timer = setTimeout(() => {
    report.timed_out = true;
    ws.terminate();
    finish(1);
  }, script.timeout_ms || 10000);

  function maybeClose() {
    if (closing || !script.close) return;
    if (report.messages.length >= script.expect_messages && report.pongs.length >= pingsSent) {
      closing = true;
      ws.close(script.close.code, script.close.reason);
    }
  }

  ws.on('open', () => {
    report.opened = true;
    for (const step of script.steps) {
      switch (step.op) {
        case 'text':
          ws.send(step.data);
          break;
        case 'binary':
          ws.send(unb64(step.data), { binary: true });
          break;
        case 'fragments':
          // Every part but the last with fin: false; ws sends the first as a
          // text or binary frame and the rest as continuation frames.
          step.parts.forEach((p, i) => {
            ws.send(unb64(p), { binary: !!step.binary, fin: i === step.parts.length - 1 });
          });
          break;
        case 'ping':
          pingsSent++;
          ws.ping(unb64(step.data));
          break;
        default:
          throw new Error('unknown step ' + step.op);
      }
    }
    maybeClose();
  });
  ws.on('message', (data, isBinary) => {
    const m = { binary: isBinary, data: b64(data) };
    if (!isBinary) m.text = Buffer.from(data).toString('utf8');
    report.messages.push(m);
    maybeClose();
  });
  ws.on('pong', (data) => {
    report.pongs.push(b64(data));
    maybeClose();
  });
  ws.on('error', (err) => {
    report.error = String(err && err.message ? err.message : err);
  });
  ws.on('close', (code, reason) => {
    clearTimeout(timer);
    report.close = { code: code, reason: reason.toString('utf8') };
    finish(0);
  });
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({ error: String(err && err.stack ? err.stack : err) }) + '\n', () =>
    process.exit(2));
});
