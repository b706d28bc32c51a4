#!/usr/bin/python3
"""An HTTPS webhook receiver for the approvals tests.

usage: webhook.py PORT CERT KEY OUT TOKEN FAIL_FIRST

Appends one JSON line per POST to OUT: the payload, its headers, and
whether its signature is the HMAC-SHA256 of "{timestamp}.{body}" under
TOKEN. The first FAIL_FIRST requests are answered 503 (to exercise retries).
"""
import hashlib
import hmac
import http.server
import json
import ssl
import sys

port, cert, key, out, token, fail_first = sys.argv[1:7]
failures_left = int(fail_first)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global failures_left
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if failures_left > 0:
            failures_left -= 1
            self.send_response(503)
            self.end_headers()
            return
        ts = self.headers.get("x-interlock-timestamp", "")
        sig = self.headers.get("x-interlock-signature", "")
        expected = "sha256=" + hmac.new(token.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        with open(out, "a") as f:
            f.write(json.dumps({
                "payload": json.loads(body),
                "signature_ok": hmac.compare_digest(sig, expected),
            }) + "\n")
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", int(port)), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
