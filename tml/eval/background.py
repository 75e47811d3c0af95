"""The background model: slow reasoning and tools that run beside the interaction loop and never block it.

The interaction model delegates by writing a marked text span, ``<delegate> what to do </delegate>``. The
``DelegationBridge`` watches the model's text, submits each closed span to a ``BackgroundModel``, and on every
later micro-turn hands over the results that have arrived by then as text for the background stream, in the
micro-turn in which they arrive (the same place the training data puts them).

Any model or tool plugs in by implementing ``submit(context) -> handle`` with a handle that has ``ready(now)``
and ``result()``. ``ToolBackground`` is the working reference: a function (calculator, clock, lookup, or yours)
run in a worker thread, its answer held back until ``delay_s`` of session time has passed, so evaluation is
deterministic while the loop still never waits on the thread.
"""

from __future__ import annotations

import ast
import operator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

from tml.text.tokenizer import TextTokenizer


class BackgroundHandle(Protocol):
    def ready(self, now: float) -> bool:
        """True once the result may be delivered at session time ``now`` (seconds)."""

    def result(self) -> str:
        """The result text (only called after ``ready``)."""


class BackgroundModel(Protocol):
    def submit(self, context: str, now: float) -> BackgroundHandle:
        """Start working on ``context`` at session time ``now``; return at once."""


@dataclass
class _ToolHandle:
    future: Future
    due: float

    def ready(self, now: float) -> bool:
        return now >= self.due - 1e-9 and self.future.done()  # 0.2 * k in binary is not exact

    def result(self) -> str:
        try:
            return str(self.future.result())
        except Exception as e:  # a failing tool is an answer too; the interaction goes on
            return f"error: {e}"


class ToolBackground:
    """Reference background model: ``tool(context) -> str`` in a worker thread, delivered ``delay_s`` after
    submission at the earliest (and never before the thread is done)."""

    def __init__(self, tool: Callable[[str], str], delay_s: float = 1.0, workers: int = 2):
        self.tool, self.delay_s = tool, delay_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tml-background")

    def submit(self, context: str, now: float) -> _ToolHandle:
        return _ToolHandle(self.pool.submit(self.tool, context), now + self.delay_s)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Mod: operator.mod}
_WORDS = {"plus": "+", "minus": "-", "times": "*", "divided by": "/", "over": "/", "to the power of": "**"}


def calculator(query: str) -> str:
    """Arithmetic in digits or words ("12 times 7", "3 + 4 * 2") -> "result: 84". Only numbers and + - * / % **."""
    expr = query.lower()
    for word, op in _WORDS.items():
        expr = expr.replace(word, op)
    expr = "".join(ch for ch in expr if ch in "0123456789.+-*/%() ")

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {query!r}")

    value = ev(ast.parse(expr.strip(), mode="eval"))
    return f"result: {int(value) if float(value).is_integer() else round(value, 4)}"


def lookup(table: dict[str, str]) -> Callable[[str], str]:
    """A tool that answers from ``table`` by the first key found in the query ("result: unknown" otherwise)."""

    def tool(query: str) -> str:
        q = query.lower()
        for key, value in table.items():
            if key.lower() in q:
                return f"result: {value}"
        return "result: unknown"

    return tool


@dataclass
class DelegationBridge:
    """Connects a session's text output to a background model and its results back to the background stream."""

    background: BackgroundModel
    text: TextTokenizer
    pending: list[BackgroundHandle] = field(default_factory=list)
    span: list[int] | None = None  # token ids inside an open <delegate> span
    submitted: list[str] = field(default_factory=list)

    def arrivals(self, now: float) -> list[int]:
        """Token ids of every result that has arrived by session time ``now`` (in submission order)."""
        ready = [h for h in self.pending if h.ready(now)]
        self.pending = [h for h in self.pending if h not in ready]
        return [i for h in ready for w in h.result().split() for i in self.text.word_ids(w)]

    def observe(self, text_ids: list[int], now: float) -> None:
        """Read one micro-turn of the model's text; submit each span that closes."""
        for tid in text_ids:
            if tid == self.text.delegate_id:
                self.span = []
            elif tid == self.text.end_delegate_id and self.span is not None:
                context = self.text.decode(self.span)
                self.submitted.append(context)
                self.pending.append(self.background.submit(context, now))
                self.span = None
            elif self.span is not None and tid != self.text.pad_id:
                self.span.append(tid)
