// Golden tests of proto/PROTOCOL.md against a real broker, from outside Python.
//
// Run by tests/interop/test_node_kit.py, which starts the broker and sets
//   KITEQ_BROKER   host:port of a broker (embedded registry, deliverySeconds 2,
//                  txCheckDelaySeconds 1, group "node" with secret "right")
//   KITEQ_DELIVERY_FIRST_BROKER  the same with deliveryFirst = true
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Session, message, newMessageId, publishUnary, grpc, GRPC_DEFAULT_RECEIVE } = require('./kiteq');

const BROKER = process.env.KITEQ_BROKER;
assert.ok(BROKER, 'KITEQ_BROKER must name the broker under test');
const DELIVERY_FIRST_BROKER = process.env.KITEQ_DELIVERY_FIRST_BROKER;
assert.ok(DELIVERY_FIRST_BROKER, 'KITEQ_DELIVERY_FIRST_BROKER must name a deliveryFirst broker');
const MiB = 1024 * 1024;
const WAIT_MS = 30000;

let counter = 0;
function unique(prefix) {
  counter += 1;
  return `${prefix}-${process.pid}-${counter}`;
}

function direct(topic, messageType) {
  return { topic, messageType, bindType: 'BIND_TYPE_DIRECT', persistent: true };
}

async function producer(group = 'node', secret = 'right', options) {
  const session = new Session(BROKER, options);
  const opened = await session.open({ groupId: group, secretKey: secret });
  return { session, opened };
}

async function consumer(group, bindings, options = {}) {
  const session = new Session(BROKER, options);
  const opened = await session.open({ groupId: group, bindings, maxInFlight: options.maxInFlight ?? 0 });
  return { session, opened };
}

// Resolve with the next `n` deliveries of `session` (rejects after WAIT_MS).
function deliveries(session, n, { ack = true } = {}) {
  return new Promise((resolve, reject) => {
    const got = [];
    const timer = setTimeout(() => reject(new Error(`only ${got.length} of ${n} deliveries`)), WAIT_MS);
    const on = (delivery) => {
      got.push(delivery);
      if (ack) session.ack([[delivery.message.header.messageId, true]]);
      if (got.length === n) {
        clearTimeout(timer);
        session.off('delivery', on);
        resolve(got);
      }
    };
    session.on('delivery', on);
  });
}

function nextCheck(session) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no TxCheck')), WAIT_MS);
    session.once('check', (check) => {
      clearTimeout(timer);
      resolve(check);
    });
  });
}

async function refusedOpen(frames) {
  const session = new Session(BROKER);
  for (const frame of frames) session.send(frame);
  const status = await session.ended;
  session.cancel();
  return status;
}

const openFrame = (fields = {}) => ({
  open: { groupId: 'node', secretKey: 'right', protocolVersion: 1, ...fields },
});

test('opened announces the limits and the keepalive policy', async () => {
  const { session, opened } = await producer();
  assert.equal(opened.protocolVersion, 1);
  assert.equal(opened.maxBatchMessages, 1000);
  assert.equal(opened.maxBatchBytes, 8 * MiB);
  assert.equal(opened.maxBodyBytes, 4 * MiB);
  assert.equal(opened.maxFrameBytes, 13 * MiB);
  assert.equal(opened.sendFrameBytes, GRPC_DEFAULT_RECEIVE);
  assert.deepEqual(
    [opened.maxProperties, opened.maxPropertyKeyBytes, opened.maxPropertyValueBytes],
    [64, 256, 4096],
  );
  assert.equal(opened.maxInFlight, 0); // no bindings, no maxInFlight: a producer
  assert.deepEqual(
    [opened.keepaliveTimeMs, opened.keepaliveTimeoutMs, opened.minPingIntervalMs, opened.maxPingStrikes],
    [30000, 10000, 10000, 2],
  );
  assert.equal(opened.deliverySeconds, 2);
  await session.close();
});

test('maxInFlight: 0 with bindings is 1000, above 10,000 is 10,000', async () => {
  const topic = unique('inflight');
  const a = await consumer(unique('cg'), [direct(topic, 't')]);
  assert.equal(a.opened.maxInFlight, 1000);
  const b = await consumer(unique('cg'), [direct(topic, 't')], { maxInFlight: 50000 });
  assert.equal(b.opened.maxInFlight, 10000);
  const c = new Session(BROKER);
  const small = await c.open({ groupId: unique('cg'), bindings: [direct(topic, 't')], maxInFlight: 7 });
  assert.equal(small.maxInFlight, 7);
  await Promise.all([a.session.close(), b.session.close(), c.close()]);
});

test('a receive limit below 1 MiB is raised to 1 MiB, above 13 MiB capped', async () => {
  const low = new Session(BROKER, { maxReceiveBytes: 1000 });
  assert.equal((await low.open({ groupId: 'node', secretKey: 'right' })).sendFrameBytes, MiB);
  const high = new Session(BROKER, { maxReceiveBytes: 100 * MiB });
  assert.equal((await high.open({ groupId: 'node', secretKey: 'right' })).sendFrameBytes, 13 * MiB);
  await Promise.all([low.close(), high.close()]);
});

test('a wrong secret ends the call with UNAUTHENTICATED (16)', async () => {
  const status = await refusedOpen([openFrame({ secretKey: 'wrong' })]);
  assert.equal(status.code, grpc.status.UNAUTHENTICATED);
});

test('a first frame that is not open: INVALID_ARGUMENT (3)', async () => {
  const status = await refusedOpen([{ publish: { messages: [] } }]);
  assert.equal(status.code, grpc.status.INVALID_ARGUMENT);
  assert.match(status.details, /first frame must be 'open'/);
});

test('protocolVersion 0 or 2: INVALID_ARGUMENT naming the version spoken', async () => {
  for (const version of [0, 2]) {
    const status = await refusedOpen([openFrame({ protocolVersion: version })]);
    assert.equal(status.code, grpc.status.INVALID_ARGUMENT, `version ${version}`);
    assert.match(status.details, new RegExp(`protocolVersion ${version} is not supported: this broker speaks 1`));
  }
});

test('a second open frame ends the call with INVALID_ARGUMENT', async () => {
  const session = new Session(BROKER);
  await session.open({ groupId: 'node', secretKey: 'right' });
  session.send(openFrame());
  const status = await session.ended;
  assert.equal(status.code, grpc.status.INVALID_ARGUMENT);
  assert.match(status.details, /second 'open'/);
  session.cancel();
});

test('an invalid group name: INVALID_ARGUMENT', async () => {
  const status = await refusedOpen([openFrame({ groupId: 'bad/group' })]);
  assert.equal(status.code, grpc.status.INVALID_ARGUMENT);
});

test('store-acks say stored, then duplicate, in disposition (never in text)', async () => {
  const { session } = await producer();
  const m = message({ topic: unique('dup'), messageType: 't', body: 'x' });
  const [first] = await session.publish([m]);
  assert.deepEqual([first.status, first.code, first.disposition], [true, 'ERROR_CODE_OK', 'STORE_DISPOSITION_STORED']);
  const [again] = await session.publish([m]);
  assert.deepEqual([again.status, again.code, again.disposition], [true, 'ERROR_CODE_OK', 'STORE_DISPOSITION_DUPLICATE']);
  // the id in any case is the same message
  const upper = { ...m, header: { ...m.header, messageId: m.header.messageId.toUpperCase() } };
  const [third] = await session.publish([upper]);
  assert.equal(third.disposition, 'STORE_DISPOSITION_DUPLICATE');
  await session.close();
});

test('fly messages are acked FLY', async () => {
  const { session } = await producer();
  const [ack] = await session.publish([message({ topic: unique('fly'), messageType: 't', body: 'x', fly: true })]);
  assert.deepEqual([ack.code, ack.disposition], ['ERROR_CODE_OK', 'STORE_DISPOSITION_FLY']);
  await session.close();
});

test('per-message codes: too large, expired, snappy, another group, bad id', async () => {
  const { session } = await producer();
  const topic = unique('codes');
  const cases = [
    [message({ topic, messageType: 't', body: Buffer.alloc(4 * MiB + 1) }), 'ERROR_CODE_TOO_LARGE'],
    [message({ topic, messageType: 't', body: 'x', expiredTime: 1000 }), 'ERROR_CODE_EXPIRED'],
    [message({ topic, messageType: 't', body: 'x', snappy: true }), 'ERROR_CODE_INVALID_ARGUMENT'],
    [message({ topic, messageType: 't', body: 'x', groupId: 'someone-else' }), 'ERROR_CODE_PERMISSION_DENIED'],
    [message({ topic, messageType: 't', body: 'x', id: 'not-hex' }), 'ERROR_CODE_INVALID_ARGUMENT'],
    [message({ topic: 'bad/topic', messageType: 't', body: 'x' }), 'ERROR_CODE_INVALID_ARGUMENT'],
    [message({ topic, messageType: 't', body: 'ok' }), 'ERROR_CODE_OK'],
  ];
  const acks = await session.publish(cases.map(([m]) => m));
  assert.deepEqual(acks.map((a) => a.code), cases.map(([, code]) => code));
  assert.deepEqual(acks.map((a) => a.status), cases.map(([, code]) => code === 'ERROR_CODE_OK'));
  await session.close();
});

test('maxBatchBytes is enforced per message; the session goes on', async () => {
  const { session } = await producer();
  const topic = unique('batch');
  const batch = Array.from({ length: 9 }, () => message({ topic, messageType: 't', body: Buffer.alloc(MiB) }));
  const acks = await session.publish(batch);
  assert.deepEqual(
    acks.map((a) => a.code),
    [...Array(8).fill('ERROR_CODE_OK'), 'ERROR_CODE_BATCH_TOO_LARGE'],
  );
  const [retry] = await session.publish([batch[8]]);
  assert.equal(retry.code, 'ERROR_CODE_OK');
  await session.close();
});

test('more than maxBatchMessages: every message INVALID_ARGUMENT', async () => {
  const { session } = await producer();
  const topic = unique('count');
  const acks = await session.publish(Array.from({ length: 1001 }, () => message({ topic, messageType: 't', body: 'x' })));
  assert.ok(acks.every((a) => a.code === 'ERROR_CODE_INVALID_ARGUMENT'));
  await session.close();
});

test('a frame above maxFrameBytes ends the call with RESOURCE_EXHAUSTED (8)', async () => {
  const { session } = await producer();
  const topic = unique('frame');
  session.send({ publish: { messages: Array.from({ length: 4 }, () => message({ topic, messageType: 't', body: Buffer.alloc(4 * MiB) })) } });
  const status = await session.ended;
  assert.equal(status.code, grpc.status.RESOURCE_EXHAUSTED);
  session.cancel();
});

test('a default-configured consumer receives a maximum-size body, split under 4 MiB', async () => {
  const topic = unique('big');
  const c = await consumer(unique('big'), [direct(topic, 't')]);
  const { session } = await producer();
  const body = crypto.randomBytes(4 * MiB);
  const frames = [];
  c.session.on('frame', (frame) => frames.push(frame.kind));
  const got = deliveries(c.session, 1);
  const [ack] = await session.publish([message({ topic, messageType: 't', body })]);
  assert.equal(ack.code, 'ERROR_CODE_OK');
  const [delivery] = await got;
  assert.equal(delivery.attempt, 1);
  assert.equal(delivery.bodyBytes, body.length);
  assert.ok(delivery.message.body.equals(body));
  assert.ok(frames.includes('bodyPart'));
  await Promise.all([session.close(), c.session.close()]);
});

test('delivery batches are split under the default receive limit', async () => {
  const topic = unique('many');
  const c = await consumer(unique('many'), [direct(topic, 't')]);
  const { session } = await producer();
  const got = deliveries(c.session, 24);
  for (let i = 0; i < 3; i += 1) {
    const acks = await session.publish(Array.from({ length: 8 }, () => message({ topic, messageType: 't', body: Buffer.alloc(MiB - 1024) })));
    assert.ok(acks.every((a) => a.code === 'ERROR_CODE_OK'));
  }
  const all = await got;
  assert.equal(new Set(all.map((d) => d.message.header.messageId)).size, 24);
  await Promise.all([session.close(), c.session.close()]);
});

test('a nack is redelivered with attempt 2', async () => {
  const topic = unique('nack');
  const c = await consumer(unique('nack'), [direct(topic, 't')]);
  const { session } = await producer();
  const first = deliveries(c.session, 1, { ack: false });
  const m = message({ topic, messageType: 't', body: 'retry me' });
  await session.publish([m]);
  const [d1] = await first;
  assert.equal(d1.attempt, 1);
  const second = deliveries(c.session, 1);
  c.session.ack([[m.header.messageId, false]]);
  const [d2] = await second;
  assert.equal(d2.message.header.messageId, m.header.messageId);
  assert.equal(d2.attempt, 2);
  await Promise.all([session.close(), c.session.close()]);
});

test("an ack on another session of the group settles nothing: redelivered after deliverySeconds", async () => {
  const topic = unique('scope');
  const group = unique('scope');
  const c = await consumer(group, [direct(topic, 't')]);
  const other = new Session(BROKER);
  await other.open({ groupId: group });
  const { session } = await producer();
  const first = deliveries(c.session, 1, { ack: false });
  const m = message({ topic, messageType: 't', body: 'x' });
  await session.publish([m]);
  await first;
  const again = deliveries(c.session, 1);
  other.ack([[m.header.messageId, true]]);
  const [d2] = await again;
  assert.equal(d2.attempt, 2);
  await Promise.all([session.close(), c.session.close(), other.close()]);
});

test('header.commit left false is a half-transaction: stored, checked, not delivered', async () => {
  const topic = unique('half');
  const c = await consumer(unique('half'), [direct(topic, 't')]);
  const { session } = await producer();
  const half = { header: { messageId: newMessageId(), topic, messageType: 't' }, body: Buffer.from('h') };
  const check = nextCheck(session);
  const [ack] = await session.publish([half]);
  assert.deepEqual([ack.code, ack.disposition], ['ERROR_CODE_OK', 'STORE_DISPOSITION_STORED']);
  const asked = await check; // the broker holds it and asks the producer
  assert.equal(asked.header.messageId, half.header.messageId);
  assert.equal(asked.check, 1);
  // a committed message published after it arrives, the half one does not
  const plain = message({ topic, messageType: 't', body: 'p' });
  const got = deliveries(c.session, 1);
  await session.publish([plain]);
  const [d] = await got;
  assert.equal(d.message.header.messageId, plain.header.messageId);
  session.tx([[half.header.messageId, topic, 'TX_STATUS_ROLLBACK']]);
  await Promise.all([session.close(), c.session.close()]);
});

test('transactions: commit delivers, rollback never, a check answered COMMIT delivers', async () => {
  const topic = unique('tx');
  const c = await consumer(unique('tx'), [direct(topic, 't')]);
  const { session } = await producer();
  const committed = message({ topic, messageType: 't', body: 'c', commit: false });
  const rolled = message({ topic, messageType: 't', body: 'r', commit: false });
  const checked = message({ topic, messageType: 't', body: 'k', commit: false });
  const acks = await session.publish([committed, rolled, checked]);
  assert.ok(acks.every((a) => a.code === 'ERROR_CODE_OK'));
  const got = deliveries(c.session, 2);
  session.on('check', (check) => {
    if (check.header.messageId === checked.header.messageId) {
      session.tx([[check.header.messageId, topic, 'TX_STATUS_COMMIT']]);
    }
  });
  session.tx([
    [committed.header.messageId, topic, 'TX_STATUS_COMMIT'],
    [rolled.header.messageId, topic, 'TX_STATUS_ROLLBACK'],
  ]);
  const ids = (await got).map((d) => d.message.header.messageId).sort();
  assert.deepEqual(ids, [committed.header.messageId, checked.header.messageId].sort());
  await Promise.all([session.close(), c.session.close()]);
});

test("a TxAck for another group's message: PERMISSION_DENIED store-ack", async () => {
  const { session } = await producer();
  const other = new Session(BROKER);
  await other.open({ groupId: unique('other') });
  const m = message({ topic: unique('deny'), messageType: 't', body: 'x', commit: false });
  await session.publish([m]);
  const refused = new Promise((resolve) => other.on('storeAck', resolve));
  other.tx([[m.header.messageId, m.header.topic, 'TX_STATUS_COMMIT']]);
  const ack = await refused;
  assert.deepEqual([ack.messageId, ack.status, ack.code], [m.header.messageId, false, 'ERROR_CODE_PERMISSION_DENIED']);
  session.tx([[m.header.messageId, m.header.topic, 'TX_STATUS_ROLLBACK']]);
  await Promise.all([session.close(), other.close()]);
});

test('unary Publish: acks with dispositions; a wrong secret is UNAUTHENTICATED', async () => {
  const m = message({ topic: unique('unary'), messageType: 't', body: 'x' });
  const response = await publishUnary(BROKER, { groupId: 'node', secretKey: 'right', messages: [m] });
  assert.deepEqual(response.acks.map((a) => a.disposition), ['STORE_DISPOSITION_STORED']);
  await assert.rejects(
    publishUnary(BROKER, { groupId: 'node', secretKey: 'wrong', messages: [m] }),
    (err) => err.code === grpc.status.UNAUTHENTICATED,
  );
});

test('deliveryFirst: a message acked by every group before it was stored is acked DELIVERED', async () => {
  const topic = unique('first');
  const c = new Session(DELIVERY_FIRST_BROKER);
  await c.open({ groupId: unique('first'), bindings: [direct(topic, 't')] });
  const p = new Session(DELIVERY_FIRST_BROKER);
  await p.open({ groupId: 'node', secretKey: 'right' });
  const got = deliveries(c, 1);
  const m = message({ topic, messageType: 't', body: 'x' });
  const [ack] = await p.publish([m]);
  assert.deepEqual([ack.code, ack.disposition], ['ERROR_CODE_OK', 'STORE_DISPOSITION_DELIVERED']);
  const [d] = await got;
  assert.equal(d.message.header.messageId, m.header.messageId);
  await Promise.all([p.close(), c.close()]);
});
