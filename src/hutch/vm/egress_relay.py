"""The per-connection relay QEMU's ``guestfwd`` runs for an allowlist box (:mod:`hutch.vm.egress`):
stdin/stdout are the guest's TCP connection; this joins it to the proxy's Unix socket
(``argv[1]``) until either side ends. Standalone and stdlib-only: it runs as
``python -I -S egress_relay.py SOCKET``, without importing hutch, so it starts fast."""

import os
import selectors
import socket
import sys


def main() -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sys.argv[1])
    except OSError:
        return 1
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "guest")
    sel.register(sock, selectors.EVENT_READ, "proxy")
    guest_open = True
    while True:
        for key, _ in sel.select():
            if key.data == "guest":
                data = os.read(0, 65536)
                if not data:
                    guest_open = False
                    sel.unregister(0)
                    sock.shutdown(socket.SHUT_WR)
                else:
                    sock.sendall(data)
            else:
                data = sock.recv(65536)
                if not data:
                    return 0
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view) :]
        if not guest_open and not sel.get_map():
            return 0


if __name__ == "__main__":
    sys.exit(main())
