"""The seeds' foundations: build a server from named handlers, talk to it with connect or rpc.

Seed 004 shows these (there with ``await``; here every call blocks)::

    from minidist.core import Server, connect, rpc

    def add(comm, x=None, y=None):      # simple handler, just a function
        return x + y

    def stream_data(comm, interval=1):  # complex handler, multiple responses
        data = 0
        while True:
            time.sleep(interval)
            data += 1
            comm.write(data)

    s = Server({'add': add, 'stream_data': stream_data})
    s.listen('tcp://:8888')   # listen on TCP port 8888 (0 picks one; s.port tells)

    comm = connect('tcp://127.0.0.1:8888')
    comm.write({'op': 'add', 'x': 1, 'y': 2})
    comm.read()               # 3
    comm.close()

    with rpc('tcp://127.0.0.1:8888') as r:
        r.add(x=1, y=2)       # 3; from many threads at once, too

How a message flows::

    connect / rpc --{"op": "add", "x": 1, "y": 2}--> Server (a thread per connection)
                                                       handlers["add"](comm, x=1, y=2)
    comm.read() / r.add(...) <------- 3 -------------- its return value (or comm.write's)

Everything here is ``minidist.wire``'s, the layer the center and workers are
built on: the same framing, pickling, auth-key handshake (``MINIDIST_AUTH_KEY``
or ``security=``) and TLS.  A handler that raises, or an op the server does
not have, raises ``RemoteError`` at the caller; the connection and the
server go on.  ``Server.stop()`` stops it.
"""

from __future__ import annotations

from .wire import Connection, ConnectionPool, RemoteError, Security, Server, connect, rpc

__all__ = ["Server", "connect", "rpc", "Connection", "ConnectionPool", "RemoteError",
           "Security"]
