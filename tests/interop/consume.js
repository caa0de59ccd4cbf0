// node consume.js ADDRESS GROUP SECRET TOPIC TYPE COUNT TIMEOUT_S
// Consumes with grpc-js's default channel options until COUNT distinct messages arrived
// (acking each), prints "ready" once opened, then one JSON line:
// {"ids": [distinct ids], "deliveries": n, "maxAttempt": n}. Exit 1 on timeout.
'use strict';

const { Session } = require('./kiteq');

async function main() {
  const [address, groupId, secretKey, topic, messageType, count, timeout] = process.argv.slice(2);
  const session = new Session(address);
  const seen = new Set();
  let deliveries = 0;
  let maxAttempt = 0;
  const done = new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), Number(timeout) * 1000);
    session.on('delivery', (delivery) => {
      deliveries += 1;
      maxAttempt = Math.max(maxAttempt, delivery.attempt);
      const id = delivery.message.header.messageId;
      seen.add(id);
      session.ack([[id, true]]);
      if (seen.size >= Number(count)) {
        clearTimeout(timer);
        resolve(true);
      }
    });
  });
  await session.open({
    groupId,
    secretKey,
    bindings: [{ topic, messageType, bindType: 'BIND_TYPE_DIRECT', persistent: true }],
    maxInFlight: 1000,
  });
  process.stdout.write('ready\n');
  const complete = await done;
  await session.close();
  process.stdout.write(`${JSON.stringify({ ids: [...seen], deliveries, maxAttempt })}\n`);
  process.exitCode = complete ? 0 : 1;
}

main().catch((err) => {
  process.stderr.write(`${err.stack}\n`);
  process.exitCode = 2;
});
