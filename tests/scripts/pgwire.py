#!/usr/bin/python3
"""A bare PostgreSQL protocol 3.0 client, for what libpq never does.

    pgwire.py HOST PORT execute-undescribed SQL   Parse/Bind/Execute/Sync with
                                                  no Describe; prints each row
    pgwire.py HOST PORT stream SQL                runs SQL, discards the rows;
                                                  prints how many there were
    pgwire.py HOST PORT parse-flush SQL           Parse and Flush, then waits
                                                  for the answer before Sync
    pgwire.py HOST PORT simple-tags SQL           a Query; prints the tags of
    pgwire.py HOST PORT extended-tags SQL         the answer (or of the answer
                                                  to Parse/Bind/Execute/Sync),
                                                  then runs SELECT 41 + 1
    SQL may be @bytes:N, @chain:N (1+1+…), @deep:N (((…))) to have the
    script make a statement larger than a command line holds.

    pgwire.py HOST PORT beside-large BYTES        a statement of BYTES on one
                                                  connection; meanwhile, the
                                                  slowest of 20 SELECT 1 on
                                                  another, in milliseconds

No password is ever sent: the agent in front answers AuthenticationOk.
"""
import socket
import struct
import sys


def message(tag, body=b""):
    return tag + struct.pack("!i", len(body) + 4) + body


def cstr(text):
    return text.encode() + b"\0"


class Conn:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, int(port)))
        self.buf = bytearray()
        params = cstr("user") + cstr("anyone") + cstr("database") + cstr("postgres") + b"\0"
        body = struct.pack("!i", 196608) + params
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        self.until_ready()

    def read(self):
        while len(self.buf) < 5:
            self.fill()
        tag = bytes(self.buf[:1])
        (length,) = struct.unpack("!i", self.buf[1:5])
        while len(self.buf) < length + 1:
            self.fill()
        body = bytes(self.buf[5 : length + 1])
        del self.buf[: length + 1]
        return tag, body

    def fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise SystemExit("server closed the connection")
        self.buf += chunk

    def until_ready(self, on_message=None):
        while True:
            tag, body = self.read()
            if tag == b"E":
                fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
                print("ERROR", fields.get(b"C", b"").decode(), fields.get(b"M", b"").decode())
            if on_message:
                on_message(tag, body)
            if tag == b"Z":
                return


def row_values(body):
    (count,) = struct.unpack("!h", body[:2])
    pos, values = 2, []
    for _ in range(count):
        (length,) = struct.unpack("!i", body[pos : pos + 4])
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + length].decode())
            pos += length
    return values


def stream(conn):
    """Counts rows until ReadyForQuery, walking frames in place (a large
    result must not be copied around in Python)."""
    rows, data, pos = 0, bytes(conn.buf), 0
    while True:
        while len(data) - pos >= 5:
            tag = data[pos]
            (length,) = struct.unpack_from("!i", data, pos + 1)
            if len(data) - pos < length + 1:
                break
            if tag == 0x44:  # DataRow
                rows += 1
            elif tag == 0x45:  # ErrorResponse
                print("ERROR", data[pos + 5 : pos + 1 + length])
            elif tag == 0x5A:  # ReadyForQuery
                return rows
            pos += length + 1
        chunk = conn.sock.recv(1 << 20)
        if not chunk:
            raise SystemExit("server closed the connection")
        data, pos = data[pos:] + chunk, 0


def main():
    host, port, mode, sql = sys.argv[1:5]
    if sql.startswith("@bytes:"):
        # A statement of that many bytes (more than a command line holds).
        size = int(sql[len("@bytes:"):])
        sql = "SELECT '" + "y" * (size - 10) + "'"
    elif sql.startswith("@chain:"):
        sql = "SELECT " + "1+" * int(sql[len("@chain:"):]) + "1"
    elif sql.startswith("@deep:"):
        depth = int(sql[len("@deep:"):])
        sql = "SELECT " + "(" * depth + "1" + ")" * depth
    conn = Conn(host, port)
    if mode == "execute-undescribed":
        batch = (
            message(b"P", cstr("") + cstr(sql) + struct.pack("!h", 0))
            + message(b"B", cstr("") + cstr("") + struct.pack("!hhh", 0, 0, 0))
            + message(b"E", cstr("") + struct.pack("!i", 0))
            + message(b"S")
        )
        conn.sock.sendall(batch)

        def show(tag, body):
            if tag == b"D":
                print("|".join("" if v is None else v for v in row_values(body)))

        conn.until_ready(show)
    elif mode == "parse-flush":
        conn.sock.sendall(message(b"P", cstr("") + cstr(sql) + struct.pack("!h", 0)) + message(b"H"))
        tag, body = conn.read()
        print("answer", tag.decode())
        if tag == b"E":
            fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
            print("ERROR", fields.get(b"C", b"").decode(), fields.get(b"M", b"").decode())
        conn.sock.sendall(message(b"S"))
        conn.until_ready()
        print("ready")
        conn.sock.sendall(message(b"Q", cstr("SELECT 41 + 1")))

        def show(tag, body):
            if tag == b"D":
                print("|".join("" if v is None else v for v in row_values(body)))

        conn.until_ready(show)
    elif mode in ("simple-tags", "extended-tags"):
        if mode == "simple-tags":
            conn.sock.sendall(message(b"Q", cstr(sql)))
        else:
            conn.sock.sendall(
                message(b"P", cstr("") + cstr(sql) + struct.pack("!h", 0))
                + message(b"B", cstr("") + cstr("") + struct.pack("!hhh", 0, 0, 0))
                + message(b"E", cstr("") + struct.pack("!i", 0))
                + message(b"S")
            )
        tags = []
        conn.until_ready(lambda tag, body: tags.append(tag.decode()))
        print("".join(tags))
        conn.sock.sendall(message(b"Q", cstr("SELECT 41 + 1")))

        def show(tag, body):
            if tag == b"D":
                print("|".join("" if v is None else v for v in row_values(body)))

        conn.until_ready(show)
    elif mode == "beside-large":
        import threading
        import time

        size = int(sql)
        items = ",".join(["1"] * (size // 2))
        large = "SELECT 1 WHERE 1 IN (" + items + ")"
        done = []

        def run_large():
            conn.sock.sendall(message(b"Q", cstr(large)))
            conn.until_ready()
            done.append(time.monotonic())

        worker = threading.Thread(target=run_large)
        other = Conn(host, port)
        started = time.monotonic()
        worker.start()
        slowest = 0.0
        for _ in range(20):
            t = time.monotonic()
            other.sock.sendall(message(b"Q", cstr("SELECT 1")))
            other.until_ready()
            slowest = max(slowest, time.monotonic() - t)
        worker.join()
        print("slowest_ms %.1f" % (slowest * 1000))
        print("large_ms %.1f" % ((done[0] - started) * 1000))
    elif mode == "stream":
        conn.sock.sendall(message(b"Q", cstr(sql)))
        print(stream(conn))
    conn.sock.sendall(message(b"X"))


if __name__ == "__main__":
    main()
