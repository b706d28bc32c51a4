#!/usr/bin/env python3
"""A gRPC service and its client (grpcio, no generated code: the
messages are raw bytes), for HTTP targets carrying gRPC.

  grpc_echo.py serve PORT CERT KEY TOKEN_FILE CALLS_FILE
      test.Echo/Say and test.Echo/Drop over TLS, answering only calls
      that carry `authorization: Bearer <token>`; each call it runs is
      appended to CALLS_FILE.
  grpc_echo.py call PORT CA METHOD MESSAGE
      calls /test.Echo/METHOD with a token of its own; prints the answer,
      or `error CODE DETAILS` and exits 1.
"""
import json
import sys
from concurrent import futures

import grpc


def serve(port, cert, key, token_file, calls_file):
    token = open(token_file).read().strip()

    def handler(name):
        def run(request, context):
            metadata = dict(context.invocation_metadata())
            if metadata.get("authorization") != f"Bearer {token}":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong token")
            with open(calls_file, "a") as calls:
                calls.write(f"{name} {request.decode()}\n")
            return json.dumps(
                {"method": name, "message": request.decode(),
                 "authorization": metadata.get("authorization")}
            ).encode()

        return grpc.unary_unary_rpc_method_handler(run)

    service = grpc.method_handlers_generic_handler(
        "test.Echo", {"Say": handler("Say"), "Drop": handler("Drop")}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[service])
    credentials = grpc.ssl_server_credentials(
        [(open(key, "rb").read(), open(cert, "rb").read())]
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    server.wait_for_termination()


def call(port, ca, method, message):
    credentials = grpc.ssl_channel_credentials(open(ca, "rb").read())
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = channel.unary_unary(f"/test.Echo/{method}")
        try:
            answer = stub(
                message.encode(),
                metadata=[("authorization", "Bearer client-token-should-not-pass")],
                timeout=20,
            )
        except grpc.RpcError as error:
            print("error", error.code().name, error.details())
            sys.exit(1)
        print(answer.decode())


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(*sys.argv[2:7])
    else:
        call(*sys.argv[2:6])
