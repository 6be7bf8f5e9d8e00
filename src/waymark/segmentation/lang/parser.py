"""The text form of the audience language: :func:`parse` reads it (Lark, LALR) and checks it.

The grammar and the meaning are in ``docs/audiences.md``. Keywords are case-insensitive (ASCII
letters only); names and strings are not. Multi-word keywords (``within last``, ``not in``, ...)
are single terminals, so the bare ``within D`` of a sequence never competes with a step's
window. The Lark parse tree is turned into the AST without recursion, so deep nesting fails
with the checker's limit rather than with a ``RecursionError``.

Every problem is reported as ``line L, column C: reason`` under the path ``definition``.

Pure: no I/O.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from typing import Any, Final, Literal, TypeVar

from lark import Lark, Token, Transformer_NonRecursive, UnexpectedInput, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedToken
from lark.tree import Meta

from waymark.model.schemas import Schema
from waymark.segmentation.lang.ast import (
    Aggregate,
    AggregateFn,
    Ago,
    And,
    Anniversary,
    At,
    Attr,
    Between,
    Bound,
    Compare,
    CompareOp,
    Consent,
    ConsentStatus,
    Count,
    Duration,
    EventRef,
    Exists,
    Expr,
    Filter,
    FilterAnd,
    FilterNot,
    FilterOr,
    InAudience,
    InList,
    Last,
    Next,
    Not,
    Occurs,
    Older,
    Or,
    Pick,
    Prop,
    Scalar,
    Sequence,
    Test,
    Text,
    TextOp,
    Unit,
    Which,
    Window,
    Within,
)
from waymark.segmentation.lang.check import (
    ROOT,
    Positions,
    Problem,
    check_tree,
    did_you_mean,
    fail,
    quote,
)

__all__ = ["KEYWORDS", "MAX_TEXT_BYTES", "parse"]

#: Longest definition, in bytes of UTF-8.
MAX_TEXT_BYTES: Final = 64 * 1024

#: Keyword terminals and the words they match (a space matches any whitespace).
_KEYWORD_TERMINALS: Final = {
    "_AND": ("and",),
    "_OR": ("or",),
    "NOT": ("not",),
    "WHERE": ("where",),
    "_THEN": ("then",),
    "WITHIN": ("within",),
    "WITHIN_LAST": ("within last",),
    "WITHIN_NEXT": ("within next",),
    "MORE_THAN": ("more than",),
    "AGO": ("ago",),
    "BETWEEN": ("between",),
    "IN": ("in",),
    "NOT_IN": ("not in",),
    "IN_NEXT": ("in next",),
    "IN_AUDIENCE": ("in audience",),
    "STARTS_WITH": ("starts with",),
    "ENDS_WITH": ("ends with",),
    "CONTAINS": ("contains",),
    "EXISTS": ("exists",),
    "IS_MISSING": ("is missing",),
    "COUNT": ("count",),
    "AGG": ("sum", "avg", "min", "max"),
    "PICK": ("first", "last"),
    "CONSENT": ("consent",),
    "EVENT": ("event",),
    "ATTRIBUTE": ("attribute",),
    "TRUE": ("true",),
    "FALSE": ("false",),
    "STATUS": ("opted_in", "opted_out", "unknown"),
    "UNIT": ("minutes", "minute", "hours", "hour", "days", "day", "weeks", "week"),
}

#: Every word of a keyword (lower case). A name spelt like one must be quoted (event types) or
#: prefixed with ``attribute`` where a condition starts.
KEYWORDS: Final = frozenset(
    word for words in _KEYWORD_TERMINALS.values() for phrase in words for word in phrase.split()
)


def _keyword_pattern(phrases: tuple[str, ...]) -> str:
    """A regular expression matching any of ``phrases`` in any ASCII case, as whole words."""

    def word(text: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in text)

    alternatives = "|".join(r"\s+".join(word(w) for w in p.split()) for p in phrases)
    return f"(?:{alternatives})(?![A-Za-z0-9_])"


_RULES: Final = r"""
?start: expr

?expr: term
     | term (_OR term)+                                 -> or_expr
?term: factor
     | factor (_AND factor)+                            -> and_expr
?factor: condition
       | NOT factor                                     -> not_expr
       | "(" expr ")"

condition: head                                         -> single
         | head (_THEN step)+ WITHIN duration           -> sequence
         | COUNT "(" event ")" CMP NUMBER               -> count
         | AGG "(" target [where] [window] ")" CMP NUMBER -> aggregate
         | PICK "(" event ")" "." NAME test             -> pick
         | CONSENT "(" NAME "," NAME ")" CMP STATUS     -> consent
         | IN_AUDIENCE STRING                           -> in_audience

head: subject [where] [test]
step: [NOT] subject [where] [window]
event: subject [where] [window]
subject: NAME                                           -> bare
       | STRING                                         -> quoted
       | EVENT (NAME | STRING)                          -> forced_event
       | ATTRIBUTE NAME                                 -> forced_attribute
target: NAME                                            -> target_bare
      | STRING "." NAME                                 -> target_quoted

where: WHERE prop
     | WHERE "(" filter ")"
?filter: fterm
       | fterm (_OR fterm)+                             -> filter_or
?fterm: ffactor
      | ffactor (_AND ffactor)+                         -> filter_and
?ffactor: prop
        | NOT ffactor                                   -> filter_not
        | "(" filter ")"
prop: NAME test

test: CMP literal                                       -> compare
    | IN "(" literal ("," literal)* ")"                 -> in_list
    | NOT_IN "(" literal ("," literal)* ")"             -> not_in_list
    | (STARTS_WITH | ENDS_WITH | CONTAINS) STRING       -> text
    | EXISTS                                            -> exists
    | IS_MISSING                                        -> missing
    | window                                            -> within
    | IN_NEXT NUMBER UNIT                               -> anniversary
literal: STRING | NUMBER | TRUE | FALSE

window: WITHIN_LAST duration                            -> last_window
      | WITHIN_NEXT duration                            -> next_window
      | MORE_THAN duration AGO                          -> older_window
      | BETWEEN bound _AND bound                        -> between_window
bound: STRING                                           -> at
     | duration AGO                                     -> ago
duration: NUMBER UNIT

NAME: /[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*/
STRING: /"(?:[^"\\\x00-\x1f]|\\(?:["\\\/bfnrt]|u[0-9a-fA-F]{4}))*"/
NUMBER: /-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/
CMP: /!=|<=|>=|=|<|>/
COMMENT: /#[^\n]*/
%ignore /\s+/
%ignore COMMENT
"""


def _grammar() -> str:
    lines = [_RULES]
    for name, phrases in _KEYWORD_TERMINALS.items():
        # Keywords beat names; multi-word keywords beat their first word ("not in" vs "not").
        priority = 3 if any(" " in p for p in phrases) else 2
        lines.append(f"{name}.{priority}: /{_keyword_pattern(phrases)}/")
    return "\n".join(lines) + "\n"


@cache
def _lark() -> Lark:
    """The parser, built once (building the LALR tables is the slow part)."""
    return Lark(
        _grammar(),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=True,
    )


# -- reading -------------------------------------------------------------------------------------


def parse(text: str, schema: Schema, audiences: Collection[str] = ()) -> Expr:
    """Read the text form and check it against ``schema``; return the checked tree.

    ``audiences`` are the names ``in audience`` may refer to. Raises :class:`InvalidInput`
    whose issues (path ``definition``) each say ``line L, column C:``, what is wrong and a hint.
    A syntax error stops the reading at the first one; name and type problems are all listed.
    """
    problem = _precheck(text)
    if problem is not None:
        fail([problem])
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as error:
        syntax = _syntax_problem(text, error)
        fail([syntax])
    build = _Build(schema)
    expr: Expr = build.transform(tree)
    checked, problems = check_tree(expr, schema, audiences, build.positions)
    if build.problems or problems:
        fail([*build.problems, *problems])
    return checked


_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_COMMENT: Final = re.compile(r"#[^\n]*")


def _position(text: str, index: int) -> tuple[int, int]:
    """The 1-based line and column of ``text[index]``."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _precheck(text: object) -> Problem | None:
    """What makes ``text`` unreadable before any parsing: type, encoding, size, emptiness."""
    if not isinstance(text, str):
        return Problem(ROOT, f"expected the text of a definition, got {type(text).__name__}", 1, 1)
    surrogate = _SURROGATE.search(text)
    if surrogate is not None:
        line, column = _position(text, surrogate.start())
        code = ord(surrogate.group())
        return Problem(
            ROOT,
            f"the text holds U+{code:04X}, a lone surrogate, which is not valid Unicode; "
            "remove it or write the character it belongs to",
            line,
            column,
        )
    if len(text) * 4 > MAX_TEXT_BYTES and len(text.encode()) > MAX_TEXT_BYTES:
        size = 0
        for index, char in enumerate(text):  # the limit is crossed within MAX_TEXT_BYTES chars
            size += len(char.encode())
            if size > MAX_TEXT_BYTES:
                line, column = _position(text, index)
                return Problem(
                    ROOT,
                    f"the definition is longer than {MAX_TEXT_BYTES:,} bytes (64 KB); "
                    "split it into audiences joined with in audience",
                    line,
                    column,
                )
    if not _COMMENT.sub("", text).strip():
        return Problem(
            ROOT, 'the definition is empty; write a condition, e.g. country = "DE"', 1, 1
        )
    return None


# -- from the parse tree to the AST --------------------------------------------------------------

Reading = Literal["bare", "event", "attribute"]


@dataclass(frozen=True, slots=True)
class _Subject:
    """The name a condition or event starts with, and how it was written."""

    name: str
    reading: Reading
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class _Head:
    subject: _Subject
    where: Filter | None
    test: Test | None


@dataclass(frozen=True, slots=True)
class _Step:
    negation: Token | None
    subject: _Subject
    where: Filter | None
    window: Window | None


@dataclass(frozen=True, slots=True)
class _Target:
    """``event.property`` of an aggregate; ``path`` is None when the property is missing."""

    event: _Subject
    path: str | None
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class _Literal:
    value: Scalar
    line: int
    column: int


_TEXT_OPS: Final = {
    "STARTS_WITH": TextOp.STARTS_WITH,
    "ENDS_WITH": TextOp.ENDS_WITH,
    "CONTAINS": TextOp.CONTAINS,
}
_MAX_DIGITS: Final = 100
_N = TypeVar("_N")


def _where(token: Token) -> tuple[int, int]:
    """The line and column of a token (Lark types them as optional; the lexer sets them)."""
    return token.line or 1, token.column or 1


def _string(token: Token) -> str:
    value = json.loads(token.value)
    assert isinstance(value, str)
    return value


def _unit(token: Token) -> Unit:
    word = token.value.lower()
    return Unit(word if word.endswith("s") else word + "s")


@v_args(meta=True)
class _Build(Transformer_NonRecursive[Token, Any]):
    """Turns a parse tree into the AST, resolving bare names against the schema.

    Records where each node was read in :attr:`positions` and collects the problems found here
    (unknown or ambiguous names, misplaced tests) in :attr:`problems`; nodes already reported
    are marked so that the checker does not report them again.
    """

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        self.schema = schema
        self.positions = Positions()
        self.problems: list[Problem] = []

    # -- bookkeeping

    def _at(self, node: _N, line: int, column: int, field: str = "") -> _N:
        self.positions.record(node, line, column, field)
        return node

    def _here(self, node: _N, meta: Meta) -> _N:
        return self._at(node, meta.line, meta.column)

    def _problem(self, line: int, column: int, reason: str) -> None:
        self.problems.append(Problem(ROOT, reason, line, column))

    def _number(self, token: Token) -> int | float:
        if len(token.value) > _MAX_DIGITS:
            self._problem(
                *_where(token),
                f"number of {len(token.value):,} characters; numbers have at most "
                f"{_MAX_DIGITS} digits",
            )
            return 0
        if any(c in token.value for c in ".eE"):
            return float(token.value)
        return int(token.value)

    def _whole(self, token: Token, what: str, fallback: int) -> int:
        number = self._number(token)
        if isinstance(number, float):
            self._problem(*_where(token), f"{what} is a whole number, got {token.value}")
            return fallback
        return number

    # -- expressions

    def or_expr(self, meta: Meta, items: list[Expr]) -> Expr:
        return self._here(Or(tuple(items)), meta)

    def and_expr(self, meta: Meta, items: list[Expr]) -> Expr:
        return self._here(And(tuple(items)), meta)

    def not_expr(self, meta: Meta, children: list[Any]) -> Expr:
        _, item = children
        return self._here(Not(item), meta)

    def single(self, meta: Meta, children: list[Any]) -> Expr:
        (head,) = children
        return self._condition(head)

    def sequence(self, meta: Meta, children: list[Any]) -> Expr:
        head, *steps, _, gap = children
        refs = [self._sequence_start(head)]
        for index, step in enumerate(steps):
            if step.negation is not None and index < len(steps) - 1:
                self._problem(
                    step.negation.line,
                    step.negation.column,
                    "only the last step of a sequence may be negated (… then not B within D)",
                )
            refs.append(self._event_ref(step.subject, step.where, step.window, "a sequence step"))
        absent_last = steps[-1].negation is not None
        return self._here(Sequence(tuple(refs), gap, absent_last), meta)

    def count(self, meta: Meta, children: list[Any]) -> Expr:
        _, event, op, number = children
        value = self._whole(number, "a count", 0)
        node = self._here(Count(event, CompareOp(op.value), value), meta)
        return self._at(node, number.line, number.column, "value")

    def aggregate(self, meta: Meta, children: list[Any]) -> Expr:
        token, target, where, window, op, number = children
        event = self._event_ref(target.event, where, window, f"{token.value.lower()}(…)")
        node = Aggregate(
            AggregateFn(token.value.lower()),
            event,
            target.path or "",
            CompareOp(op.value),
            self._number(number),
        )
        if target.path is None:
            self.positions.skip(node)
        self._here(node, meta)
        self._at(node, target.line, target.column, "property")
        return self._at(node, number.line, number.column, "value")

    def pick(self, meta: Meta, children: list[Any]) -> Expr:
        token, event, path, test = children
        which = Which(token.value.lower())
        node = Pick(which, event, None if path.value == "timestamp" else path.value, test)
        self._here(node, meta)
        return self._at(node, path.line, path.column, "property")

    def consent(self, meta: Meta, children: list[Any]) -> Expr:
        _, channel, purpose, op, status = children
        if op.value not in ("=", "!="):
            self._problem(op.line, op.column, f"consent(…) is compared with = or !=, not {op}")
        node = Consent(
            channel.value, purpose.value, ConsentStatus(status.value.lower()), op.value == "!="
        )
        self._here(node, meta)
        self._at(node, channel.line, channel.column, "channel")
        return self._at(node, purpose.line, purpose.column, "purpose")

    def in_audience(self, meta: Meta, children: list[Any]) -> Expr:
        _, name = children
        node = self._here(InAudience(_string(name)), meta)
        return self._at(node, name.line, name.column, "audience")

    # -- names and events

    def head(self, meta: Meta, children: list[Any]) -> _Head:
        subject, where, test = children
        return _Head(subject, where, test)

    def step(self, meta: Meta, children: list[Any]) -> _Step:
        negation, subject, where, window = children
        return _Step(negation, subject, where, window)

    def event(self, meta: Meta, children: list[Any]) -> EventRef:
        subject, where, window = children
        return self._event_ref(subject, where, window, "")

    def bare(self, meta: Meta, children: list[Any]) -> _Subject:
        (name,) = children
        return _Subject(name.value, "bare", name.line, name.column)

    def quoted(self, meta: Meta, children: list[Any]) -> _Subject:
        (name,) = children
        return _Subject(_string(name), "event", name.line, name.column)

    def forced_event(self, meta: Meta, children: list[Any]) -> _Subject:
        _, name = children
        text = _string(name) if name.type == "STRING" else name.value
        return _Subject(text, "event", meta.line, meta.column)

    def forced_attribute(self, meta: Meta, children: list[Any]) -> _Subject:
        _, name = children
        return _Subject(name.value, "attribute", meta.line, meta.column)

    def target_bare(self, meta: Meta, children: list[Any]) -> _Target:
        (name,) = children
        event, dot, path = name.value.partition(".")
        subject = _Subject(event, "event", name.line, name.column)
        if not dot:
            self._problem(
                name.line,
                name.column,
                f"write the event and its property: e.g. sum({event}.revenue)",
            )
            return _Target(subject, None, name.line, name.column)
        return _Target(subject, path, name.line, name.column + len(event) + 1)

    def target_quoted(self, meta: Meta, children: list[Any]) -> _Target:
        event, path = children
        subject = _Subject(_string(event), "event", event.line, event.column)
        return _Target(subject, path.value, path.line, path.column)

    def _reading(self, subject: _Subject) -> Literal["event", "attribute"] | None:
        """How a name at the start of a condition reads; None (and a problem) if it cannot."""
        if subject.reading != "bare":
            return subject.reading
        name = subject.name
        is_attribute = name.split(".")[0] in self.schema.attributes
        is_event = name in self.schema.events
        if is_attribute and is_event:
            self._problem(
                subject.line,
                subject.column,
                f"{quote(name)} is both an attribute and an event type; write attribute {name} "
                f"or event {name}",
            )
            return None
        if is_attribute:
            return "attribute"
        if is_event:
            return "event"
        hint = did_you_mean(name, [*self.schema.attributes, *self.schema.events])
        self._problem(
            subject.line,
            subject.column,
            f"unknown name {quote(name)}: neither an attribute nor an event type of the "
            f"schema{hint}",
        )
        return None

    def _condition(self, head: _Head) -> Expr:
        """The condition a name starts: an attribute test or an event occurrence."""
        subject = head.subject
        reading = self._reading(subject)
        if reading == "attribute":
            return self._attribute(head)
        if reading is None:  # reported: keep the tree whole, but unchecked
            node: Expr
            if head.where is None and head.test is not None and not isinstance(head.test, Within):
                node = Attr(subject.name, head.test)
            else:
                window = head.test.window if isinstance(head.test, Within) else None
                node = Occurs(EventRef(subject.name, head.where, window))
            self.positions.skip(node)
            return self._at(node, subject.line, subject.column)
        window = self._event_window(subject, head.test)
        event = self._event_ref(subject, head.where, window, "")
        return self._at(Occurs(event), subject.line, subject.column)

    def _attribute(self, head: _Head) -> Attr:
        subject = head.subject
        name = subject.name
        if head.where is not None:
            line, column = self.positions.find(head.where, "where") or (subject.line, 1)
            self._problem(
                line,
                column,
                f"{name} is an attribute; where filters the properties of an event",
            )
        test = head.test
        if test is None:
            self._problem(
                subject.line,
                subject.column,
                f'attribute {name} needs a test, e.g. {name} exists or {name} = "…"',
            )
            test = Exists(True)
        return self._at(Attr(name, test), subject.line, subject.column)

    def _event_window(self, subject: _Subject, test: Test | None) -> Window | None:
        if test is None or isinstance(test, Within):
            return test.window if test is not None else None
        line, column = self.positions.find(test) or (subject.line, subject.column)
        name = subject.name
        self._problem(
            line,
            column,
            f"{quote(name)} is an event type: it takes only a window here (within last …, "
            "within next …, more than … ago, between … and …); to test a property write "
            f"{name} where property = …, to count write count({name}) >= 2",
        )
        return None

    def _event_ref(
        self, subject: _Subject, where: Filter | None, window: Window | None, context: str
    ) -> EventRef:
        ref = self._at(EventRef(subject.name, where, window), subject.line, subject.column)
        if subject.reading == "attribute":
            needed = f" ({context})" if context else ""
            self._problem(
                subject.line,
                subject.column,
                f"an event type is needed here{needed}; attribute {subject.name} is not one",
            )
            self.positions.skip(ref)
        return ref

    def _sequence_start(self, head: _Head) -> EventRef:
        subject = head.subject
        reading = self._reading(subject)
        if reading == "attribute":
            self._problem(
                subject.line,
                subject.column,
                f"a sequence step is an event type; {subject.name} is an attribute",
            )
        window = self._event_window(subject, head.test) if reading == "event" else None
        ref = self._event_ref(subject, head.where, window, "a sequence step")
        if reading != "event":
            self.positions.skip(ref)
        return ref

    # -- property filters

    def where(self, meta: Meta, children: list[Any]) -> Filter:
        token, filter_ = children
        found: Filter = filter_
        return self._at(found, *_where(token), "where")

    def filter_or(self, meta: Meta, items: list[Filter]) -> Filter:
        return self._here(FilterOr(tuple(items)), meta)

    def filter_and(self, meta: Meta, items: list[Filter]) -> Filter:
        return self._here(FilterAnd(tuple(items)), meta)

    def filter_not(self, meta: Meta, children: list[Any]) -> Filter:
        _, item = children
        return self._here(FilterNot(item), meta)

    def prop(self, meta: Meta, children: list[Any]) -> Filter:
        name, test = children
        return self._here(Prop(name.value, test), meta)

    # -- tests

    def compare(self, meta: Meta, children: list[Any]) -> Test:
        op, literal = children
        node = self._here(Compare(CompareOp(op.value), literal.value), meta)
        return self._at(node, literal.line, literal.column, "value")

    def in_list(self, meta: Meta, children: list[Any]) -> Test:
        return self._list(meta, children, negated=False)

    def not_in_list(self, meta: Meta, children: list[Any]) -> Test:
        return self._list(meta, children, negated=True)

    def _list(self, meta: Meta, children: list[Any], *, negated: bool) -> Test:
        _, *literals = children
        node = self._here(InList(tuple(lit.value for lit in literals), negated), meta)
        for index, lit in enumerate(literals):
            self._at(node, lit.line, lit.column, f"values[{index}]")
        return node

    def text(self, meta: Meta, children: list[Any]) -> Test:
        op, value = children
        node = self._here(Text(_TEXT_OPS[op.type], _string(value)), meta)
        return self._at(node, value.line, value.column, "value")

    def exists(self, meta: Meta, children: list[Any]) -> Test:
        return self._here(Exists(True), meta)

    def missing(self, meta: Meta, children: list[Any]) -> Test:
        return self._here(Exists(False), meta)

    def within(self, meta: Meta, children: list[Any]) -> Test:
        (window,) = children
        return self._here(Within(window), meta)

    def anniversary(self, meta: Meta, children: list[Any]) -> Test:
        _, number, unit = children
        if _unit(unit) is not Unit.DAYS:
            self._problem(
                unit.line,
                unit.column,
                f"in next N days counts days, not {unit.value}; e.g. in next 14 days",
            )
        node = self._here(Anniversary(self._whole(number, "a number of days", 0)), meta)
        return self._at(node, number.line, number.column, "days")

    def literal(self, meta: Meta, children: list[Any]) -> _Literal:
        (token,) = children
        value: Scalar
        if token.type == "STRING":
            value = _string(token)
        elif token.type == "NUMBER":
            value = self._number(token)
        else:
            value = token.type == "TRUE"
        return _Literal(value, token.line, token.column)

    # -- windows

    def last_window(self, meta: Meta, children: list[Any]) -> Window:
        _, duration = children
        return self._here(Last(duration), meta)

    def next_window(self, meta: Meta, children: list[Any]) -> Window:
        _, duration = children
        return self._here(Next(duration), meta)

    def older_window(self, meta: Meta, children: list[Any]) -> Window:
        _, duration, _ = children
        return self._here(Older(duration), meta)

    def between_window(self, meta: Meta, children: list[Any]) -> Window:
        _, start, end = children
        return self._here(Between(start, end), meta)

    def at(self, meta: Meta, children: list[Any]) -> Bound:
        (text,) = children
        return self._here(At(_string(text)), meta)

    def ago(self, meta: Meta, children: list[Any]) -> Bound:
        duration, _ = children
        return self._here(Ago(duration), meta)

    def duration(self, meta: Meta, children: list[Any]) -> Duration:
        number, unit = children
        amount = self._whole(number, "a duration", 1)
        return self._here(Duration(amount, _unit(unit)), meta)


# -- syntax errors in words ----------------------------------------------------------------------

#: What each terminal is, for "expected ..." (every terminal of the grammar has an entry).
TERMINAL_WORDS: Final = {
    "$END": "the end of the text",
    "NAME": "a name",
    "STRING": "a string in double quotes",
    "NUMBER": "a number",
    "CMP": "a comparison (=, !=, <, <=, >, >=)",
    "LPAR": '"("',
    "RPAR": '")"',
    "COMMA": '","',
    "DOT": '"."',
    "AGG": "sum, avg, min or max",
    "PICK": "first or last",
    "STATUS": "a consent status (opted_in, opted_out or unknown)",
    "UNIT": "a unit (minutes, hours, days or weeks)",
    **{
        name: " or ".join(f'"{p}"' for p in phrases)
        for name, phrases in _KEYWORD_TERMINALS.items()
        if name not in ("AGG", "PICK", "STATUS", "UNIT")
    },
}

#: Sets of terminals described together when all are expected.
_GROUPS: Final = (
    (
        frozenset(
            {
                "NAME",
                "STRING",
                "EVENT",
                "ATTRIBUTE",
                "COUNT",
                "AGG",
                "PICK",
                "CONSENT",
                "IN_AUDIENCE",
                "NOT",
                "LPAR",
            }
        ),
        'a condition (a name, count(…), sum(…), first(…), consent(…), in audience, not or "(")',
    ),
    (
        frozenset(
            {
                "CMP",
                "IN",
                "NOT_IN",
                "STARTS_WITH",
                "ENDS_WITH",
                "CONTAINS",
                "EXISTS",
                "IS_MISSING",
                "IN_NEXT",
            }
        ),
        "a test (= …, in (…), not in (…), starts with …, ends with …, contains …, exists, "
        "is missing, in next … days)",
    ),
    (
        frozenset({"WITHIN_LAST", "WITHIN_NEXT", "MORE_THAN", "BETWEEN"}),
        "a window (within last …, within next …, more than … ago, between … and …)",
    ),
    (
        frozenset({"STRING", "NUMBER", "TRUE", "FALSE"}),
        "a value (a string in double quotes, a number, true or false)",
    ),
)
_ORDER: Final = {name: index for index, name in enumerate(TERMINAL_WORDS)}


def _expected(names: set[str]) -> str:
    """The expected terminals in words: ``a name, "(" or the end of the text``."""
    left = set(names)
    parts: list[str] = []
    for group, words in _GROUPS:
        if group <= left:
            parts.append(words)
            left -= group
    end = "$END" in left
    left.discard("$END")
    ordered = sorted(left, key=lambda n: (_ORDER.get(n, len(_ORDER)), n))
    parts += [TERMINAL_WORDS.get(n, n.lower()) for n in ordered]
    if end:
        parts.append(TERMINAL_WORDS["$END"])
    if not parts:
        return "nothing more"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _accepted(error: UnexpectedInput) -> set[str]:
    """The terminals the parser could take where it stopped (exact, from its state)."""
    interactive = getattr(error, "interactive_parser", None)
    if interactive is not None:
        return set(interactive.accepts())
    return set(getattr(error, "expected", None) or getattr(error, "allowed", None) or ())


_WORD: Final = re.compile(r"[\w.]+|\S")
_STRING_START: Final = re.compile(r'"(?:[^"\\\n]|\\.)*("?)')
_SMART_QUOTES: Final = "“”„‟«»‘’"


def _syntax_problem(text: str, error: UnexpectedInput) -> Problem:
    expected = _accepted(error)
    if isinstance(error, UnexpectedCharacters):
        reason = _bad_character(text, error.pos_in_stream or 0, expected)
        return Problem(ROOT, reason, error.line, error.column)
    if isinstance(error, UnexpectedToken):
        token = error.token
        if token.type == "$END":
            line, column = _position(text, len(text.rstrip()))
            return Problem(
                ROOT, f"the text ends too early; expected {_expected(expected)}", line, column
            )
        reason = f"unexpected {_shown(token)}; expected {_expected(expected)}"
        hint = _token_hint(token, expected) or _keyword_hint(text, token.start_pos, expected)
        return Problem(ROOT, reason + hint, *_where(token))
    line = error.line if isinstance(error.line, int) else 1
    column = error.column if isinstance(error.column, int) else 1
    return Problem(ROOT, f"cannot read the text here; expected {_expected(expected)}", line, column)


def _shown(token: Token) -> str:
    if token.type == "STRING":
        return f"the string {quote(_string(token))}"
    if token.type == "NUMBER":
        return f"the number {token.value[:40]}"
    return quote(token.value)


def _token_hint(token: Token, expected: set[str]) -> str:
    if token.type == "NAME" and "STRING" in expected and "NAME" not in expected:
        return f'; text values need double quotes: "{token.value}"'
    if token.type == "WITHIN" and "WITHIN_LAST" in expected:
        return (
            '; a window is "within last …" or "within next …"; a bare "within D" ends a '
            "sequence (a then b within 1 hour)"
        )
    return ""


_CALLS: Final = frozenset({"count", "sum", "avg", "min", "max", "first", "last", "consent"})
_PREVIOUS_WORD: Final = re.compile(r"([A-Za-z_]+)\s*$")


def _keyword_hint(text: str, index: int | None, expected: set[str]) -> str:
    """A hint when a name spelt like a keyword (``first = 1``) was read as the keyword."""
    if index is None or expected != {"LPAR"}:
        return ""
    match = _PREVIOUS_WORD.search(text, 0, index)
    if match is None or match.group(1).lower() not in _CALLS:
        return ""
    word = match.group(1)
    return (
        f"; {word} is a keyword: write attribute {word} for an attribute of that name, or "
        f'"{word}" for an event type'
    )


def _bad_character(text: str, index: int, expected: set[str]) -> str:
    char = text[index]
    if char == '"':
        match = _STRING_START.match(text, index)
        if match is None or not match.group(1):
            return 'unterminated string: close it with " on the same line'
        return (
            'invalid string: strings use JSON escapes (\\", \\\\, \\n, \\t, \\u00e9) and cannot '
            "hold line breaks or other control characters"
        )
    if char == "'":
        return 'strings use double quotes ("), not single quotes'
    if char in _SMART_QUOTES:
        return f'unexpected {char}; use straight double quotes (") around strings'
    if char.isprintable() and not char.isspace():
        word = _WORD.match(text, index)
        found = quote(word.group() if word is not None else char)
    else:
        found = f"the character U+{ord(char):04X} ({unicodedata.name(char, 'unnamed')})"
    hint = ""
    if not char.isascii() and char.isalnum():
        hint = (
            "; names use ASCII letters, digits and _ (write an event type with other "
            'characters in double quotes, e.g. "Commande validée")'
        )
    hint = hint or _keyword_hint(text, index, expected)
    return f"unexpected {found}; expected {_expected(expected)}{hint}"
