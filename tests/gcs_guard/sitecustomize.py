"""Put on PYTHONPATH of the GCS tests' child processes (tests/_gcs.py): every connection a Python
library opens (gcsfs, google-auth, aiohttp, requests) must go to 127.0.0.1; any other address is
refused and written to $GPTJAX_TEST_CONNECT_LOG, which the tests assert stays empty."""

import os
import sys

_LOCAL = ("127.0.0.1", "::1", "localhost")


def _guard(event, args):
    log = os.environ.get("GPTJAX_TEST_CONNECT_LOG")  # unset: the guard is off (after the tests' fixture)
    if not log:
        return
    if event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    elif event == "socket.getaddrinfo":
        host = args[0]
    else:
        return
    if host is None or (isinstance(host, bytes) and host.decode() in _LOCAL) or host in _LOCAL:
        return
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {event} {host!r}\n")
    raise ConnectionRefusedError(f"test guard: {event} to {host!r} refused (only 127.0.0.1 is allowed)")


sys.addaudithook(_guard)
