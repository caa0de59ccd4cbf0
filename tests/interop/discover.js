// node discover.js ZK_HOSTS[/chroot] TOPIC GROUP
// What a client in another language does with ZooKeeper (PROTOCOL.md, "ZooKeeper"): find
// the brokers of TOPIC, open a consumer session on one with a binding, read back the
// group's binding node the broker wrote, publish a message and receive it. Prints one
// JSON line: {"brokers": [...node data], "bindNode": [...], "received": id, "sent": id}.
'use strict';

const zookeeper = require('node-zookeeper-client');
const { Session, message, discover } = require('./kiteq');

function readNode(hosts, path) {
  return new Promise((resolve, reject) => {
    const zk = zookeeper.createClient(hosts, { sessionTimeout: 10000 });
    zk.once('connected', () => {
      zk.getData(path, (err, data) => {
        zk.close();
        if (err) reject(err);
        else resolve(JSON.parse(data.toString('utf8')));
      });
    });
    zk.connect();
  });
}

async function main() {
  const [hosts, topic, group] = process.argv.slice(2);
  const brokers = await discover(hosts, topic);
  if (brokers.length === 0) throw new Error(`no broker serves ${topic}`);
  const address = brokers[0].grpc;
  const consumer = new Session(address);
  const received = new Promise((resolve) => {
    consumer.on('delivery', (d) => {
      consumer.ack([[d.message.header.messageId, true]]);
      resolve(d.message.header.messageId);
    });
  });
  await consumer.open({
    groupId: group,
    bindings: [{ topic, messageType: 'created', bindType: 'BIND_TYPE_DIRECT', persistent: true }],
  });
  const bindNode = await readNode(hosts, `/kiteq/sub/${topic}/${group}-bind`);
  const producer = new Session(address);
  await producer.open({ groupId: `${group}-producer` });
  const m = message({ topic, messageType: 'created', body: 'hello from node' });
  const [ack] = await producer.publish([m]);
  if (!ack.status) throw new Error(`refused: ${ack.code} ${ack.feedback}`);
  const id = await Promise.race([
    received,
    new Promise((_, reject) => setTimeout(() => reject(new Error('no delivery')), 30000)),
  ]);
  await Promise.all([producer.close(), consumer.close()]);
  process.stdout.write(`${JSON.stringify({ brokers, bindNode, received: id, sent: m.header.messageId })}\n`);
}

main().catch((err) => {
  process.stderr.write(`${err.stack}\n`);
  process.exitCode = 2;
});
