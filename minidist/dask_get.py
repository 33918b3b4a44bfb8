"""The dask scheduler function: run a dask graph on a minidist cluster.

``get(host, port, dsk, keys)`` follows dask's scheduler-function contract
(``keys`` is a key or nested lists of keys; the values come back in the
same nesting), so ``x.compute(scheduler=partial(get, host, port))`` runs a
dask collection on the cluster.  ``Executor.get``, ``compute`` and
``persist`` are built here too (the ``Client``'s place as dask's default
scheduler is in ``default_scheduler``).

How a graph becomes tasks::

  dsk --convert each node--> expression --pack--> (key, RunSpec, deps, None) --+
                                                                               |
  values <--gather-- Futures for the wanted keys <--_send_tasks (one message)--+

Each node is turned into a small expression tree: ``_Ref(key)`` for the
value of another key (a key of the graph, a Future or RemoteData, or a key
already on the cluster), ``_Call`` for a call, ``_Seq``/``_Map`` for
containers that hold references; everything else is a literal.  A node
that is a single call whose arguments hold references only inside plain
lists, tuples, sets and dicts is packed as that call, with ``TaskRef``
placeholders the worker fills in; anything deeper (nested calls) runs
through ``_run_expr``, a tiny evaluator shipped with the task.  Raw tuple
graphs need no dask at all; dask's own task objects (``Task``, ``Alias``,
``DataNode``, ``List``...) are read only when such a graph arrives, and
dask is imported only then.

Only the requested keys are wanted by the session, so the center deletes
each intermediate result as soon as no pending task needs it, and every
key the call created is released before it returns.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator, Mapping
from typing import Any
from collections.abc import Callable

from .executor import Executor, shared_session
from .task import HasKey, RunSpec, TaskRef, serialize_function
from .wire import format_address, serialize

logger = logging.getLogger("minidist.dask_get")


# ---------------------------------------------------------------------------
# Expressions (built on the client, evaluated on the worker)


class _Ref:
    """The value of ``key``."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __reduce__(self) -> Any:
        return _Ref, (self.key,)


class _Call:
    """``func(*args, **kwargs)`` with the arguments evaluated first."""

    __slots__ = ("func", "args", "kwargs")

    def __init__(self, func: Callable, args: tuple, kwargs: dict) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs

    def __reduce__(self) -> Any:
        return _Call, (self.func, self.args, self.kwargs)


class _Seq:
    """A list, tuple, set or frozenset of evaluated items."""

    __slots__ = ("typ", "items")

    def __init__(self, typ: type, items: list) -> None:
        self.typ, self.items = typ, items

    def __reduce__(self) -> Any:
        return _Seq, (self.typ, self.items)


class _Map:
    """A dict of evaluated ``(key, value)`` pairs."""

    __slots__ = ("items",)

    def __init__(self, items: list) -> None:
        self.items = items

    def __reduce__(self) -> Any:
        return _Map, (self.items,)


_EXPR = (_Ref, _Call, _Seq, _Map)


def _evaluate(expr: Any, values: dict) -> Any:
    typ = type(expr)
    if typ is _Ref:
        return values[expr.key]
    if typ is _Call:
        args = [_evaluate(a, values) for a in expr.args]
        if expr.kwargs:
            return expr.func(*args, **{k: _evaluate(v, values) for k, v in expr.kwargs.items()})
        return expr.func(*args)
    if typ is _Seq:
        return expr.typ(_evaluate(x, values) for x in expr.items)
    if typ is _Map:
        return {_evaluate(k, values): _evaluate(v, values) for k, v in expr.items}
    return expr


def _run_expr(expr: Any, values: dict) -> Any:
    """Evaluate one node's expression; ``values`` maps its dependencies to their values."""
    return _evaluate(expr, values)


def _identity(value: Any) -> Any:
    return value


def _call_node(node: Any, values: dict) -> Any:
    """Run a dask graph node of a kind this module does not take apart."""
    return node(values)


# ---------------------------------------------------------------------------
# Graph conversion (client side)


class _NotFlat(Exception):
    pass


def _flat(expr: Any) -> Any:
    """The expression as plain containers with TaskRefs, if it has no call inside."""
    typ = type(expr)
    if typ is _Ref:
        return TaskRef(expr.key)
    if typ is _Seq:
        return expr.typ(_flat(x) for x in expr.items)
    if typ is _Map:
        out = {}
        for k, v in expr.items:
            if type(k) in _EXPR:
                raise _NotFlat
            out[k] = _flat(v)
        return out
    if typ is _Call:
        raise _NotFlat
    return expr


class _Converter:
    """Turns graph nodes into expressions, collecting each node's dependencies."""

    def __init__(self, dsk: Mapping, spec: Any = None, names: dict | None = None) -> None:
        self.dsk = dsk
        self.spec = spec  # the dask._task_spec module, for dask graphs
        self.names = names  # graph key -> key on the cluster, when they differ
        self.deps: dict[Any, None] = {}

    def ref(self, key: Any) -> _Ref:
        if self.names is not None:
            key = self.names.get(key, key)
        self.deps[key] = None
        return _Ref(key)

    def handles(self, obj: Any) -> Any:
        """``obj`` with Futures and RemoteData (also inside plain containers) as refs."""
        if isinstance(obj, HasKey):
            return self.ref(obj.key)
        typ = type(obj)
        if typ in (list, tuple, set, frozenset):
            items = [self.handles(x) for x in obj]
            if any(type(x) in _EXPR for x in items):
                return _Seq(typ, items)
        elif typ is dict:
            items = [(k, self.handles(v)) for k, v in obj.items()]
            if any(type(v) in _EXPR for _, v in items):
                return _Map(items)
        return obj

    # raw graphs: tuples are tasks, keys of the graph are references

    def raw(self, obj: Any) -> Any:
        typ = type(obj)
        if typ is tuple and obj and callable(obj[0]):
            return _Call(obj[0], tuple(self.raw(a) for a in obj[1:]), {})
        if isinstance(obj, HasKey):
            return self.ref(obj.key)
        try:
            if obj in self.dsk:
                return self.ref(obj)
        except TypeError:  # unhashable: not a key
            pass
        if typ in (list, tuple, set, frozenset):
            items = [self.raw(x) for x in obj]
            if any(type(x) in _EXPR for x in items):
                return _Seq(typ, items)
            return obj
        if typ is dict:
            return self.handles(obj)
        return obj

    # dask task-spec graphs

    def node(self, node: Any) -> Any:
        spec = self.spec
        typ = type(node)
        if typ is spec.Alias:
            return self.ref(node.target)
        if typ is spec.DataNode:
            return self.handles(node.value)
        if typ is spec.Task:
            return _Call(node.func, tuple(self.arg(a) for a in node.args),
                         {k: self.arg(v) for k, v in node.kwargs.items()})
        if typ in (spec.List, spec.Tuple, spec.Set):
            return _Seq(node.klass, [self.arg(a) for a in node.args])
        if typ is spec.Dict:
            items = [self.arg(a) for a in node.args]
            return _Map(list(zip(items[::2], items[1::2], strict=False)))
        values = _Map([(k, self.ref(k)) for k in node.dependencies])
        return _Call(_call_node, (node, values), {})

    def arg(self, obj: Any) -> Any:
        if isinstance(obj, self.spec.GraphNode):
            return self.node(obj)
        if isinstance(obj, self.spec.TaskRef):
            return self.ref(obj.key)
        return self.handles(obj)


_RUN_EXPR = None
_IDENTITY = None


def _pack(expr: Any, deps: tuple) -> RunSpec:
    """A RunSpec for one node's expression (a direct call whenever possible)."""
    global _RUN_EXPR, _IDENTITY
    if _IDENTITY is None:
        _RUN_EXPR, _IDENTITY = serialize_function(_run_expr), serialize_function(_identity)
    typ = type(expr)
    if typ is _Ref:
        return RunSpec(_IDENTITY, serialize(((TaskRef(expr.key),), {})), True)
    if typ not in _EXPR:
        return RunSpec(_IDENTITY, serialize(((expr,), {})), False)
    if typ is _Call and expr.func is not _call_node:
        try:
            args = tuple(_flat(a) for a in expr.args)
            kwargs = {k: _flat(v) for k, v in expr.kwargs.items()}
        except _NotFlat:
            pass
        else:
            return RunSpec(serialize_function(expr.func), serialize((args, kwargs)), bool(deps))
    values = {dep: TaskRef(dep) for dep in deps}
    return RunSpec(_RUN_EXPR, serialize(((expr, values), {})), bool(deps))


def _is_dask_graph(dsk: Any) -> bool:
    """Whether ``dsk`` holds dask task-spec objects (never imports dask itself)."""
    if type(dsk).__module__.split(".")[0] == "dask":
        return True
    spec = sys.modules.get("dask._task_spec")
    if spec is None:
        return False
    return any(isinstance(v, spec.GraphNode) for v in dsk.values())


def _normalize(dsk: Any) -> tuple[dict, Any]:
    """The graph as a dict, and the dask._task_spec module if it is a dask graph."""
    if not isinstance(dsk, Mapping):
        if not hasattr(dsk, "__dask_graph__"):
            raise TypeError(f"expected a dask graph (a mapping), got {type(dsk).__name__}")
        dsk = dsk.__dask_graph__()
    if not _is_dask_graph(dsk):
        return dict(dsk), None
    from dask import _task_spec
    return _task_spec.convert_legacy_graph(dict(dsk)), _task_spec


def _priorities(dsk: dict, is_dask: bool) -> dict | None:
    """dask.order's memory-friendly priorities, when dask is already loaded."""
    if len(dsk) < 3 or (not is_dask and "dask" not in sys.modules):
        return None
    try:
        from dask.order import order
        return order(dsk)
    except Exception as e:  # ordering is an optimisation only
        logger.debug("dask.order failed (%s); keeping graph order", e)
        return None


def _check_acyclic(exprs: dict, graph_key: dict) -> None:
    """Raise ValueError if the graph's keys depend on each other in a cycle.

    ``graph_key`` maps a dependency's key on the cluster back to its graph key.
    """
    waiting = {}
    dependents: dict[Any, list] = {}
    for key, (_, deps) in exprs.items():
        inner = [g for g in (graph_key.get(d, d) for d in deps) if g in exprs]
        waiting[key] = len(inner)
        for dep in inner:
            dependents.setdefault(dep, []).append(key)
    ready = [k for k, n in waiting.items() if n == 0]
    while ready:
        key = ready.pop()
        del waiting[key]
        for child in dependents.get(key, ()):
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    if waiting:
        stuck = ", ".join(repr(k) for k in list(waiting)[:5])
        raise ValueError(f"the graph has a cycle: {len(waiting)} keys wait on each other "
                         f"(among them {stuck})")


def private_key(key: Any, tag: str) -> Any:
    """``key`` made private to one call: its name gets ``-<tag>``, its shape stays.

    ``'x'`` becomes ``'x-<tag>'`` and ``('x', 0, 1)`` becomes ``('x-<tag>', 0, 1)``,
    so the name a dashboard or a log shows is still the graph's.
    """
    if isinstance(key, str):
        return f"{key}-{tag}"
    if isinstance(key, tuple) and key and isinstance(key[0], str):
        return (f"{key[0]}-{tag}", *key[1:])
    return (f"get-{tag}", key)


def graph_to_tasks(dsk: Any, wants: list, tag: str | None = None) -> tuple[list, list]:
    """Pack a graph: ``(tasks, wants)`` ready for ``Executor._send_tasks``.

    With dask's priorities, tasks, their dependencies and the wanted keys are
    ordered so that the center activates (and queues) them in that order;
    ``wants`` comes back as graph keys in that order.  With a ``tag``, every
    key of the graph is sent as ``private_key(key, tag)``, so the graph shares
    nothing with what the cluster already holds under the same names; a
    wanted key missing from such a graph raises ``KeyError`` (without a tag,
    it may name data already on the cluster).
    """
    dsk, spec = _normalize(dsk)
    names = None
    if tag is not None:
        for key in wants:
            if key not in dsk:
                raise KeyError(key)
        names = {k: private_key(k, tag) for k in dsk}
    convert = _Converter(dsk, spec, names)
    to_expr = convert.raw if spec is None else convert.node
    exprs = {}
    for key, value in dsk.items():
        convert.deps = {}
        exprs[key] = (to_expr(value), tuple(convert.deps))
    graph_key = {v: k for k, v in names.items()} if names else {}
    _check_acyclic(exprs, graph_key)
    priority = _priorities(dsk, spec is not None)
    if priority is not None:
        last = len(priority)
        rank = lambda k: priority.get(k, last)  # noqa: E731
        dep_rank = lambda k: priority.get(graph_key.get(k, k), last)  # noqa: E731
        order = sorted(exprs, key=rank)
        exprs = {k: (e, tuple(sorted(deps, key=dep_rank, reverse=True)))
                 for k in order for e, deps in [exprs[k]]}
        wants = sorted(wants, key=rank, reverse=True)
    name = (lambda k: k) if names is None else names.__getitem__
    tasks = [(name(key), _pack(expr, deps), deps, None) for key, (expr, deps) in exprs.items()]
    return tasks, wants


def submit_graph(session: Executor, dsk: Any, keys: list, private: bool = False) -> dict:
    """Send a whole graph in one message; graph key -> Future for each of ``keys``.

    ``private`` sends the graph under keys of its own (see ``graph_to_tasks``).
    """
    tag = uuid.uuid4().hex if private else None
    tasks, ordered = graph_to_tasks(dsk, list(dict.fromkeys(keys)), tag)
    cluster_keys = ordered if tag is None else [private_key(k, tag) for k in ordered]
    return dict(zip(ordered, session._send_tasks(tasks, cluster_keys), strict=True))


# ---------------------------------------------------------------------------
# The scheduler function


def _flatten_keys(keys: Any) -> Iterator[Any]:
    if isinstance(keys, list):
        for k in keys:
            yield from _flatten_keys(k)
    else:
        yield keys


def _nest(keys: Any, values: dict) -> Any:
    """The values of ``keys``, lists of keys becoming tuples (dask's own schedulers do so)."""
    if isinstance(keys, list):
        return tuple(_nest(k, values) for k in keys)
    return values[keys]


def get_with(session: Executor, dsk: Any, keys: Any) -> Any:
    """Compute ``keys`` of ``dsk`` on ``session``'s cluster; release everything after.

    The graph runs under keys private to this call (``private_key``): a graph
    key names a value only within its graph, so another graph, or a key a
    client holds, that uses the same name for something else is never
    mistaken for it.  Whatever happens, nothing the call created stays held.
    """
    flat = list(dict.fromkeys(_flatten_keys(keys)))
    futures = submit_graph(session, dsk, flat, private=True)
    try:
        values = dict(zip(futures, session.gather(list(futures.values())), strict=True))
    finally:
        session._release(futures.values())
    return _nest(keys, values)


def get(host: str, port: int, dsk: Any, keys: Any, *, timeout: float = 10.0,
        auth_key: bytes | str | None = None, tls_ca: str | None = None,
        tls_cert: str | None = None, tls_key: str | None = None, **kwargs: Any) -> Any:
    """Compute ``keys`` of the dask graph ``dsk`` on the cluster whose center is ``host:port``.

    ``keys`` is one key or nested lists of keys; the values come back in the
    same nesting.  Works for raw graphs (``{'a': 1, 'b': (inc, 'a')}``) and
    as a dask scheduler: ``x.compute(scheduler=partial(get, host, port))``.
    A task that raises re-raises its exception here.  The connection
    options are those of ``Executor``; one session per center and options
    is kept for the life of the process.  Other keyword arguments (which
    dask passes along) are ignored.
    """
    session = shared_session(format_address(host, int(port)), timeout=timeout,
                             auth_key=auth_key, tls_ca=tls_ca, tls_cert=tls_cert,
                             tls_key=tls_key)
    return get_with(session, dsk, keys)


# ---------------------------------------------------------------------------
# Collections: compute, persist, default scheduler


def compute(session: Executor, collections: Any, *, optimize_graph: bool = True,
            traverse: bool = True) -> Any:
    """Start computing collections; a Future for one, a list (non-dask items kept) for several."""
    import dask
    from dask._expr import FinalizeCompute
    from dask.base import collections_to_expr
    from dask.core import flatten

    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    if traverse:
        items = [dask.delayed(a) if isinstance(a, (list, set, tuple, dict, Iterator)) else a
                 for a in items]
    variables = [a for a in items if dask.is_dask_collection(a)]
    futures: dict = {}
    names: list = []
    if variables:
        expr = FinalizeCompute(collections_to_expr(variables, optimize_graph)).optimize()
        names = list(flatten(expr.__dask_keys__()))
        futures = submit_graph(session, expr, names)
    position = iter(names)
    result = [futures[next(position)] if dask.is_dask_collection(a) else a for a in items]
    return result[0] if singleton else result


def persist(session: Executor, collections: Any, *, optimize_graph: bool = True) -> Any:
    """The same collections, each backed by Futures of its keys (``__dask_postpersist__``).

    Returns at once; the Futures finish in the background.
    """
    from dask._expr import CompositeExpr, _ExprSequence
    from dask.base import _rebuild_composite_collection, collections_to_expr
    from dask.core import flatten

    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    expr = collections_to_expr(items, optimize_graph)  # a sequence: one part per item
    composite = any(isinstance(e, CompositeExpr) for e in expr.operands)
    expr = expr.optimize()
    parts = list(expr.operands) if composite and isinstance(expr, _ExprSequence) else []
    if len(parts) != len(items):
        parts = [None] * len(items)
    keys = expr.__dask_keys__()
    futures = submit_graph(session, expr, list(flatten(keys)))
    result = []
    for item, part, item_keys in zip(items, parts, keys, strict=True):
        mine = {k: futures[k] for k in flatten([item_keys])}
        if isinstance(part, CompositeExpr):
            result.append(_rebuild_composite_collection(item, part, mine,
                                                        cull_to_child_keys=True))
        else:
            rebuild, args = item.__dask_postpersist__()
            result.append(rebuild(mine, *args))
    return result[0] if singleton else result


__all__ = ["compute", "get", "get_with", "graph_to_tasks", "persist", "submit_graph"]
