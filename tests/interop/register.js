// node register.js ZK_HOSTS[/chroot] TOPIC GROUP
// A producer of a topic nobody subscribes to, against a broker serving ["*"]: it creates
// its ephemeral /kiteq/pub/{topic}/{group}/{host} node (PROTOCOL.md §9.3) and waits until
// a broker registers under /kiteq/server/{topic}. Prints the broker node data as JSON.
'use strict';

const os = require('node:os');
const zookeeper = require('node-zookeeper-client');

const [hosts, topic, group] = process.argv.slice(2);
const zk = zookeeper.createClient(hosts, { sessionTimeout: 10000 });
const timer = setTimeout(() => {
  process.stderr.write(`no broker registered under /kiteq/server/${topic}\n`);
  process.exit(1);
}, 30000);

function watchServers() {
  zk.getChildren(
    `/kiteq/server/${topic}`,
    () => watchServers(),
    (err, children) => {
      if (err && err.getCode() !== zookeeper.Exception.NO_NODE) throw err;
      if (err) {
        // the topic node does not exist yet: wait for it
        zk.exists(`/kiteq/server/${topic}`, () => watchServers(), () => {});
        return;
      }
      if (children.length === 0) return;
      zk.getData(`/kiteq/server/${topic}/${children[0]}`, (e, data) => {
        if (e) throw e;
        clearTimeout(timer);
        process.stdout.write(`${data.toString('utf8')}\n`);
        zk.close();
      });
    },
  );
}

zk.once('connected', () => {
  const path = `/kiteq/pub/${topic}/${group}/${os.hostname()}`;
  zk.mkdirp(`/kiteq/pub/${topic}/${group}`, (err) => {
    if (err) throw err;
    zk.create(path, Buffer.alloc(0), zookeeper.CreateMode.EPHEMERAL, (e) => {
      if (e) throw e;
      watchServers();
    });
  });
});
zk.connect();
