"""minidist: a small distributed task runtime on the standard library.

Start a center and workers (``dcenter``, ``dworker HOST:PORT``), or let
``Executor()`` start a LocalCluster, then use the ``concurrent.futures``
API you already know::

    from minidist import Executor
    with Executor("127.0.0.1:8787") as e:
        print(list(e.map(pow, range(5), range(5))))
"""

from .cluster import LocalCluster
from .dask_get import get
from .executor import Client, Executor, Future
from .pool import Pool, RemoteData
from .task import KilledWorker, LostKeyError, RemoteException
from .wire import AuthenticationError

__all__ = ["AuthenticationError", "Client", "Executor", "Future", "KilledWorker",
           "LocalCluster", "LostKeyError", "Pool", "RemoteData", "RemoteException", "get"]
__version__ = "0.1.0"
