"""A parser for the InfluxQL subset Grafana's InfluxDB datasource and our dashboards send.

It turns query text into small statement objects that :mod:`millstream_cloud.grafana.engine`
runs over any storage backend. What it does not know it refuses with an
:class:`InfluxQLError` whose message reads like InfluxDB's own ("error parsing query:
found X, expected Y at line 1, char N"), so Grafana shows the user something useful.

Covered: ``SELECT`` of fields, tags and aggregates (``mean min max last first count
sum``, ``AS`` aliases, ``*``), ``FROM`` with quoted identifiers and ``db.rp.`` prefixes,
``WHERE`` on tags, fields and time, ``GROUP BY time(...)`` (with offset), tags and ``*``,
``fill(...)``, ``ORDER BY time``, ``LIMIT``/``OFFSET``/``SLIMIT``/``SOFFSET``, and
``SHOW MEASUREMENTS | TAG KEYS | TAG VALUES | FIELD KEYS | DATABASES | RETENTION POLICIES``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

# --------------------------------------------------------------------------- errors


class InfluxQLError(Exception):
    """A query InfluxDB would reject (or that Millstream's subset does not cover)."""


class ParseError(InfluxQLError):
    """The text is not a query we can parse; the HTTP layer answers 400 like InfluxDB."""


# --------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class VarRef:
    name: str
    dtype: str | None = None  # from a "name"::tag or "name"::field cast


@dataclass(frozen=True)
class Wildcard:
    pass


@dataclass(frozen=True)
class StringLit:
    value: str


@dataclass(frozen=True)
class NumberLit:
    value: int | float


@dataclass(frozen=True)
class DurationLit:
    ns: int


@dataclass(frozen=True)
class BoolLit:
    value: bool


@dataclass(frozen=True)
class RegexLit:
    pattern: str

    def compile(self) -> re.Pattern[str]:
        try:
            return re.compile(self.pattern)
        except re.error as exc:
            raise InfluxQLError(f"invalid regular expression /{self.pattern}/: {exc}") from None


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class BinaryExpr:
    op: str
    lhs: Expr
    rhs: Expr


Expr = (
    VarRef | Wildcard | StringLit | NumberLit | DurationLit | BoolLit | RegexLit | Call | BinaryExpr
)


@dataclass(frozen=True)
class SelectField:
    expr: Expr
    alias: str | None = None


@dataclass(frozen=True)
class Measurement:
    name: str | None = None
    regex: RegexLit | None = None
    database: str | None = None
    retention_policy: str | None = None


@dataclass(frozen=True)
class TimeDimension:
    interval_ns: int
    offset_ns: int = 0


@dataclass
class SelectStatement:
    fields: list[SelectField]
    source: Measurement
    condition: Expr | None = None
    time_dimension: TimeDimension | None = None
    tag_dimensions: list[str] = field(default_factory=list)
    group_by_all_tags: bool = False
    fill: str = "null"  # null | none | previous | linear | value
    fill_value: int | float | None = None
    descending: bool = False
    limit: int = 0
    offset: int = 0
    slimit: int = 0
    soffset: int = 0


@dataclass
class ShowMeasurementsStatement:
    database: str | None = None
    regex: RegexLit | None = None
    name: str | None = None
    limit: int = 0
    offset: int = 0


@dataclass
class ShowTagKeysStatement:
    database: str | None = None
    source: Measurement | None = None
    limit: int = 0
    offset: int = 0


@dataclass
class ShowTagValuesStatement:
    database: str | None = None
    source: Measurement | None = None
    key_op: str = "="  # = != =~ !~ IN
    keys: list[str] = field(default_factory=list)
    key_regex: RegexLit | None = None
    condition: Expr | None = None
    limit: int = 0
    offset: int = 0


@dataclass
class ShowFieldKeysStatement:
    database: str | None = None
    source: Measurement | None = None
    limit: int = 0
    offset: int = 0


@dataclass
class ShowDatabasesStatement:
    pass


@dataclass
class ShowRetentionPoliciesStatement:
    database: str | None = None


Statement = (
    SelectStatement
    | ShowMeasurementsStatement
    | ShowTagKeysStatement
    | ShowTagValuesStatement
    | ShowFieldKeysStatement
    | ShowDatabasesStatement
    | ShowRetentionPoliciesStatement
)

# --------------------------------------------------------------------------- lexer

DURATION_UNITS_NS = {
    "ns": 1,
    "u": 1_000,
    "µ": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
    "d": 86400 * 1_000_000_000,
    "w": 7 * 86400 * 1_000_000_000,
}

_DURATION_RE = re.compile(r"(\d+)(ns|ms|u|µ|s|m|h|d|w)(?![A-Za-z0-9_])")
_NUMBER_RE = re.compile(r"\d+(\.\d*)?([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = ("::", "=~", "!~", "!=", "<>", "<=", ">=", "=", "<", ">", "+", "-", "*", "/", "%")
_PUNCT = "(),;."


@dataclass(frozen=True)
class Token:
    kind: str  # IDENT QIDENT STRING NUMBER INTEGER DURATION REGEX OP PUNCT EOF
    value: str
    pos: int  # 0-based offset into the text

    def describe(self) -> str:
        if self.kind == "EOF":
            return "EOF"
        if self.kind == "STRING":
            return f"'{self.value}'"
        if self.kind == "QIDENT":
            return f'"{self.value}"'
        if self.kind == "REGEX":
            return f"/{self.value}/"
        return self.value


def _position(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, char {col}"


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c == "-" and text.startswith("--", i):  # comment to end of line
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if c in "'\"":
            j, buf = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    nxt = text[j + 1]
                    buf.append(
                        {"n": "\n", "t": "\t"}.get(nxt, nxt) if nxt in "nt\\'\"" else "\\" + nxt
                    )
                    j += 2
                    continue
                buf.append(text[j])
                j += 1
            if j >= n:
                raise ParseError(
                    f"error parsing query: found {text[i:]!s}, expected closing quote "
                    f"at {_position(text, i)}"
                )
            tokens.append(Token("STRING" if c == "'" else "QIDENT", "".join(buf), i))
            i = j + 1
            continue
        if c == "/" and tokens and tokens[-1].kind == "OP" and tokens[-1].value in ("=~", "!~"):
            j, buf = i + 1, []
            while j < n and text[j] != "/":
                if text[j] == "\\" and j + 1 < n and text[j + 1] == "/":
                    buf.append("/")
                    j += 2
                    continue
                buf.append(text[j])
                j += 1
            if j >= n:
                raise ParseError(
                    f"error parsing query: found {text[i:]}, expected regex at {_position(text, i)}"
                )
            tokens.append(Token("REGEX", "".join(buf), i))
            i = j + 1
            continue
        if c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            m = _DURATION_RE.match(text, i)
            if m:
                tokens.append(Token("DURATION", m.group(0), i))
                i = m.end()
                continue
            m = _NUMBER_RE.match(text, i)
            assert m is not None
            s = m.group(0)
            kind = "INTEGER" if s.isdigit() else "NUMBER"
            tokens.append(Token(kind, s, i))
            i = m.end()
            continue
        if c.isalpha() or c == "_" or c == "$":
            m = _IDENT_RE.match(text, i + (1 if c == "$" else 0))
            if c == "$" or m is None:
                raise ParseError(
                    f"error parsing query: found {text[i:].split()[0]}, expected identifier "
                    f"at {_position(text, i)} (a Grafana variable was not substituted?)"
                )
            tokens.append(Token("IDENT", m.group(0), i))
            i = m.end()
            continue
        for op in _OPERATORS:
            if text.startswith(op, i):
                tokens.append(Token("OP", op, i))
                i += len(op)
                break
        else:
            if c in _PUNCT:
                tokens.append(Token("PUNCT", c, i))
                i += 1
                continue
            raise ParseError(
                f"error parsing query: found {c}, expected ... at {_position(text, i)}"
            )
    tokens.append(Token("EOF", "", n))
    return tokens


def duration_ns(text: str) -> int:
    m = _DURATION_RE.fullmatch(text)
    if not m:
        raise InfluxQLError(f"invalid duration {text}")
    return int(m.group(1)) * DURATION_UNITS_NS[m.group(2)]


def format_duration(ns: int) -> str:
    """InfluxDB's way of writing a duration, e.g. ``168h0m0s``, ``0s``."""
    if ns == 0:
        return "0s"
    s = ns // 1_000_000_000
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m}m{sec}s" if h else (f"{m}m{sec}s" if m else f"{sec}s")


def parse_time_string(text: str) -> int:
    """An RFC 3339 (or ``YYYY-MM-DD [HH:MM:SS]``) time as UTC nanoseconds."""
    s = text.strip()
    m = re.fullmatch(
        r"(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?)?(Z|[+-]\d{2}:\d{2})?", s
    )
    if not m:
        raise InfluxQLError(f"invalid timestamp string {text!r}, expected RFC 3339")
    date, clock, frac, tz = m.groups()
    dt = datetime.fromisoformat(f"{date}T{clock or '00:00:00'}{'' if tz in (None, 'Z') else tz}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    secs = int(dt.timestamp())
    return secs * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


# --------------------------------------------------------------------------- parser


class Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0

    # -- token helpers
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def next(self) -> Token:
        t = self.tokens[self.i]
        if t.kind != "EOF":
            self.i += 1
        return t

    def is_kw(self, *words: str) -> bool:
        t = self.tok
        return t.kind == "IDENT" and t.value.upper() in words

    def accept_kw(self, *words: str) -> bool:
        if self.is_kw(*words):
            self.i += 1
            return True
        return False

    def is_punct(self, p: str) -> bool:
        return self.tok.kind == "PUNCT" and self.tok.value == p

    def is_op(self, *ops: str) -> bool:
        return self.tok.kind == "OP" and self.tok.value in ops

    def error(self, expected: str) -> ParseError:
        t = self.tok
        return ParseError(
            f"error parsing query: found {t.describe()}, expected {expected} "
            f"at {_position(self.text, t.pos)}"
        )

    def expect_kw(self, *words: str) -> None:
        if not self.accept_kw(*words):
            raise self.error(", ".join(words))

    def expect_punct(self, p: str) -> None:
        if not self.is_punct(p):
            raise self.error(p)
        self.i += 1

    def expect_op(self, op: str) -> None:
        if not self.is_op(op):
            raise self.error(op)
        self.i += 1

    def ident(self, what: str = "identifier") -> str:
        t = self.tok
        if t.kind in ("IDENT", "QIDENT"):
            self.i += 1
            return t.value
        raise self.error(what)

    def integer(self) -> int:
        t = self.tok
        if t.kind != "INTEGER":
            raise self.error("integer")
        self.i += 1
        return int(t.value)

    # -- statements
    def parse(self) -> list[Statement]:
        statements: list[Statement] = []
        while True:
            while self.is_punct(";"):
                self.i += 1
            if self.tok.kind == "EOF":
                break
            statements.append(self.statement())
            if self.tok.kind != "EOF" and not self.is_punct(";"):
                raise self.error(";")
        if not statements:
            raise ParseError(
                "error parsing query: found EOF, expected SELECT, SHOW at line 1, char 1"
            )
        return statements

    def statement(self) -> Statement:
        if self.accept_kw("SELECT"):
            return self.select()
        if self.accept_kw("SHOW"):
            return self.show()
        if self.tok.kind == "IDENT" and self.tok.value.upper() in (
            "DELETE",
            "CREATE",
            "DROP",
            "EXPLAIN",
            "GRANT",
            "REVOKE",
            "ALTER",
            "SET",
            "KILL",
        ):
            raise InfluxQLError(
                f"{self.tok.value.upper()} is not supported: Millstream's /query endpoint is "
                "read-only and answers SELECT and SHOW statements"
            )
        raise self.error("SELECT, SHOW")

    def select(self) -> SelectStatement:
        fields = [self.select_field()]
        while self.is_punct(","):
            self.i += 1
            fields.append(self.select_field())
        if self.accept_kw("INTO"):
            raise InfluxQLError("SELECT ... INTO is not supported: the endpoint is read-only")
        self.expect_kw("FROM")
        source = self.measurement()
        if self.is_punct(","):
            raise InfluxQLError("selecting from several measurements is not supported")
        stmt = SelectStatement(fields=fields, source=source)
        if self.accept_kw("WHERE"):
            stmt.condition = self.expr()
        if self.accept_kw("GROUP"):
            self.expect_kw("BY")
            self.dimensions(stmt)
        if self.accept_kw("FILL"):
            self.fill(stmt)
        if self.accept_kw("ORDER"):
            self.expect_kw("BY")
            if self.ident("time").lower() != "time":
                raise InfluxQLError("only ORDER BY time [ASC|DESC] is supported")
            if self.accept_kw("DESC"):
                stmt.descending = True
            else:
                self.accept_kw("ASC")
        while self.is_kw("LIMIT", "OFFSET", "SLIMIT", "SOFFSET"):
            kw = self.next().value.upper()
            setattr(stmt, kw.lower(), self.integer())
        if self.accept_kw("TZ"):
            raise InfluxQLError("tz() is not supported: Millstream answers in UTC")
        return stmt

    def select_field(self) -> SelectField:
        expr = self.expr()
        alias = None
        if self.accept_kw("AS"):
            alias = self.ident("alias")
        return SelectField(expr, alias)

    def measurement(self) -> Measurement:
        if self.tok.kind == "REGEX" or self.is_op("/"):
            raise InfluxQLError("FROM /regex/ is not supported: name one measurement")
        parts = [self.ident("measurement")]
        while self.is_punct("."):
            self.i += 1
            if self.is_punct("."):  # db..measurement (default retention policy)
                parts.append("")
                continue
            parts.append(self.ident("measurement"))
        if len(parts) > 3:
            raise self.error("measurement")
        parts = [""] * (3 - len(parts)) + parts
        db, rp, name = parts
        return Measurement(name=name, database=db or None, retention_policy=rp or None)

    def dimensions(self, stmt: SelectStatement) -> None:
        while True:
            if self.is_op("*"):
                self.i += 1
                stmt.group_by_all_tags = True
            elif self.is_kw("TIME") and self.tokens[self.i + 1].value == "(":
                self.i += 2
                interval = self.duration()
                offset = 0
                if self.is_punct(","):
                    self.i += 1
                    sign = -1 if self.is_op("-") else 1
                    if self.is_op("-", "+"):
                        self.i += 1
                    if self.is_kw("NOW"):
                        raise InfluxQLError("GROUP BY time offset now() is not supported")
                    offset = sign * self.duration()
                self.expect_punct(")")
                if stmt.time_dimension is not None:
                    raise InfluxQLError("multiple time dimensions")
                if interval <= 0:
                    raise InfluxQLError("GROUP BY time interval must be positive")
                stmt.time_dimension = TimeDimension(interval, offset)
            elif self.tok.kind == "OP" and self.tok.value in ("=~",):
                raise InfluxQLError("GROUP BY /regex/ is not supported")
            else:
                stmt.tag_dimensions.append(self.ident("dimension"))
            if not self.is_punct(","):
                break
            self.i += 1

    def duration(self) -> int:
        t = self.tok
        if t.kind != "DURATION":
            raise self.error("duration")
        self.i += 1
        return duration_ns(t.value)

    def fill(self, stmt: SelectStatement) -> None:
        self.expect_punct("(")
        t = self.next()
        sign = 1
        if t.kind == "OP" and t.value == "-":
            sign, t = -1, self.next()
        if t.kind == "IDENT" and t.value.lower() in ("null", "none", "previous", "linear"):
            stmt.fill = t.value.lower()
        elif t.kind in ("INTEGER", "NUMBER"):
            stmt.fill = "value"
            stmt.fill_value = sign * (int(t.value) if t.kind == "INTEGER" else float(t.value))
        else:
            self.i -= 1
            raise self.error("null, none, previous, linear or a number")
        self.expect_punct(")")

    def show(self) -> Statement:
        if self.accept_kw("MEASUREMENTS"):
            sm = ShowMeasurementsStatement(database=self.on_clause())
            if self.accept_kw("WITH"):
                self.expect_kw("MEASUREMENT")
                if self.is_op("=~"):
                    self.i += 1
                    if self.tok.kind != "REGEX":
                        raise self.error("regex")
                    sm.regex = RegexLit(self.next().value)
                elif self.is_op("="):
                    self.i += 1
                    sm.name = self.ident("measurement")
                else:
                    raise self.error("=~, =")
            if self.accept_kw("WHERE"):
                raise InfluxQLError("SHOW MEASUREMENTS ... WHERE is not supported")
            self.limit_offset(sm)
            return sm
        if self.accept_kw("TAG"):
            if self.accept_kw("KEYS"):
                tk = ShowTagKeysStatement(database=self.on_clause())
                tk.source = self.from_clause()
                if self.accept_kw("WHERE"):
                    raise InfluxQLError("SHOW TAG KEYS ... WHERE is not supported")
                self.limit_offset(tk)
                return tk
            self.expect_kw("VALUES")
            tv = ShowTagValuesStatement(database=self.on_clause())
            tv.source = self.from_clause()
            self.expect_kw("WITH")
            self.expect_kw("KEY")
            if self.accept_kw("IN"):
                tv.key_op = "IN"
                self.expect_punct("(")
                tv.keys.append(self.ident("tag key"))
                while self.is_punct(","):
                    self.i += 1
                    tv.keys.append(self.ident("tag key"))
                self.expect_punct(")")
            elif self.is_op("=", "!=", "<>"):
                tv.key_op = "!=" if self.next().value != "=" else "="
                tv.keys.append(self.ident("tag key"))
            elif self.is_op("=~", "!~"):
                tv.key_op = self.next().value
                if self.tok.kind != "REGEX":
                    raise self.error("regex")
                tv.key_regex = RegexLit(self.next().value)
            else:
                raise self.error("=, !=, =~, !~, IN")
            if self.accept_kw("WHERE"):
                tv.condition = self.expr()
            self.limit_offset(tv)
            return tv
        if self.accept_kw("FIELD"):
            self.expect_kw("KEYS")
            fk = ShowFieldKeysStatement(database=self.on_clause())
            fk.source = self.from_clause()
            self.limit_offset(fk)
            return fk
        if self.accept_kw("DATABASES"):
            return ShowDatabasesStatement()
        if self.accept_kw("RETENTION"):
            self.expect_kw("POLICIES")
            return ShowRetentionPoliciesStatement(database=self.on_clause())
        if self.tok.kind == "IDENT":
            raise InfluxQLError(
                f"SHOW {self.tok.value.upper()} is not supported; Millstream answers SHOW "
                "MEASUREMENTS, TAG KEYS, TAG VALUES, FIELD KEYS, DATABASES, RETENTION POLICIES"
            )
        raise self.error("MEASUREMENTS, TAG, FIELD, DATABASES, RETENTION")

    def on_clause(self) -> str | None:
        if self.accept_kw("ON"):
            return self.ident("database")
        return None

    def from_clause(self) -> Measurement | None:
        if self.accept_kw("FROM"):
            m = self.measurement()
            if self.is_punct(","):
                raise InfluxQLError("several measurements in FROM are not supported")
            return m
        return None

    def limit_offset(self, stmt: object) -> None:
        while self.is_kw("LIMIT", "OFFSET"):
            kw = self.next().value.lower()
            setattr(stmt, kw, self.integer())

    # -- expressions (precedence: OR < AND < comparison < + - < * / %)
    def expr(self) -> Expr:
        lhs = self.and_expr()
        while self.accept_kw("OR"):
            lhs = BinaryExpr("OR", lhs, self.and_expr())
        return lhs

    def and_expr(self) -> Expr:
        lhs = self.cmp_expr()
        while self.accept_kw("AND"):
            lhs = BinaryExpr("AND", lhs, self.cmp_expr())
        return lhs

    def cmp_expr(self) -> Expr:
        lhs = self.add_expr()
        if self.is_op("=", "!=", "<>", "<", "<=", ">", ">=", "=~", "!~"):
            op = self.next().value
            if op == "<>":
                op = "!="
            if op in ("=~", "!~"):
                if self.tok.kind != "REGEX":
                    raise self.error("regex")
                rhs: Expr = RegexLit(self.next().value)
            else:
                rhs = self.add_expr()
            return BinaryExpr(op, lhs, rhs)
        return lhs

    def add_expr(self) -> Expr:
        lhs = self.mul_expr()
        while self.is_op("+", "-"):
            op = self.next().value
            lhs = BinaryExpr(op, lhs, self.mul_expr())
        return lhs

    def mul_expr(self) -> Expr:
        lhs = self.unary()
        while self.is_op("*", "/", "%"):
            op = self.next().value
            lhs = BinaryExpr(op, lhs, self.unary())
        return lhs

    def unary(self) -> Expr:
        t = self.tok
        if t.kind == "PUNCT" and t.value == "(":
            self.i += 1
            e = self.expr()
            self.expect_punct(")")
            return e
        if t.kind == "OP" and t.value == "-":
            self.i += 1
            inner = self.unary()
            if isinstance(inner, NumberLit):
                return NumberLit(-inner.value)
            if isinstance(inner, DurationLit):
                return DurationLit(-inner.ns)
            return BinaryExpr("*", NumberLit(-1), inner)
        if t.kind == "OP" and t.value == "*":
            self.i += 1
            return Wildcard()
        if t.kind == "STRING":
            self.i += 1
            return StringLit(t.value)
        if t.kind == "INTEGER":
            self.i += 1
            return NumberLit(int(t.value))
        if t.kind == "NUMBER":
            self.i += 1
            return NumberLit(float(t.value))
        if t.kind == "DURATION":
            self.i += 1
            return DurationLit(duration_ns(t.value))
        if t.kind == "REGEX":
            self.i += 1
            return RegexLit(t.value)
        if t.kind == "IDENT" and t.value.upper() in ("TRUE", "FALSE"):
            self.i += 1
            return BoolLit(t.value.upper() == "TRUE")
        if t.kind in ("IDENT", "QIDENT"):
            self.i += 1
            if t.kind == "IDENT" and self.is_punct("("):
                self.i += 1
                args: list[Expr] = []
                if not self.is_punct(")"):
                    args.append(self.expr())
                    while self.is_punct(","):
                        self.i += 1
                        args.append(self.expr())
                self.expect_punct(")")
                return Call(t.value.lower(), tuple(args))
            if self.is_op("::"):
                self.i += 1
                dtype = self.ident("tag, field, float, integer, string or boolean").lower()
                if dtype not in ("tag", "field", "float", "integer", "string", "boolean"):
                    raise InfluxQLError(f"unknown type cast ::{dtype}")
                return VarRef(t.value, "tag" if dtype == "tag" else "field")
            return VarRef(t.value)
        raise self.error("identifier, string, number, bool")


def parse(text: str) -> list[Statement]:
    """Parse ``text`` (one or more statements separated by ``;``)."""
    return Parser(text).parse()
