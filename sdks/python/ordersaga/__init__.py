"""The order saga system's Python SDK.

``OrderClient`` is a thin client of ``orders.v1.OrderService``: it sends the
API key with every call, gives every call a deadline, and gives every
mutating call a ``request_id`` (its idempotency key) unless you pass one.
The generated messages and stubs are ``ordersaga.orders_pb2`` and
``ordersaga.orders_pb2_grpc`` (from ``proto/``, by ``generate.sh``).
"""

import os
import sys

# protoc's Python output imports its packages by their proto path
# (``from orders.v1 import orders_pb2``): the generated tree goes on the path.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_generated"))

from orders.v1 import orders_pb2, orders_pb2_grpc  # noqa: E402

from .client import OrderClient, OrderServiceError  # noqa: E402

__all__ = ["OrderClient", "OrderServiceError", "orders_pb2", "orders_pb2_grpc"]
