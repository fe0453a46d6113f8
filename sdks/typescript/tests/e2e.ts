// The TypeScript SDK against the real running system (run by
// tests/e2e/sdks.rs): create and wait, replay, get, list, watch, cancel,
// and read a refusal. ORDERS_URL (http://host:port), API_KEY.
// Prints TYPESCRIPT_SDK_OK when every check holds.
import assert from "node:assert/strict";

import { Code, ConnectError, fieldViolationsOf, OrderClient, OrderStatus, refusalOf, requestIdOf } from "../src/index.js";

const client = new OrderClient({ baseUrl: process.env.ORDERS_URL!, apiKey: process.env.API_KEY! });
const address = { recipient: "Grace Hopper", line1: "1 Navy Yard", city: "Berlin", postalCode: "10115", country: "DE" };

const done = await client.createOrder("alice", [["BOOK", 1]], address, { wait: true });
assert.equal(done.status, OrderStatus.COMPLETED, `${OrderStatus[done.status]}: ${done.failureReason}`);
assert.deepEqual(done.steps.map((s) => s.name), ["reserve_stock", "prepare_shipment", "charge_payment"]);

const again = await client.createOrder("alice", [["BOOK", 1]], address, { requestId: done.requestId, wait: true });
assert.equal(again.orderId, done.orderId, "the same request_id is the same order");

const got = await client.getOrder(done.orderId);
assert.equal(got.status, OrderStatus.COMPLETED);
const page = await client.listOrders({ customerId: "alice", statuses: [OrderStatus.COMPLETED], pageSize: 50 });
assert.ok(page.orders.some((o) => o.orderId === done.orderId), "listed");

let placed = await client.createOrder("alice", [["BOOK", 1]], address);
const seen: OrderStatus[] = [];
for await (const order of client.watchOrder(placed.orderId)) seen.push(order.status);
assert.equal(seen.at(-1), OrderStatus.COMPLETED, `watched ${seen}`);

placed = await client.createOrder("alice", [["BOOK", 1]], address);
await client.cancelOrder(placed.orderId, { reason: "changed my mind" });
const until = Date.now() + 30_000;
while ((await client.getOrder(placed.orderId)).status !== OrderStatus.CANCELLED) {
  assert.ok(Date.now() < until, "cancelled within 30 s");
  await new Promise((r) => setTimeout(r, 100));
}

await assert.rejects(
  client.createOrder("alice", [["BOOK", 1]], { ...address, country: "Germany" }),
  (err: unknown) => {
    assert.ok(err instanceof ConnectError);
    assert.equal(err.code, Code.InvalidArgument);
    assert.match(err.rawMessage, /shipping_address\.country/);
    assert.deepEqual(fieldViolationsOf(err).map((v) => v.field), ["shipping_address.country"]);
    assert.equal(requestIdOf(err), undefined, "a definite refusal needs no retry");
    return true;
  },
);
// A rich refusal: the reason and its domain, without parsing the text.
await assert.rejects(client.createOrder("alice", [["NOPE", 1]], address), (err: unknown) => {
  assert.equal(ConnectError.from(err).code, Code.NotFound);
  assert.deepEqual(refusalOf(err), { reason: "UNKNOWN_SKU", domain: "orders.v1" });
  assert.deepEqual(fieldViolationsOf(err).map((v) => v.field), ["items[0].sku"]);
  return true;
});
await assert.rejects(
  new OrderClient({ baseUrl: process.env.ORDERS_URL!, apiKey: "not-a-key" }).getOrder(done.orderId),
  (err: unknown) =>
    err instanceof ConnectError && err.code === Code.Unauthenticated && refusalOf(err)?.reason === "API_KEY_INVALID",
);

console.log("TYPESCRIPT_SDK_OK");
