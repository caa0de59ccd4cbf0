// node produce.js ADDRESS GROUP SECRET TOPIC TYPE COUNT
// Publishes COUNT messages (bodies "n:<i>") in batches of 500 and prints one JSON line:
// {"sent": [ids stored], "failed": n}. Exit 1 when any message was refused.
'use strict';

const { Session, message } = require('./kiteq');

async function main() {
  const [address, groupId, secretKey, topic, messageType, count] = process.argv.slice(2);
  const session = new Session(address);
  await session.open({ groupId, secretKey });
  const sent = [];
  let failed = 0;
  for (let start = 0; start < Number(count); start += 500) {
    const batch = [];
    for (let i = start; i < Math.min(start + 500, Number(count)); i += 1) {
      batch.push(message({ topic, messageType, body: `n:${i}`, properties: { i: String(i) } }));
    }
    for (const ack of await session.publish(batch)) {
      if (ack.status) sent.push(ack.messageId);
      else failed += 1;
    }
  }
  await session.close();
  process.stdout.write(`${JSON.stringify({ sent, failed })}\n`);
  process.exitCode = failed ? 1 : 0;
}

main().catch((err) => {
  process.stderr.write(`${err.stack}\n`);
  process.exitCode = 2;
});
