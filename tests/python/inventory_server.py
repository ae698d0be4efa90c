"""A gRPC service written in Python, with server reflection, for the gateway.

Generates stubs for acme/inventory/v1/inventory.proto with grpcio-tools,
serves InventoryService and reflection on 127.0.0.1 (a free port), prints
the port on one line, and serves until stdin closes.

usage: python inventory_server.py PROTO_DIR
"""

import importlib.resources
import os
import sys
import tempfile
import threading
from concurrent import futures

import grpc
from grpc_reflection.v1alpha import reflection
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_stubs(proto_dir: str) -> str:
    out = tempfile.mkdtemp(prefix="flashmesh-inventory-")
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{HERE}",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "acme/inventory/v1/inventory.proto",
        "google/api/annotations.proto",
        "google/api/http.proto",
    ])
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    return out


def main() -> None:
    sys.path.insert(0, generate_stubs(sys.argv[1]))
    from acme.inventory.v1 import inventory_pb2, inventory_pb2_grpc

    class Inventory(inventory_pb2_grpc.InventoryServiceServicer):
        def __init__(self) -> None:
            self.units: dict[str, int] = {}
            self.lock = threading.Lock()

        def GetStock(self, request, context):
            if not request.sku:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sku is required")
            with self.lock:
                return inventory_pb2.Stock(sku=request.sku, units=self.units.get(request.sku, 0))

        def AdjustStock(self, request, context):
            with self.lock:
                units = self.units.get(request.sku, 0) + request.delta
                if units < 0:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not enough units")
                self.units[request.sku] = units
                return inventory_pb2.Stock(sku=request.sku, units=units)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inventory_pb2_grpc.add_InventoryServiceServicer_to_server(Inventory(), server)
    name = inventory_pb2.DESCRIPTOR.services_by_name["InventoryService"].full_name
    reflection.enable_server_reflection((name, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(grace=1)


if __name__ == "__main__":
    main()
