"""A Python client of the auth service, built only from proto/.

Generates stubs with grpcio-tools into a temp dir, then signs up, logs in,
calls GetMe and checks health against the address given, and reads the
google.rpc error details of a rejected sign-up. Exits non-zero on any failure.

usage: python auth_client.py HOST:PORT PROTO_DIR
"""

import importlib.resources
import sys
import tempfile
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2
from grpc_tools import protoc


def generate_stubs(proto_dir: str) -> str:
    out = tempfile.mkdtemp(prefix="flashmesh-py-")
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "flashmesh/auth/v1/auth.proto",
        "google/api/annotations.proto",
        "google/api/http.proto",
    ])
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    return out


def main() -> None:
    addr, proto_dir = sys.argv[1], sys.argv[2]
    sys.path.insert(0, generate_stubs(proto_dir))
    from flashmesh.auth.v1 import auth_pb2, auth_pb2_grpc

    channel = grpc.insecure_channel(addr)
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    email = f"py-{uuid.uuid4().hex}@example.com"

    signed_up = auth.SignUp(auth_pb2.SignUpRequest(email=email, password="correct horse battery"))
    assert signed_up.user.email == email, signed_up
    assert signed_up.user.role == auth_pb2.ROLE_USER

    logged_in = auth.Login(auth_pb2.LoginRequest(email=email, password="correct horse battery"))
    token = logged_in.tokens.access_token
    me = auth.GetMe(auth_pb2.GetMeRequest(), metadata=[("authorization", f"Bearer {token}")])
    assert me.user.id == signed_up.user.id, me

    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="flashmesh.auth.v1.AuthService"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING, status

    try:
        auth.SignUp(auth_pb2.SignUpRequest(email="nope", password="correct horse battery"))
        sys.exit("a malformed email was accepted")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        details = rpc_status.from_call(err).details
        info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        assert details[0].Unpack(info) and info.reason == "INVALID_ARGUMENT", details
        assert info.domain == "flashmesh.dev", info
        assert details[1].Unpack(bad_request), details
        assert [v.field for v in bad_request.field_violations] == ["email"], bad_request

    print("python client: sign up, login, GetMe, health and error details OK")


if __name__ == "__main__":
    main()
