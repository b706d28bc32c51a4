#!/usr/bin/python3
"""A stand-in for kube-apiserver in the Kubernetes tests: a real
kube-apiserver cannot be installed from the package registries here.

usage: kube_apiserver.py PORT CERT KEY TOKEN LOG

Serves over HTTPS the discovery documents (core group only: pods, pods/log,
secrets) and a namespace's pods and secrets: list, get, a pod's log, delete;
a pod's `exec` over a WebSocket in the stream protocol
(`v5`/`v4.channel.k8s.io`: what comes in on stdin goes out on stdout, a
line `exit N` ends the command with status N), or upgraded in any other
protocol to a stream that echoes its bytes;
`logs -f` as a line every 10 s for 70 s; a pod's `portforward` in SPDY/3.1,
bare (`Upgrade: SPDY/3.1`) or tunnelled in a WebSocket
(`SPDY/3.1+portforward.k8s.io`), where every forwarded connection is
echoed, except to port 1, refused with a message on its error stream.
Requests without `Authorization: Bearer TOKEN` get 401. Appends
"METHOD PATH AUTHORIZATION" to LOG for every request.
"""
import base64
import hashlib
import http.server
import json
import os
import ssl
import struct
import sys
import time
import zlib

port, cert, key, token, log = sys.argv[1:6]

# SPDY/3's header-compression dictionary: the agent's own copy.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "../../agent/src/proxy/spdy3.dict"), "rb") as f:
    SPDY_DICT = f.read()

RESOURCES = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "v1",
    "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["create", "delete", "get", "list", "watch"], "shortNames": ["po"]},
        {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod",
         "verbs": ["get"]},
        {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
         "verbs": ["create", "delete", "get", "list", "watch"]},
    ],
}


def pod(namespace, name):
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "uid": "u-" + name,
                         "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": "Running"}}


def secret(namespace, name):
    return {"kind": "Secret", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1",
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "data": {"password": "aHVudGVyMg=="}, "type": "Opaque"}


def listing(kind, items):
    return {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, code, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def route(self):
        auth = self.headers.get("authorization", "")
        with open(log, "a") as out:
            out.write(f"{self.command} {self.path} {auth}\n")
        if auth != f"Bearer {token}":
            return self.answer(401, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                     "reason": "Unauthorized", "code": 401})
        path = self.path.split("?")[0].rstrip("/")
        parts = path.strip("/").split("/")
        if parts[-1:] == ["portforward"]:
            return self.port_forward()
        if parts[-1:] == ["exec"] and self.headers.get("upgrade", "").lower() == "websocket":
            return self.channels()
        if parts[-1:] == ["exec"] and self.headers.get("upgrade"):
            return self.echo()
        if path == "/api":
            return self.answer(200, {"kind": "APIVersions", "versions": ["v1"],
                                     "serverAddressByClientCIDRs": []})
        if path == "/apis":
            return self.answer(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        if path == "/api/v1":
            return self.answer(200, RESOURCES)
        if path == "/version":
            return self.answer(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0"})
        # /api/v1/namespaces/NS/RESOURCE[/NAME[/log]]
        if len(parts) >= 5 and parts[:3] == ["api", "v1", "namespaces"]:
            namespace, resource, rest = parts[3], parts[4], parts[5:]
            make = {"pods": pod, "secrets": secret}.get(resource)
            if make is None:
                return self.answer(404, {"kind": "Status", "code": 404})
            if not rest and self.command == "GET":
                kind = "PodList" if resource == "pods" else "SecretList"
                return self.answer(200, listing(kind, [make(namespace, "web")]))
            if len(rest) == 1 and self.command in ("GET", "DELETE"):
                return self.answer(200, make(namespace, rest[0]))
            if rest[1:] == ["log"] and self.command == "GET":
                if "follow=true" in self.path:
                    return self.follow()
                return self.answer(200, b"line 1\nline 2\n", "text/plain")
        return self.answer(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "NotFound", "code": 404})

    def follow(self):
        """`logs -f`: a line every 10 s for 70 s, chunked, then the end."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for n in range(8):
            if n:
                time.sleep(10)
            line = f"follow {n}\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def accept_websocket(self, protocol):
        accept = base64.b64encode(hashlib.sha1(
            (self.headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()
        ).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.send_header("Sec-WebSocket-Protocol", protocol)
        self.end_headers()
        self.wfile.flush()

    def exactly(self, n):
        data = b""
        while len(data) < n:
            chunk = self.rfile.read(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def ws_receive(self):
        first, second = self.exactly(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack(">H", self.exactly(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", self.exactly(8))[0]
        key = self.exactly(4) if second & 0x80 else b"\0\0\0\0"
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(self.exactly(length)))
        return first & 0x0F, payload

    def ws_send(self, opcode, payload):
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([len(payload)])
        elif len(payload) < 65536:
            header += bytes([126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([127]) + struct.pack(">Q", len(payload))
        self.connection.sendall(header + payload)

    def port_forward(self):
        """A port-forward in SPDY/3.1 (kubelet's side of it): each
        connection is a pair of streams (`streamtype` error and data, with
        its `port` and `requestid`); data is echoed until the client ends
        it, then both streams end; port 1 is refused on the error stream."""
        offered = [p.strip() for p in self.headers.get("sec-websocket-protocol", "").split(",")]
        tunnelled = self.headers.get("upgrade", "").lower() == "websocket"
        if tunnelled and "SPDY/3.1+portforward.k8s.io" in offered:
            self.accept_websocket("SPDY/3.1+portforward.k8s.io")
            pending = bytearray()

            def read(n):
                while len(pending) < n:
                    opcode, payload = self.ws_receive()
                    if opcode == 8:
                        raise EOFError
                    if opcode in (0, 2):
                        pending.extend(payload)
                data = bytes(pending[:n])
                del pending[:n]
                return data

            def write(frame):
                self.ws_send(2, frame)
        elif self.headers.get("upgrade", "").lower() == "spdy/3.1":
            self.send_response(101)
            self.send_header("Upgrade", "SPDY/3.1")
            self.send_header("Connection", "Upgrade")
            self.send_header("X-Stream-Protocol-Version", "portforward.k8s.io")
            self.end_headers()
            self.wfile.flush()
            read = self.exactly
            write = self.connection.sendall
        else:
            return self.answer(400, {"kind": "Status", "code": 400})

        inflate = zlib.decompressobj(zdict=SPDY_DICT)
        deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 9,
                                   zlib.Z_DEFAULT_STRATEGY, SPDY_DICT)

        def control(kind, flags, body):
            write(struct.pack(">HHI", 0x8003, kind, (flags << 24) | len(body)) + body)

        def data(stream, payload, fin=False):
            write(struct.pack(">II", stream, ((1 if fin else 0) << 24) | len(payload)) + payload)

        def header_block(block):
            count, = struct.unpack(">I", block[:4])
            at, headers = 4, {}
            for _ in range(count):
                n, = struct.unpack(">I", block[at:at + 4])
                name = block[at + 4:at + 4 + n].decode()
                at += 4 + n
                n, = struct.unpack(">I", block[at:at + 4])
                headers[name] = block[at + 4:at + 4 + n].decode()
                at += 4 + n
            return headers

        streams = {}  # stream id -> headers
        errors = {}   # requestid -> error stream id
        try:
            while True:
                head = read(8)
                length = struct.unpack(">I", b"\0" + head[5:8])[0]
                flags = head[4]
                body = read(length)
                if head[0] & 0x80:
                    kind, = struct.unpack(">H", head[2:4])
                    if kind == 1:  # SYN_STREAM
                        stream = struct.unpack(">I", body[:4])[0] & 0x7FFFFFFF
                        headers = header_block(inflate.decompress(body[10:]))
                        streams[stream] = headers
                        reply = deflate.compress(struct.pack(">I", 0)) + deflate.flush(zlib.Z_SYNC_FLUSH)
                        control(2, 0, struct.pack(">I", stream) + reply)
                        if headers.get("streamtype") == "error":
                            errors[headers.get("requestid")] = stream
                        elif headers.get("port") == "1":
                            error = errors.get(headers.get("requestid"))
                            if error is not None:
                                data(error, b"error forwarding port 1 to pod web: connection refused", True)
                            control(3, 0, struct.pack(">II", stream, 5))
                    elif kind == 6:  # PING
                        control(6, 0, body)
                    elif kind == 7:  # GOAWAY
                        break
                else:
                    stream = struct.unpack(">I", head[:4])[0] & 0x7FFFFFFF
                    headers = streams.get(stream, {})
                    if headers.get("streamtype") != "data":
                        continue
                    if body:
                        data(stream, body)
                    if flags & 1:
                        data(stream, b"", True)
                        error = errors.pop(headers.get("requestid"), None)
                        if error is not None:
                            data(error, b"", True)
        except (EOFError, OSError):
            pass
        self.close_connection = True

    def channels(self):
        """An exec in the stream protocol: stdin echoed on stdout; `exit N`
        on stdin, or stdin's end, ends it with a Status on the error
        stream."""
        offered = [p.strip() for p in self.headers.get("sec-websocket-protocol", "").split(",")]
        chosen = next(p for p in ("v5.channel.k8s.io", "v4.channel.k8s.io") if p in offered)
        self.accept_websocket(chosen)
        send, receive = self.ws_send, self.ws_receive

        status = {"metadata": {}, "status": "Success"}
        try:
            while True:
                opcode, payload = receive()
                if opcode == 8 or payload[:2] == b"\xff\x00":
                    break
                if opcode not in (1, 2) or payload[:1] != b"\x00":
                    continue
                ended = False
                for line in payload[1:].splitlines(keepends=True):
                    if line.startswith(b"exit "):
                        code = int(line.split()[1])
                        if code:
                            status = {"metadata": {}, "status": "Failure",
                                      "reason": "NonZeroExitCode",
                                      "details": {"causes": [{"reason": "ExitCode",
                                                              "message": str(code)}]}}
                        ended = True
                        break
                    send(2, b"\x01" + line)
                if ended:
                    break
        except EOFError:
            pass
        send(2, b"\x03" + json.dumps(status).encode())
        send(8, b"\x03\xe8")
        self.close_connection = True

    def echo(self):
        """An exec stand-in: agrees to the upgrade, then echoes every byte
        (the relay is what is tested, not the channel protocol)."""
        self.send_response(101)
        self.send_header("Upgrade", self.headers.get("upgrade"))
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        while chunk := self.connection.recv(65536):
            self.connection.sendall(chunk)
        self.close_connection = True

    do_GET = route
    do_DELETE = route
    do_POST = route
    do_PATCH = route
    do_PUT = route


server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
