"""Creates an order, waits for its saga, and prints how it ended.

    PYTHONPATH=sdks/python python3 sdks/python/examples/create_order.py

With devstack running (`cargo run -p devstack`): its orchestrator listens on
127.0.0.1:50051 and takes the key dev-key.
"""

import os

from ordersaga import OrderClient, OrderServiceError, orders_pb2

with OrderClient(os.environ.get("ORDERS_ADDR", "127.0.0.1:50051"), api_key=os.environ.get("API_KEY", "dev-key")) as client:
    address = orders_pb2.ShippingAddress(
        recipient="Ada Lovelace", line1="1 Main St", city="Berlin", postal_code="10115", country="DE"
    )
    try:
        order = client.create_order("alice", [("BOOK-1", 1)], address, wait=True)
    except OrderServiceError as err:
        # err.code is the gRPC status; err.request_id is set when a retry is safe.
        raise SystemExit(f"refused: {err}")
    print(order.order_id, orders_pb2.OrderStatus.Name(order.status))
    for step in order.steps:
        print(f"  {step.name:<17} {orders_pb2.StepPhase.Name(step.phase):<25} {orders_pb2.StepStatus.Name(step.status)}")
