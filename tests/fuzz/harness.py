"""What every fuzz target shares: its seed corpus, its hypothesis settings, bounded calls, and the rule.

The rule each target asserts, for every input: the product answers with a clear error of our error tree
(:class:`~mesh_identity.errors.MeshIdentityError`; for servers a gRPC status or an HTTP 4xx) or a valid
result; never a crash (any other exception, in the call or in a thread it started), never a hang (every call
is bounded), never a leaked key (no PEM private key, token or passphrase in an error message or a log line).

Seed corpus: ``tests/fuzz/corpus/<target>/``, one input per file, replayed before the generated inputs.

Known findings (:data:`KNOWN`): a crash a target found in product code that its owner has not fixed yet. Its
corpus files are strict ``xfail`` cases (they pass again, and so fail the run, once the product is fixed),
and the generated inputs that crash the same way (same exception type raised in the same product function)
are counted instead of failing the run. Both go when the entry is removed, which is all it takes once the
fix is in.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import queue
import re
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, settings
from hypothesis import strategies as st

from mesh_identity.errors import MeshIdentityError

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
PRODUCT = tuple(str(ROOT / package) + "/" for package in ("mesh_identity", "providers", "xds_sds", "plugins"))
PRODUCT_LOGGERS = ("mesh_identity", "providers", "xds_sds", "plugins")

# inputs tried, per target (generated and corpus), and hits of known findings: printed at the end of the run
INPUTS: collections.Counter[str] = collections.Counter()
CORPUS_INPUTS: collections.Counter[str] = collections.Counter()
KNOWN_HITS: collections.Counter[str] = collections.Counter()


def fuzz_settings(max_examples: int, *, shrink: bool = True) -> settings:
    """A fixed budget: ``max_examples`` inputs, derandomized (the same inputs on every run), no deadline, no
    example database (nothing written next to the checkout)."""
    phases = (Phase.explicit, Phase.generate, Phase.shrink) if shrink else (Phase.explicit, Phase.generate)
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


# -- known findings ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """A crash found in product code, until its owner fixes it. ``signatures``: how it shows, each
    ``(exception type, where)``, where is the innermost product function (``path/of/module.py:function``), or for
    a server the method and what went wrong; ``corpus`` lists the ``<target>/<file>`` seeds that reproduce it."""

    id: str
    signatures: tuple[tuple[str, str], ...]
    corpus: tuple[str, ...]
    reason: str

    def matches(self, signature: tuple[str, str]) -> bool:
        """``"*"`` as the exception type: any exception raised in that function."""
        return any(where == signature[1] and kind in ("*", signature[0]) for kind, where in self.signatures)


KNOWN: tuple[Finding, ...] = ()


def known_finding(signature: tuple[str, str]) -> Finding | None:
    return next((f for f in KNOWN if f.matches(signature)), None)


def signature(err: BaseException) -> tuple[str, str]:
    """``(exception type, innermost product function)``: how a crash is told apart from another."""
    where = "outside the product"
    for frame in traceback.extract_tb(err.__traceback__):
        if frame.filename.startswith(PRODUCT):
            where = f"{Path(frame.filename).relative_to(ROOT)}:{frame.name}"
    return type(err).__name__, where


def formatted(err: BaseException) -> str:
    """The traceback of ``err`` (its last 40 frames: a RecursionError has a thousand)."""
    return "".join(traceback.format_exception(err, limit=-40))


# -- the corpus ----------------------------------------------------------------------------------------------


def corpus_files(target: str) -> list[Path]:
    directory = CORPUS / target
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    assert files, f"the seed corpus {directory} is empty"
    return files


def corpus_cases(target: str) -> list[Any]:
    """Every file of the target's corpus as a pytest param; those of a known finding are strict xfails."""
    cases = []
    for path in corpus_files(target):
        key = f"{target}/{path.name}"
        finding = next((f for f in KNOWN if key in f.corpus), None)
        marks = (
            [pytest.mark.xfail(strict=True, reason=f"known finding {finding.id}: {finding.reason}")] if finding else []
        )
        cases.append(pytest.param(path, id=path.name, marks=marks))
    return cases


# -- bounded calls -------------------------------------------------------------------------------------------


class Hang(AssertionError):
    """A call did not return within its bound."""


class _Worker:
    """A daemon thread that runs calls one at a time; abandoned (a new one is made) when a call hangs."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], list[Any], threading.Event]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="fuzz-call", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            call, slot, done = self.jobs.get()
            try:
                slot.append((True, call()))
            except BaseException as err:
                slot.append((False, err))
            finally:
                done.set()
                del call, slot, done


_workers: list[_Worker] = []  # the current worker (none before the first call, or after a hang)
_worker_lock = threading.Lock()


def bounded(call: Callable[[], Any], timeout: float, what: str = "the call") -> Any:
    """``call()`` in a worker thread, at most ``timeout`` seconds; :class:`Hang` when it takes longer."""
    with _worker_lock:
        if not _workers:
            _workers.append(_Worker())
        worker = _workers[0]
    slot: list[Any] = []
    done = threading.Event()
    worker.jobs.put((call, slot, done))
    if not done.wait(timeout):
        with _worker_lock:
            if _workers and _workers[0] is worker:
                _workers.clear()  # it is stuck in the call: leave it, later calls get a new one
        raise Hang(f"{what} did not return within {timeout}s (a hang)")
    ok, value = slot[0]
    if ok:
        return value
    raise value


# -- what the process logs and which threads die -------------------------------------------------------------


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._records_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._records_lock:
            self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        with self._records_lock:
            records, self.records = self.records, []
        return records


@dataclass
class Observed:
    """Log records and thread deaths since the last :meth:`Watch.take`."""

    records: list[logging.LogRecord] = field(default_factory=list)
    thread_errors: list[BaseException] = field(default_factory=list)

    def lines(self) -> Iterator[str]:
        for record in self.records:
            try:
                text = record.getMessage()
            except Exception:  # a bad format string is a product bug too, but not this rule's
                text = f"{record.msg} {record.args}"
            yield f"{record.name}: {text}"
            if record.exc_info and record.exc_info[1] is not None:
                yield formatted(record.exc_info[1])


class Watch:
    """While active: every record of every logger (product loggers at DEBUG), and exceptions that end a
    thread (``threading.excepthook``)."""

    def __init__(self) -> None:
        self._collector = _Collector()
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._saved: list[tuple[logging.Logger, int]] = []
        self._hook: Any = None

    def __enter__(self) -> Watch:
        logging.getLogger().addHandler(self._collector)
        for name in PRODUCT_LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.level))
            logger.setLevel(logging.DEBUG)
        self._hook = threading.excepthook
        threading.excepthook = self._thread_died
        return self

    def __exit__(self, *exc: object) -> None:
        threading.excepthook = self._hook
        for logger, level in self._saved:
            logger.setLevel(level)
        logging.getLogger().removeHandler(self._collector)

    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and not isinstance(args.exc_value, SystemExit):
            with self._lock:
                self._errors.append(args.exc_value)

    def take(self) -> Observed:
        with self._lock:
            errors, self._errors = self._errors, []
        return Observed(self._collector.take(), errors)


# -- the rule ------------------------------------------------------------------------------------------------

_SERVICER = re.compile(r"raised by servicer method \[([^\]]+)\]")
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def secret_markers(*secrets: str | bytes) -> tuple[str, ...]:
    """What must never show in a message: each secret, and for a PEM private key each of its base64 lines."""
    markers: list[str] = []
    for secret in secrets:
        text = secret.decode() if isinstance(secret, bytes) else secret
        if "PRIVATE KEY-----" in text:
            markers += [line for line in text.splitlines() if line and not line.startswith("-----")]
        elif text:
            markers.append(text)
    return tuple(markers)


def leaks_in(text: str, secrets: Sequence[str]) -> list[str]:
    found = ["a PEM private key block"] if _PEM_KEY.search(text) else []
    found += [f"the secret {s[:6]}..." for s in secrets if len(s) >= 8 and s in text]
    return found


@dataclass
class Rule:
    """The rule of one target: which errors are ours, which secrets the process holds, the bound per call."""

    target: str
    allowed: tuple[type[BaseException], ...] = (MeshIdentityError,)
    secrets: tuple[str, ...] = ()
    timeout: float = 5.0
    tolerate_known: bool = True
    watch: Watch | None = None
    _hits: set[str] = field(default_factory=set)  # known findings already counted for the current input
    _settled: bool = True  # the last input's observations were checked (False: it failed before that)

    def call(self, call: Callable[[], Any], what: str = "the call") -> tuple[bool, Any]:
        """Run ``call`` bounded; ``(True, result)`` or ``(False, our error)``. AssertionError for a crash, a
        hang or a leak (a crash of a known finding is counted instead, in generated inputs)."""
        self._hits.clear()
        if not self._settled and self.watch is not None:
            self.watch.take()  # what the last input left: it failed already, its report is out
        self._settled = False
        try:
            result = bounded(call, self.timeout, what)
        except Hang:
            raise
        except self.allowed as err:
            self.check_text(f"the error message of {what}", str(err))
            return False, err
        except Exception as err:
            self.crash(err, what)
            return False, err
        return True, result

    def crash(self, err: BaseException, what: str) -> None:
        """A crash: AssertionError, unless it is a known finding and generated inputs tolerate it."""
        sig = signature(err)
        message = f"{self.target}: {what} crashed with {sig[0]} in {sig[1]} (not an error of ours):\n{formatted(err)}"
        self.violation(sig, message, err)

    def violation(self, sig: tuple[str, str], message: str, cause: BaseException | None = None) -> None:
        """A break of the rule with signature ``sig``: counted when it is a known finding (in generated inputs),
        else AssertionError(``message``)."""
        finding = known_finding(sig)
        if finding is not None and self.tolerate_known:
            if finding.id not in self._hits:
                self._hits.add(finding.id)
                KNOWN_HITS[finding.id] += 1
                outcome(f"known finding {finding.id}")
            return
        raise AssertionError(message) from cause

    def check_text(self, label: str, text: str) -> None:
        leaks = leaks_in(text, self.secrets)
        if leaks:
            raise AssertionError(f"{self.target}: {label} leaks {', '.join(leaks)}: {text[:2000]!r}")

    def check_observed(self, observed: Observed, what: str = "the input") -> None:
        """Threads that died and log lines since the last check: no crash, no leak."""
        for err in observed.thread_errors:
            self.crash(err, f"a thread started for {what}")
        for record in observed.records:
            if record.exc_info and record.exc_info[1] is not None and record.levelno >= logging.ERROR:
                # something caught an exception and logged it as an error: the product's crash handlers
                # (the endpoint's 500), gRPC's "Unexpected [...] raised by servicer method [...]"
                err = record.exc_info[1]
                text = record.getMessage()
                servicer = _SERVICER.search(text)
                sig = signature(err)
                if servicer is not None and sig[1] == "outside the product":
                    sig = (sig[0], f"gRPC servicer {servicer[1]}")
                self.violation(
                    sig,
                    f"{self.target}: {what} crashed with {sig[0]} in {sig[1]} (logged by {record.name}: "
                    f"{text[:300]}):\n{formatted(err)}",
                    err,
                )
        for line in observed.lines():
            self.check_text("a log line", line)

    @contextlib.contextmanager
    def strictly(self) -> Iterator[Rule]:
        """No tolerance of known findings (a corpus replay: those are the strict xfail cases)."""
        saved, self.tolerate_known = self.tolerate_known, False
        try:
            yield self
        finally:
            self.tolerate_known = saved

    def settle(self, what: str = "the input") -> None:
        """Check what the input made the process log and which threads it killed (call once per input, after
        its calls)."""
        self._settled = True
        if self.watch is not None:
            self.check_observed(self.watch.take(), what)


def outcome(label: str) -> None:
    """Tell hypothesis's statistics (``--hypothesis-show-statistics``) what an input led to."""
    if currently_in_test_context():
        event(label)


def count(target: str, *, corpus: bool = False) -> None:
    (CORPUS_INPUTS if corpus else INPUTS)[target] += 1


# -- test servers ------------------------------------------------------------------------------------------


class QuietHTTPServer(ThreadingHTTPServer):
    """A loopback test server (daemon threads) that does not print a client's disconnect to stderr."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


def serve_in_thread(handler: type[BaseHTTPRequestHandler]) -> QuietHTTPServer:
    """``handler`` on an ephemeral loopback port, served by a daemon thread (``shutdown()`` stops it)."""
    server = QuietHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


# -- mutations -----------------------------------------------------------------------------------------------

INTERESTING_INTS = (0, 1, -1, 2, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63), 10**30)


def json_scalars(text: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(INTERESTING_INTS),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        text if text is not None else st.text(max_size=40),
    )


def _json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # a named function: hypothesis reads an extend function's source to check it uses its argument, and the
    # source of a lambda inside a call is not reliably found
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)


def json_values(text: st.SearchStrategy[str] | None = None, max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """JSON documents (what ``json.loads`` can return)."""
    return st.recursive(json_scalars(text), _json_containers, max_leaves=max_leaves)


Path_ = tuple[Any, ...]


def node_paths(value: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every node of a JSON-like tree, as the keys and indexes leading to it (the root is ``()``)."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            paths += node_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths += node_paths(child, (*prefix, index))
    return paths


def _get(value: Any, path: Path_) -> Any:
    for step in path:
        value = value[step]
    return value


_SMALL_TEXT = st.text(max_size=8)
_TEXT = st.text(max_size=20)
_KEY_TEXT = st.text(max_size=10)
_SCALARS = json_scalars()
_VALUES = json_values()
_INDEX = st.integers(0, 2**16)
_BIT = st.integers(0, 6)
_OP = st.integers(0, 9)
_REPEAT = st.integers(2, 50)
_NUMBERS = st.sampled_from((*INTERESTING_INTS, 0.5, -0.0, float("inf"), float("nan")))


def _text_mutation(draw: st.DrawFn, text: str, words: st.SearchStrategy[str] | None) -> str:
    choice = draw(_BIT)
    if choice == 0:
        return ""
    if choice == 1 and text:
        return text[: draw(_INDEX) % len(text)]
    if choice == 2 and text:
        i = draw(_INDEX) % len(text)
        return text[:i] + chr(ord(text[i]) ^ (1 << draw(_BIT))) + text[i + 1 :]
    if choice == 3:
        return text + draw(_SMALL_TEXT)
    if choice == 4 and words is not None:
        return draw(words)
    if choice == 5:
        return text * draw(_REPEAT)
    return draw(_TEXT)


def mutated(
    value: Any,
    max_mutations: int = 3,
    vocabulary: Sequence[Any] = (),
    values: st.SearchStrategy[Any] | None = None,
) -> st.SearchStrategy[Any]:
    """``value`` (a JSON-like tree) with up to ``max_mutations`` changes: a node replaced (by another type, a
    word of ``vocabulary``, a boundary value), deleted, duplicated, emptied, wrapped; a key added; a string
    cut, bit-flipped, extended or repeated. Zero changes is one of the choices."""
    replacement = values if values is not None else _VALUES
    words_list = [v for v in vocabulary if isinstance(v, str)]
    words = st.sampled_from(words_list) if words_list else None
    keys = (st.sampled_from([*words_list, ""]) | _KEY_TEXT) if words_list else _KEY_TEXT
    any_word = st.sampled_from(list(vocabulary)) if vocabulary else None

    @st.composite
    def strategy(draw: st.DrawFn) -> Any:
        tree = copy.deepcopy(value)
        for _ in range(draw(st.integers(0, max_mutations))):
            paths = node_paths(tree)
            path = paths[draw(_INDEX) % len(paths)]
            node = _get(tree, path)
            op = draw(_OP)
            if op == 0:
                new: Any = copy.deepcopy(draw(replacement))
            elif op == 1 and path:  # delete
                del _get(tree, path[:-1])[path[-1]]
                continue
            elif op == 2 and isinstance(node, dict):
                node[draw(keys)] = copy.deepcopy(draw(replacement))
                continue
            elif op == 3 and isinstance(node, list) and node:
                node.append(copy.deepcopy(node[draw(_INDEX) % len(node)]))
                continue
            elif op == 4 and isinstance(node, dict | list):
                new = type(node)()
            elif op == 5 and isinstance(node, str):
                new = _text_mutation(draw, node, words)
            elif op == 6 and isinstance(node, int | float) and not isinstance(node, bool):
                new = draw(_NUMBERS)
            elif op == 7:
                new = [node] if draw(st.booleans()) else {"": node}
            elif op == 8 and any_word is not None:
                new = copy.deepcopy(draw(any_word))  # a [] or {} of the vocabulary must stay empty
            else:
                new = draw(_SCALARS)
            if path:
                _get(tree, path[:-1])[path[-1]] = new
            else:
                tree = new
        return tree

    return strategy()


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes, max_mutations: int = 4) -> bytes:
    """``data`` with up to ``max_mutations`` byte-level changes: bit flips, cuts, deletions, insertions of
    random or boundary bytes, a duplicated slice. (Positions are drawn independently of the length, so the
    same draws replay the same way on data of another length.)"""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, max_mutations))):
        op = draw(_BYTE_OP)
        if not out:
            out += draw(_SOME_BYTES)
            continue
        i = draw(_INDEX) % len(out)
        if op == 0:
            out[i] ^= 1 << draw(_BIT8)
        elif op == 1:
            del out[i:]
        elif op == 2:
            del out[i : i + 1 + draw(_INDEX) % 16]
        elif op == 3:
            out[i:i] = draw(_SOME_BYTES)
        elif op == 4:
            out[i] = draw(st.sampled_from((0x00, 0x01, 0x7F, 0x80, 0xFF)))
        else:
            j = min(len(out), i + draw(_INDEX) % 64)
            out[j:j] = out[i:j]
    return bytes(out)


_BYTE_OP = st.integers(0, 5)
_BIT8 = st.integers(0, 7)
_SOME_BYTES = st.binary(min_size=1, max_size=16)
