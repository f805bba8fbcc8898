#!/usr/bin/env python3
"""A logging TCP relay for recording MySQL/MariaDB exchanges (used to make the files here).

    capture.py LISTEN_PORT TARGET_PORT OUT_FILE

Accepts one connection on 127.0.0.1:LISTEN_PORT, relays it to 127.0.0.1:TARGET_PORT, and
writes every MySQL packet (4-byte header included) as a line `S <hex>` (server to client) or
`C <hex>` (client to server), in the order the relay saw them. Loopback only, one connection.
"""
import select
import socket
import sys


def main():
    listen_port, target_port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", listen_port))
    ls.listen(1)
    app, _ = ls.accept()
    srv = socket.create_connection(("127.0.0.1", target_port))
    pending = {app: b"", srv: b""}
    tag = {app: "C", srv: "S"}
    peer = {app: srv, srv: app}
    lines = []
    open_ = True
    while open_:
        r, _, _ = select.select([app, srv], [], [])
        for s in r:
            data = s.recv(65536)
            if not data:
                open_ = False
                break
            peer[s].sendall(data)
            pending[s] += data
            buf = pending[s]
            while len(buf) >= 4:
                n = int.from_bytes(buf[:3], "little")
                if len(buf) < 4 + n:
                    break
                lines.append(f"{tag[s]} {buf[:4 + n].hex()}")
                buf = buf[4 + n:]
            pending[s] = buf
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
