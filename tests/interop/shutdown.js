// node shutdown.js ADDRESS
// Opens a producer session, prints "ready", and prints the status code the call ends with
// when the broker shuts down (PROTOCOL.md §8.1: UNAVAILABLE, 14).
'use strict';

const { Session } = require('./kiteq');

async function main() {
  const session = new Session(process.argv[2]);
  await session.open({ groupId: 'node', secretKey: 'right' });
  process.stdout.write('ready\n');
  const status = await session.ended;
  session.cancel();
  process.stdout.write(`${JSON.stringify(status)}\n`);
}

main().catch((err) => {
  process.stderr.write(`${err.stack}\n`);
  process.exitCode = 2;
});
