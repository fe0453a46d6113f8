"""The Python SDK against the real running system (run by tests/e2e/sdks.rs):
create and wait, get, list, watch, cancel, and read a refusal.

ORDERS_ADDR (host:port), API_KEY. Prints PYTHON_SDK_OK when every check holds.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import grpc  # noqa: E402

from ordersaga import OrderClient, OrderServiceError, orders_pb2  # noqa: E402

S = orders_pb2.OrderStatus
client = OrderClient(os.environ["ORDERS_ADDR"], api_key=os.environ["API_KEY"], timeout=10, wait_timeout=30)
address = orders_pb2.ShippingAddress(
    recipient="Grace Hopper", line1="1 Navy Yard", city="Berlin", postal_code="10115", country="DE"
)


def status(order):
    return S.Name(order.status)


# Create and wait: the saga runs to its end.
done = client.create_order("alice", [("BOOK", 1)], address, wait=True)
assert status(done) == "ORDER_STATUS_COMPLETED", done
assert [s.name for s in done.steps] == ["reserve_stock", "prepare_shipment", "charge_payment"], done

# The same request_id again is the same order, not a second one.
again = client.create_order("alice", [("BOOK", 1)], address, request_id=done.request_id, wait=True)
assert again.order_id == done.order_id, (again.order_id, done.order_id)

# Get and list.
got = client.get_order(done.order_id)
assert got.order_id == done.order_id and status(got) == "ORDER_STATUS_COMPLETED", got
page = client.list_orders(customer_id="alice", statuses=[S.ORDER_STATUS_COMPLETED], page_size=50)
assert done.order_id in [o.order_id for o in page.orders], page

# Watch a new order to its end.
placed = client.create_order("alice", [("BOOK", 1)], address)
seen = [status(o) for o in client.watch_order(placed.order_id)]
assert seen and seen[-1] == "ORDER_STATUS_COMPLETED", seen

# Cancel one before payment: it ends CANCELLED (shipping is slow here).
placed = client.create_order("alice", [("BOOK", 1)], address)
client.cancel_order(placed.order_id, reason="changed my mind")
deadline = time.time() + 30
while status(client.get_order(placed.order_id)) != "ORDER_STATUS_CANCELLED":
    assert time.time() < deadline, client.get_order(placed.order_id)
    time.sleep(0.1)

# A refusal: the code, and the message naming the field.
try:
    client.create_order("alice", [("BOOK", 1)], orders_pb2.ShippingAddress(recipient="x", line1="y", city="z", postal_code="1", country="Germany"))
    raise AssertionError("an invalid country was accepted")
except OrderServiceError as err:
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "shipping_address.country" in err.message, err
    assert [f for f, _ in err.field_violations] == ["shipping_address.country"], err.field_violations
    assert err.request_id is None and not err.outcome_unknown, err

# A rich refusal: the reason and its domain, without parsing the text.
try:
    client.create_order("alice", [("NOPE", 1)], address)
    raise AssertionError("an unknown SKU was accepted")
except OrderServiceError as err:
    assert err.code == grpc.StatusCode.NOT_FOUND, err
    assert (err.reason, err.domain) == ("UNKNOWN_SKU", "orders.v1"), (err.reason, err.domain)
    assert [f for f, _ in err.field_violations] == ["items[0].sku"], err.field_violations

# A wrong key is UNAUTHENTICATED.
try:
    OrderClient(os.environ["ORDERS_ADDR"], api_key="not-a-key").get_order(done.order_id)
    raise AssertionError("a wrong key was accepted")
except OrderServiceError as err:
    assert err.code == grpc.StatusCode.UNAUTHENTICATED, err
    assert err.reason == "API_KEY_INVALID", err.reason

print("PYTHON_SDK_OK")
