// A thin client of `orders.v1.OrderService` over gRPC (Connect for Node).
//
// It only removes boilerplate: each method is one RPC; it sends the API key,
// gives each call a deadline, and each mutating call a `requestId` (its
// idempotency key) unless one is given. A failure is the server's status,
// unchanged, as a `ConnectError` (`code`, `rawMessage`); `requestIdOf(err)`
// says with which request ID a retry is safe after an unknown outcome.
// The messages are generated from proto/ into ./gen (npm run generate).

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { randomUUID } from "node:crypto";

import {
  CancelOrderRequestSchema,
  CreateOrderRequestSchema,
  ListOrdersRequestSchema,
  OrderService,
  type ListOrdersResponse,
  type Order,
  type OrderStatus,
  ShippingAddressSchema,
} from "./gen/orders/v1/orders_pb.js";

import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

export * from "./gen/orders/v1/orders_pb.js";
export { Code, ConnectError };

export const API_KEY_HEADER = "x-api-key";

/** Codes after which a mutating call may or may not have taken effect. */
const UNKNOWN_OUTCOME = new Set([Code.Unavailable, Code.DeadlineExceeded, Code.Unknown, Code.Internal]);

const REQUEST_ID = Symbol("requestId");

/**
 * Why a call was refused, from its `google.rpc.ErrorInfo`: a stable reason
 * (e.g. "INSUFFICIENT_FUNDS") and its domain (the proto package, e.g.
 * "payment.v1", or "ordersaga" for the shared ones). Branch on it, not on the text.
 */
export function refusalOf(err: unknown): { reason: string; domain: string } | undefined {
  const [info] = ConnectError.from(err).findDetails(ErrorInfoSchema);
  return info ? { reason: info.reason, domain: info.domain } : undefined;
}

/** The fields a malformed request got wrong (`google.rpc.BadRequest`): path and description. */
export function fieldViolationsOf(err: unknown): { field: string; description: string }[] {
  return ConnectError.from(err)
    .findDetails(BadRequestSchema)
    .flatMap((bad) => bad.fieldViolations.map((v) => ({ field: v.field, description: v.description })));
}

/** The request ID a retry of the failed call must reuse, when its outcome is unknown. */
export function requestIdOf(err: unknown): string | undefined {
  return err instanceof ConnectError ? (err as ConnectError & { [REQUEST_ID]?: string })[REQUEST_ID] : undefined;
}

export interface OrderClientOptions {
  /** e.g. "http://127.0.0.1:50051" (https:// for TLS). */
  baseUrl: string;
  apiKey: string;
  /** Each call's deadline, in ms (default 10 s); `wait` calls get `waitTimeoutMs` (30 s). */
  timeoutMs?: number;
  waitTimeoutMs?: number;
}

export type Item = [sku: string, quantity: number];

export class OrderClient {
  private readonly client: Client<typeof OrderService>;
  private readonly timeoutMs: number;
  private readonly waitTimeoutMs: number;

  constructor(options: OrderClientOptions) {
    if (!options.apiKey) {
      throw new Error("apiKey is required: the service's APPLICATION_API_KEY (or the admin key for operator actions)");
    }
    const withKey: Interceptor = (next) => (request) => {
      request.header.set(API_KEY_HEADER, options.apiKey);
      return next(request);
    };
    const transport = createGrpcTransport({ baseUrl: options.baseUrl, interceptors: [withKey] });
    this.client = createClient(OrderService, transport);
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.waitTimeoutMs = options.waitTimeoutMs ?? 30_000;
  }

  /** Runs a mutating call; on an unknown outcome the error carries its request ID. */
  private async mutating<T>(requestId: string, call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (err) {
      const failure = ConnectError.from(err);
      if (UNKNOWN_OUTCOME.has(failure.code)) {
        (failure as ConnectError & { [REQUEST_ID]?: string })[REQUEST_ID] = requestId;
      }
      throw failure;
    }
  }

  /** Records the order and starts its saga; with `wait`, replies when it ends. */
  async createOrder(
    customerId: string,
    items: Item[],
    address: MessageInitShape<typeof ShippingAddressSchema>,
    opts: { requestId?: string; wait?: boolean } = {},
  ): Promise<Order> {
    const requestId = opts.requestId ?? randomUUID();
    const request = create(CreateOrderRequestSchema, {
      requestId,
      customerId,
      items: items.map(([sku, quantity]) => ({ sku, quantity: BigInt(quantity) })),
      shippingAddress: address,
      wait: opts.wait ?? false,
    });
    const timeoutMs = opts.wait ? this.waitTimeoutMs : this.timeoutMs;
    const reply = await this.mutating(requestId, () => this.client.createOrder(request, { timeoutMs }));
    return reply.order!;
  }

  async getOrder(orderId: string): Promise<Order> {
    return (await this.client.getOrder({ orderId }, { timeoutMs: this.timeoutMs })).order!;
  }

  /** One page, newest first; pass its `nextPageToken` for the next. */
  async listOrders(
    filter: { customerId?: string; statuses?: OrderStatus[]; pageSize?: number; pageToken?: string } = {},
  ): Promise<ListOrdersResponse> {
    return this.client.listOrders(create(ListOrdersRequestSchema, filter), { timeoutMs: this.timeoutMs });
  }

  /** The order at each change, until it is terminal. */
  async *watchOrder(orderId: string): AsyncGenerator<Order> {
    for await (const update of this.client.watchOrder({ orderId }, { timeoutMs: this.waitTimeoutMs })) {
      if (update.order) yield update.order;
    }
  }

  /** Before payment, its done steps are undone and it ends CANCELLED; after, FAILED_PRECONDITION. */
  async cancelOrder(orderId: string, opts: { reason?: string; requestId?: string } = {}): Promise<Order> {
    const requestId = opts.requestId ?? randomUUID();
    const request = create(CancelOrderRequestSchema, { requestId, orderId, reason: opts.reason ?? "" });
    const reply = await this.mutating(requestId, () => this.client.cancelOrder(request, { timeoutMs: this.timeoutMs }));
    return reply.order!;
  }

  /** Operator action (a client with the admin key). */
  async retryCompensation(orderId: string, requestId: string = randomUUID()): Promise<Order> {
    const reply = await this.mutating(requestId, () =>
      this.client.retryCompensation({ requestId, orderId }, { timeoutMs: this.timeoutMs }),
    );
    return reply.order!;
  }

  /** Operator action (a client with the admin key). */
  async resolveCompensation(orderId: string, operator: string, reason: string, requestId: string = randomUUID()): Promise<Order> {
    const reply = await this.mutating(requestId, () =>
      this.client.resolveCompensation({ requestId, orderId, operator, reason }, { timeoutMs: this.timeoutMs }),
    );
    return reply.order!;
  }
}
