// A small KiteQ client for Node.js, written from proto/PROTOCOL.md and the .proto files
// alone: the conformance kit's client (tests/interop/README.md).
//
// It keeps grpc-js's channel defaults (a 4 MiB receive limit) unless told otherwise, and
// announces that limit in Open.maxReceiveBytes, so the broker splits what would not fit.
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const { EventEmitter } = require('node:events');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const zookeeper = require('node-zookeeper-client');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTOCOL_VERSION = 1;
// grpc-js's default max receive message length
const GRPC_DEFAULT_RECEIVE = 4 * 1024 * 1024;

const definition = protoLoader.loadSync('kiteq/proto/v1/broker.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: Number,
  enums: String,
  bytes: Buffer,
  defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).kiteq.proto.v1;

function newMessageId() {
  return crypto.randomBytes(16).toString('hex');
}

// A Message as PROTOCOL.md says to build one: commit must be set for a plain message.
function message({ topic, messageType, body, commit = true, id = newMessageId(), ...header }) {
  return {
    header: { messageId: id, topic, messageType, commit, ...header },
    body: Buffer.isBuffer(body) ? body : Buffer.from(body ?? ''),
  };
}

class Session extends EventEmitter {
  // options: { channelOptions, maxReceiveBytes } — maxReceiveBytes defaults to the
  // channel's receive limit (grpc-js default 4 MiB).
  constructor(address, { channelOptions = {}, maxReceiveBytes } = {}) {
    super();
    this.client = new v1.Broker(address, grpc.credentials.createInsecure(), channelOptions);
    this.maxReceiveBytes =
      maxReceiveBytes ?? channelOptions['grpc.max_receive_message_length'] ?? GRPC_DEFAULT_RECEIVE;
    this.waiting = new Map(); // message id -> resolve(StoreAck)
    this.partial = null; // a delivery whose body is still arriving in BodyPart frames
    this.call = this.client.Session();
    this.ended = new Promise((resolve) => {
      this.call.on('error', (err) => resolve({ code: err.code, details: err.details }));
      this.call.on('end', () => resolve({ code: grpc.status.OK, details: '' }));
    });
    this.call.on('data', (frame) => this.onFrame(frame));
  }

  // Send `open` and resolve with the Opened frame (or reject with the call's status).
  open({ groupId, secretKey = '', bindings = [], maxInFlight = 0, ...rest }) {
    const opened = new Promise((resolve, reject) => {
      this.once('opened', resolve);
      this.ended.then((status) => reject(Object.assign(new Error(status.details), status)));
    });
    this.call.write({
      open: {
        groupId,
        secretKey,
        clientId: `node-${process.pid}`,
        bindings,
        maxInFlight,
        protocolVersion: PROTOCOL_VERSION,
        maxReceiveBytes: this.maxReceiveBytes,
        ...rest,
      },
    });
    return opened;
  }

  onFrame(frame) {
    switch (frame.kind) {
      case 'opened':
        this.emit('opened', frame.opened);
        break;
      case 'storeAcks':
        // acks of one publish may be split over frames and mixed with others: match by id
        for (const ack of frame.storeAcks.acks) {
          const resolve = this.waiting.get(ack.messageId.toLowerCase());
          if (resolve) {
            this.waiting.delete(ack.messageId.toLowerCase());
            resolve(ack);
          }
          this.emit('storeAck', ack);
        }
        break;
      case 'deliveries':
        for (const delivery of frame.deliveries.deliveries) {
          if (delivery.bodyBytes > delivery.message.body.length) {
            this.partial = { delivery, parts: [delivery.message.body], have: delivery.message.body.length };
          } else {
            this.emit('delivery', delivery);
          }
        }
        this.emit('frame', frame);
        break;
      case 'bodyPart': {
        const partial = this.partial;
        if (!partial || partial.delivery.message.header.messageId !== frame.bodyPart.messageId) {
          this.emit('protocolError', new Error(`unexpected bodyPart ${frame.bodyPart.messageId}`));
          break;
        }
        partial.parts.push(frame.bodyPart.data);
        partial.have += frame.bodyPart.data.length;
        if (partial.have >= partial.delivery.bodyBytes) {
          partial.delivery.message.body = Buffer.concat(partial.parts);
          this.partial = null;
          this.emit('delivery', partial.delivery);
        }
        this.emit('frame', frame);
        break;
      }
      case 'checks':
        for (const check of frame.checks.checks) this.emit('check', check);
        break;
      default:
        this.emit('protocolError', new Error(`unknown frame ${frame.kind}`));
    }
  }

  // Publish one batch; resolves with its StoreAcks in the order of `messages`.
  publish(messages) {
    const acks = messages.map(
      (m) => new Promise((resolve) => this.waiting.set(m.header.messageId.toLowerCase(), resolve)),
    );
    this.call.write({ publish: { messages } });
    return Promise.all(acks);
  }

  ack(items) {
    this.call.write({ acks: { acks: items.map(([messageId, status]) => ({ messageId, status })) } });
  }

  tx(items) {
    this.call.write({ tx: { acks: items.map(([messageId, topic, status]) => ({ messageId, topic, status })) } });
  }

  // Write a raw ClientFrame (for the golden tests of refusals).
  send(frame) {
    this.call.write(frame);
  }

  close() {
    this.call.end();
    return this.ended.finally(() => this.client.close());
  }

  cancel() {
    this.call.cancel();
    this.client.close();
  }
}

// Unary Publish: resolves with PublishResponse, rejects with the call's status.
function publishUnary(address, request) {
  const client = new v1.Broker(address, grpc.credentials.createInsecure());
  return new Promise((resolve, reject) => {
    client.Publish(request, (err, response) => {
      client.close();
      if (err) reject(err);
      else resolve(response);
    });
  });
}

// Broker addresses serving `topic`, from /kiteq/server/{topic}/{host:port} node data.
function discover(connectionString, topic, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    const zk = zookeeper.createClient(connectionString, { sessionTimeout: 10000 });
    const timer = setTimeout(() => {
      zk.close();
      reject(new Error('zookeeper: no connection'));
    }, timeoutMs);
    zk.once('connected', () => {
      zk.getChildren(`/kiteq/server/${topic}`, (err, children) => {
        if (err) {
          clearTimeout(timer);
          zk.close();
          reject(err);
          return;
        }
        const found = [];
        let left = children.length;
        if (left === 0) {
          clearTimeout(timer);
          zk.close();
          resolve(found);
        }
        for (const child of children) {
          zk.getData(`/kiteq/server/${topic}/${child}`, (e, data) => {
            if (!e && data && data.length) found.push(JSON.parse(data.toString('utf8')));
            if (--left === 0) {
              clearTimeout(timer);
              zk.close();
              resolve(found);
            }
          });
        }
      });
    });
    zk.connect();
  });
}

module.exports = { Session, message, newMessageId, publishUnary, discover, grpc, GRPC_DEFAULT_RECEIVE };
