"""A thin client of ``orders.v1.OrderService``.

It only removes boilerplate: each method is one RPC, and a failure is the
server's status code and message, unchanged, as ``OrderServiceError``, so a
caller can tell a retryable ``UNAVAILABLE`` from a definite ``FAILED_PRECONDITION``.
"""

import uuid
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orders.v1 import orders_pb2, orders_pb2_grpc

API_KEY_HEADER = "x-api-key"

# Codes after which a mutating call may or may not have taken effect: retry
# it with the same request_id (kept on the error).
_UNKNOWN_OUTCOME = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


class OrderServiceError(Exception):
    """A call the server (or the network) refused.

    ``code`` is the ``grpc.StatusCode``; ``message`` the server's text.
    ``reason`` and ``domain`` come from the refusal's ``google.rpc.ErrorInfo``
    (e.g. ``INSUFFICIENT_FUNDS`` in ``payment.v1``): branch on them, not on
    the text. ``field_violations`` lists ``(field, description)`` from its
    ``google.rpc.BadRequest`` (e.g. ``shipping_address.country``).
    ``request_id`` is set for a mutating call whose outcome is unknown:
    retrying with it is safe.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        request_id: Optional[str] = None,
        reason: str = "",
        domain: str = "",
        field_violations: Sequence[Tuple[str, str]] = (),
    ):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.reason = reason
        self.domain = domain
        self.field_violations = list(field_violations)

    @property
    def outcome_unknown(self) -> bool:
        return self.code in _UNKNOWN_OUTCOME


def _error(err: grpc.RpcError, request_id: Optional[str] = None) -> OrderServiceError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    unknown = code in _UNKNOWN_OUTCOME
    reason, domain, violations = "", "", []
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason, domain = info.reason, info.domain
        elif detail.Unpack(bad):
            violations.extend((v.field, v.description) for v in bad.field_violations)
    return OrderServiceError(code, details or "", request_id if unknown else None, reason, domain, violations)


Item = Tuple[str, int]


class OrderClient:
    """``OrderClient("127.0.0.1:50051", api_key="dev-key")``.

    ``timeout`` is each call's deadline in seconds (``wait`` calls get
    ``wait_timeout``). Pass ``credentials`` (``grpc.ssl_channel_credentials``)
    for a TLS server, or your own ``channel``.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: str = "",
        timeout: float = 10.0,
        wait_timeout: float = 30.0,
        credentials: Optional[grpc.ChannelCredentials] = None,
        channel: Optional[grpc.Channel] = None,
    ):
        if not api_key:
            raise ValueError("api_key is required: the service's APPLICATION_API_KEY (or the admin key for operator actions)")
        if channel is None:
            channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self._channel = channel
        self._stub = orders_pb2_grpc.OrderServiceStub(channel)
        self._metadata = ((API_KEY_HEADER, api_key),)
        self._timeout = timeout
        self._wait_timeout = wait_timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "OrderClient":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _call(self, method, request, timeout: Optional[float] = None, request_id: Optional[str] = None):
        try:
            return method(request, timeout=timeout or self._timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(err, request_id) from None

    def create_order(
        self,
        customer_id: str,
        items: Sequence[Item],
        address: orders_pb2.ShippingAddress,
        request_id: Optional[str] = None,
        wait: bool = False,
    ) -> orders_pb2.Order:
        """Records the order and starts its saga. With ``wait``, replies when
        the saga ends (or just before the deadline). Idempotent on
        ``request_id`` (default: a new UUID): after an unknown outcome, retry
        with ``err.request_id``."""
        request_id = request_id or str(uuid.uuid4())
        request = orders_pb2.CreateOrderRequest(
            request_id=request_id,
            customer_id=customer_id,
            items=[orders_pb2.OrderItem(sku=sku, quantity=quantity) for sku, quantity in items],
            shipping_address=address,
            wait=wait,
        )
        timeout = self._wait_timeout if wait else None
        return self._call(self._stub.CreateOrder, request, timeout, request_id).order

    def get_order(self, order_id: str) -> orders_pb2.Order:
        return self._call(self._stub.GetOrder, orders_pb2.GetOrderRequest(order_id=order_id)).order

    def list_orders(
        self,
        customer_id: str = "",
        statuses: Iterable[int] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> orders_pb2.ListOrdersResponse:
        """One page, newest first; pass its ``next_page_token`` for the next."""
        request = orders_pb2.ListOrdersRequest(
            customer_id=customer_id, statuses=list(statuses), page_size=page_size, page_token=page_token
        )
        return self._call(self._stub.ListOrders, request)

    def watch_order(self, order_id: str, timeout: Optional[float] = None) -> Iterator[orders_pb2.Order]:
        """The order at each change, until it is terminal."""
        stream = self._stub.WatchOrder(
            orders_pb2.WatchOrderRequest(order_id=order_id),
            timeout=timeout or self._wait_timeout,
            metadata=self._metadata,
        )
        try:
            for update in stream:
                yield update.order
        except grpc.RpcError as err:
            raise _error(err) from None

    def cancel_order(self, order_id: str, reason: str = "", request_id: Optional[str] = None) -> orders_pb2.Order:
        """Before payment, its done steps are undone and it ends CANCELLED;
        after, FAILED_PRECONDITION."""
        request_id = request_id or str(uuid.uuid4())
        request = orders_pb2.CancelOrderRequest(request_id=request_id, order_id=order_id, reason=reason)
        return self._call(self._stub.CancelOrder, request, request_id=request_id).order

    def retry_compensation(self, order_id: str, request_id: Optional[str] = None) -> orders_pb2.Order:
        """Operator action (a client with the admin key)."""
        request_id = request_id or str(uuid.uuid4())
        request = orders_pb2.RetryCompensationRequest(request_id=request_id, order_id=order_id)
        return self._call(self._stub.RetryCompensation, request, request_id=request_id).order

    def resolve_compensation(
        self, order_id: str, operator: str, reason: str, request_id: Optional[str] = None
    ) -> orders_pb2.Order:
        """Operator action (a client with the admin key)."""
        request_id = request_id or str(uuid.uuid4())
        request = orders_pb2.ResolveCompensationRequest(
            request_id=request_id, order_id=order_id, operator=operator, reason=reason
        )
        return self._call(self._stub.ResolveCompensation, request, request_id=request_id).order
