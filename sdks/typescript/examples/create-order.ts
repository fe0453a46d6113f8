// Creates an order, waits for its saga, and prints how it ended.
//   cd sdks/typescript && npm run build && node dist/examples/create-order.js
// With devstack running (`cargo run -p devstack`): 127.0.0.1:50051, key dev-key.
import { ConnectError, OrderClient, OrderStatus, StepStatus } from "../src/index.js";

const client = new OrderClient({
  baseUrl: process.env.ORDERS_URL ?? "http://127.0.0.1:50051",
  apiKey: process.env.API_KEY ?? "dev-key",
});
try {
  const order = await client.createOrder(
    "alice",
    [["BOOK-1", 1]],
    { recipient: "Ada Lovelace", line1: "1 Main St", city: "Berlin", postalCode: "10115", country: "DE" },
    { wait: true },
  );
  console.log(order.orderId, OrderStatus[order.status]);
  for (const step of order.steps) console.log(`  ${step.name.padEnd(17)} ${StepStatus[step.status]}`);
} catch (err) {
  // err.code is the gRPC status; requestIdOf(err) is set when a retry is safe.
  console.error("refused:", ConnectError.from(err).message);
  process.exitCode = 1;
}
