"""Run InfluxQL statements over any :class:`~millstream_cloud.storage.base.Storage`.

The answers have InfluxDB 1.x's shape and, as far as the subset goes, its values: the
same bucket alignment (epoch-aligned, optional offset), the same time range rules
(``time > x`` is exclusive, ``GROUP BY time`` without an upper bound stops at now()), the
same ``fill()`` behaviour (empty buckets inside the WHERE range are ``null`` unless told
otherwise, ``count`` fills 0), the same timestamps for selectors and the same column
names (``mean``, ``mean_1``, ``mean_temp`` for ``mean(*)``).

Two paths produce the same result:

* **pushdown**: aggregates with equality tag filters (also Grafana's ``/^(a|b)$/``, as one
  storage query per value), tag grouping and ``GROUP BY time`` (or a whole-range
  aggregate, as at most two buckets folded here) go to the backend as
  :class:`SeriesQuery` objects, so a week of 1 Hz data is aggregated where it lives;
  ``first``/``last`` too when each group holds one series of the field;
* **raw**: anything else (other regexes, ``!=``, ``OR``, field conditions, a single
  selector's point time, raw selects, ties between series) reads the points of the
  matching series in the time range and evaluates the statement here.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from millstream_cloud.grafana.influxql import (
    BinaryExpr,
    BoolLit,
    Call,
    DurationLit,
    Expr,
    InfluxQLError,
    Measurement,
    NumberLit,
    RegexLit,
    SelectStatement,
    ShowDatabasesStatement,
    ShowFieldKeysStatement,
    ShowMeasurementsStatement,
    ShowRetentionPoliciesStatement,
    ShowTagKeysStatement,
    ShowTagValuesStatement,
    Statement,
    StringLit,
    VarRef,
    Wildcard,
    parse,
    parse_time_string,
)
from millstream_cloud.storage.base import AGGREGATES, FieldValue, SeriesQuery, Storage

DATABASE = "millstream"
RETENTION_POLICY = "autogen"
SELECTORS = ("first", "last", "min", "max")
# Functions InfluxDB knows that this subset does not compute: named in a clear error.
KNOWN_UNSUPPORTED = {
    "distinct", "integral", "median", "mode", "spread", "stddev", "bottom", "percentile",
    "sample", "top", "abs", "acos", "asin", "atan", "atan2", "ceil", "cos", "cumulative_sum",
    "derivative", "difference", "elapsed", "exp", "floor", "histogram", "ln", "log", "log2",
    "log10", "moving_average", "non_negative_derivative", "non_negative_difference", "pow",
    "round", "sin", "sqrt", "tan", "holt_winters", "holt_winters_with_fit",
    "chande_momentum_oscillator", "exponential_moving_average", "double_exponential_moving_average",
    "kaufmans_efficiency_ratio", "kaufmans_adaptive_moving_average", "triple_exponential_moving_average",
    "triple_exponential_derivative", "relative_strength_index",
}  # fmt: skip
MAX_BUCKETS = 1_000_000
MAX_PUSHDOWN_QUERIES = 64
MIN_TIME = -(2**63) + 2
MAX_TIME = 2**63 - 2
EPOCH_DIVISORS = {"ns": 1, "n": 1, "u": 1_000, "µ": 1_000, "ms": 1_000_000, "s": 10**9,
                  "m": 60 * 10**9, "h": 3600 * 10**9}  # fmt: skip

Row = dict[str, FieldValue]


@dataclass
class StatementResult:
    series: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def as_json(self, statement_id: int) -> dict[str, Any]:
        out: dict[str, Any] = {"statement_id": statement_id}
        if self.error is not None:
            out["error"] = self.error
        elif self.series:
            out["series"] = self.series
        return out


def format_time(ns: int, epoch: str | None) -> int | str:
    """A timestamp as InfluxDB writes it: an integer in ``epoch`` units, else RFC 3339."""
    if epoch:
        return ns // EPOCH_DIVISORS[epoch]
    secs, frac = divmod(ns, 1_000_000_000)
    text = datetime.fromtimestamp(secs, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


# --------------------------------------------------------------------------- conditions


def _conjuncts(expr: Expr | None) -> list[Expr]:
    if expr is None:
        return []
    if isinstance(expr, BinaryExpr) and expr.op == "AND":
        return _conjuncts(expr.lhs) + _conjuncts(expr.rhs)
    return [expr]


def _refs(expr: Expr) -> set[str]:
    if isinstance(expr, VarRef):
        return {expr.name}
    if isinstance(expr, BinaryExpr):
        return _refs(expr.lhs) | _refs(expr.rhs)
    if isinstance(expr, Call):
        return set().union(*(_refs(a) for a in expr.args)) if expr.args else set()
    return set()


def _is_time(expr: Expr) -> bool:
    return "time" in {r.lower() for r in _refs(expr)}


def _time_value(expr: Expr, now_ns: int) -> int:
    """A time expression (``now() - 1h``, ``1700000000000ms``, ``'2024-01-01T00:00:00Z'``)."""
    if isinstance(expr, DurationLit):
        return expr.ns
    if isinstance(expr, NumberLit):
        return int(expr.value)
    if isinstance(expr, StringLit):
        return parse_time_string(expr.value)
    if isinstance(expr, Call) and expr.name == "now" and not expr.args:
        return now_ns
    if isinstance(expr, BinaryExpr) and expr.op in ("+", "-"):
        lhs, rhs = _time_value(expr.lhs, now_ns), _time_value(expr.rhs, now_ns)
        return lhs + rhs if expr.op == "+" else lhs - rhs
    raise InfluxQLError(f"invalid time expression: {_render(expr)}")


def _render(expr: Expr) -> str:
    if isinstance(expr, VarRef):
        return f'"{expr.name}"'
    if isinstance(expr, StringLit):
        return f"'{expr.value}'"
    if isinstance(expr, NumberLit):
        return str(expr.value)
    if isinstance(expr, DurationLit):
        return f"{expr.ns}ns"
    if isinstance(expr, RegexLit):
        return f"/{expr.pattern}/"
    if isinstance(expr, Call):
        return f"{expr.name}({', '.join(_render(a) for a in expr.args)})"
    if isinstance(expr, BinaryExpr):
        return f"{_render(expr.lhs)} {expr.op} {_render(expr.rhs)}"
    if isinstance(expr, BoolLit):
        return "true" if expr.value else "false"
    return "*"


@dataclass
class TimeRange:
    start: int = MIN_TIME  # inclusive
    end: int = MAX_TIME  # inclusive
    has_start: bool = False
    has_end: bool = False


def split_condition(cond: Expr | None, now_ns: int) -> tuple[TimeRange, Expr | None]:
    """The time bounds of a WHERE clause and what is left of it once they are removed."""
    tr = TimeRange()
    rest: list[Expr] = []
    for c in _conjuncts(cond):
        if not _is_time(c):
            rest.append(c)
            continue
        if not isinstance(c, BinaryExpr) or c.op not in ("<", "<=", ">", ">=", "="):
            raise InfluxQLError(f"invalid time condition: {_render(c)}")
        op, lhs, rhs = c.op, c.lhs, c.rhs
        if isinstance(rhs, VarRef) and rhs.name.lower() == "time":
            lhs, rhs = rhs, lhs
            op = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "="}[op]
        if not (isinstance(lhs, VarRef) and lhs.name.lower() == "time") or _is_time(rhs):
            raise InfluxQLError(
                f"invalid time condition: {_render(c)} (time conditions must be ANDed "
                "comparisons of time with a time value)"
            )
        t = _time_value(rhs, now_ns)
        if op in (">", ">=", "="):
            s = t + 1 if op == ">" else t
            if not tr.has_start or s > tr.start:
                tr.start = s
            tr.has_start = True
        if op in ("<", "<=", "="):
            e = t - 1 if op == "<" else t
            if not tr.has_end or e < tr.end:
                tr.end = e
            tr.has_end = True
    remaining: Expr | None = None
    for c in rest:
        remaining = c if remaining is None else BinaryExpr("AND", remaining, c)
    return tr, remaining


def _literal(expr: Expr) -> FieldValue | re.Pattern[str]:
    if isinstance(expr, StringLit):
        return expr.value
    if isinstance(expr, NumberLit):
        return expr.value
    if isinstance(expr, BoolLit):
        return expr.value
    if isinstance(expr, RegexLit):
        return expr.compile()
    if isinstance(expr, DurationLit):
        return expr.ns
    raise InfluxQLError(f"unsupported expression in WHERE: {_render(expr)}")


def _compare(op: str, left: Any, right: Any) -> bool:
    if op in ("=~", "!~"):
        matched = isinstance(left, str) and right.search(left) is not None
        return matched if op == "=~" else not matched
    if left is None:
        return False
    if isinstance(left, str) != isinstance(right, str):
        return False
    try:
        if op == "=":
            return bool(left == right)
        if op == "!=":
            return bool(left != right)
        if op == "<":
            return bool(left < right)
        if op == "<=":
            return bool(left <= right)
        if op == ">":
            return bool(left > right)
        if op == ">=":
            return bool(left >= right)
    except TypeError:
        return False
    raise InfluxQLError(f"unsupported operator {op} in WHERE")


Predicate = Callable[[Mapping[str, str], Mapping[str, FieldValue]], bool]


def compile_predicate(expr: Expr | None, field_names: Iterable[str]) -> Predicate:
    """A function of (tags, fields) -> bool. Names that are fields compare field values."""
    fields = set(field_names)
    if expr is None:
        return lambda tags, values: True

    def build(e: Expr) -> Predicate:
        if isinstance(e, BinaryExpr) and e.op in ("AND", "OR"):
            lp, rp = build(e.lhs), build(e.rhs)
            if e.op == "AND":
                return lambda t, v: lp(t, v) and rp(t, v)
            return lambda t, v: lp(t, v) or rp(t, v)
        if isinstance(e, BinaryExpr) and e.op in ("=", "!=", "<", "<=", ">", ">=", "=~", "!~"):
            lhs, rhs, op = e.lhs, e.rhs, e.op
            if not isinstance(lhs, VarRef) and isinstance(rhs, VarRef):
                lhs, rhs = rhs, lhs
                op = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
            if not isinstance(lhs, VarRef):
                raise InfluxQLError(f"unsupported condition: {_render(e)}")
            if isinstance(rhs, RegexLit) != (op in ("=~", "!~")):
                raise InfluxQLError(f"invalid operator for {_render(rhs)}: {_render(e)}")
            lit = _literal(rhs)
            name = lhs.name
            is_field = name in fields if lhs.dtype is None else lhs.dtype == "field"
            if is_field:
                return lambda t, v: _compare(op, v.get(name), lit)
            # a tag: a series without it has the empty value, as in InfluxDB
            if op not in ("=", "!=", "=~", "!~"):
                return lambda t, v: False
            return lambda t, v: _compare(op, t.get(name, ""), lit)
        if isinstance(e, BoolLit):
            return lambda t, v, b=e.value: b  # type: ignore[misc]
        raise InfluxQLError(f"unsupported condition: {_render(e)}")

    return build(expr)


def _and_all(exprs: Sequence[Expr]) -> Expr | None:
    out: Expr | None = None
    for e in exprs:
        out = e if out is None else BinaryExpr("AND", out, e)
    return out


def _dnf(expr: Expr) -> list[list[Expr]]:
    """``expr`` as a disjunction of conjunctions of leaves."""
    if isinstance(expr, BinaryExpr) and expr.op == "OR":
        return _dnf(expr.lhs) + _dnf(expr.rhs)
    if isinstance(expr, BinaryExpr) and expr.op == "AND":
        return [a + b for a in _dnf(expr.lhs) for b in _dnf(expr.rhs)]
    return [[expr]]


_REGEX_SPECIAL = set(".^$*+?()[]{}|\\")


def regex_literals(pattern: str) -> list[str] | None:
    """The exact values ``/^value$/`` or ``/^(a|b)$/`` matches, else None.

    That is what Grafana writes for a variable in ``=~ /^$var$/``; knowing the values
    lets the engine hand the filter to the storage as equalities.
    """
    if not (pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")):
        return None
    body = pattern[1:-1]
    if body.startswith("(") and body.endswith(")"):
        body = body[1:-1]
    values, cur, i = [], [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 >= len(body) or body[i + 1].isalnum():
                return None  # \d, \w...: a class, not a literal
            cur.append(body[i + 1])
            i += 2
            continue
        if c == "|":
            values.append("".join(cur))
            cur = []
        elif c in _REGEX_SPECIAL:
            return None
        else:
            cur.append(c)
        i += 1
    values.append("".join(cur))
    if any(v == "" for v in values):
        return None
    return values


def pushdown_filters(expr: Expr | None, tag_keys: Iterable[str]) -> list[dict[str, str]] | None:
    """``expr`` as a list of equality tag sets whose union it selects, or None.

    Only ANDs of ``tag = 'v'`` and ``tag =~ /^(v1|v2)$/`` qualify.
    """
    keys = set(tag_keys)
    combos: list[dict[str, str]] = [{}]
    for c in _conjuncts(expr):
        if not (isinstance(c, BinaryExpr) and isinstance(c.lhs, VarRef) and c.lhs.name in keys):
            return None
        if c.lhs.dtype == "field":
            return None
        name = c.lhs.name
        if c.op == "=" and isinstance(c.rhs, StringLit) and c.rhs.value != "":
            options = [c.rhs.value]
        elif c.op == "=~" and isinstance(c.rhs, RegexLit):
            found = regex_literals(c.rhs.pattern)
            if found is None:
                return None
            options = sorted(set(found))
        else:
            return None
        merged = []
        for combo in combos:
            for v in options:
                if combo.get(name, v) == v:
                    merged.append({**combo, name: v})
        combos = merged
        if len(combos) > MAX_PUSHDOWN_QUERIES:
            return None
    return combos


def _merge(agg: str | None, a: FieldValue, b: FieldValue) -> FieldValue:
    if agg in ("sum", "count"):
        return a + b  # type: ignore[operator]
    if agg == "min":
        return min(a, b)  # type: ignore[type-var]
    if agg == "max":
        return max(a, b)  # type: ignore[type-var]
    raise InfluxQLError(f"cannot merge {agg}() across tag sets")


def equality_tags(expr: Expr | None, tag_keys: Iterable[str]) -> tuple[dict[str, str], bool]:
    """Equality filters on tags that can go to the storage, and whether they are all of it."""
    tags: dict[str, str] = {}
    keys = set(tag_keys)
    complete = True
    for c in _conjuncts(expr):
        if (
            isinstance(c, BinaryExpr)
            and c.op == "="
            and isinstance(c.lhs, VarRef)
            and isinstance(c.rhs, StringLit)
            and c.lhs.name in keys
            and c.lhs.dtype != "field"
            and c.rhs.value != ""
            and tags.get(c.lhs.name, c.rhs.value) == c.rhs.value
        ):
            tags[c.lhs.name] = c.rhs.value
        else:
            complete = False
    return tags, complete


# --------------------------------------------------------------------------- aggregation


@dataclass
class Column:
    name: str
    func: str | None  # None for a raw field or tag
    source: str  # field (or tag) name


def _numeric(v: FieldValue | None) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _tie_key(p: tuple[int, FieldValue]) -> tuple[int, Any]:
    v = p[1]
    return (1, v) if _numeric(v) else (0, str(v))


def aggregate(
    func: str | None, points: list[tuple[int, FieldValue]]
) -> tuple[int | None, FieldValue | None]:
    """(time of the selected point or None, value) of ``func`` over time-ordered points."""
    if not points:
        return None, None  # even count(): an empty bucket is filled later, as InfluxDB does
    if func == "count":
        return None, len(points)
    # Ties are broken as InfluxDB's reducers do: at equal times first() and last() keep
    # the larger value; at equal values min() and max() keep the earlier point.
    if func == "first":
        t0 = points[0][0]
        return max((p for p in points if p[0] == t0), key=_tie_key)
    if func == "last":
        t1 = points[-1][0]
        return max((p for p in points if p[0] == t1), key=_tie_key)
    nums = [(t, v) for t, v in points if _numeric(v)]
    if not nums:
        return None, None
    if func == "min":
        return min(nums, key=lambda p: (p[1], p[0]))
    if func == "max":
        return min(nums, key=lambda p: (-p[1], p[0]))  # type: ignore[operator]
    values = [v for _, v in nums]
    if func == "sum":
        if all(isinstance(v, int) for v in values):
            return None, sum(values)  # type: ignore[arg-type]
        return None, math.fsum(values)  # type: ignore[arg-type]
    if func == "mean":
        return None, math.fsum(values) / len(values)  # type: ignore[arg-type]
    raise InfluxQLError(f"undefined function {func}()")


def apply_fill(
    rows: list[list[Any]], ncols: int, mode: str, value: Any, count_cols: set[int]
) -> list[list[Any]]:
    """Fill null aggregates in bucket rows ``[time, v1, v2, ...]`` as InfluxDB does."""
    if mode == "none":
        return [r for r in rows if any(r[i] is not None for i in range(1, ncols))]
    if mode == "null":
        for r in rows:
            for i in count_cols:
                if r[i] is None:
                    r[i] = 0
        return rows
    if mode == "value":
        for r in rows:
            for i in range(1, ncols):
                if r[i] is None:
                    r[i] = value
        return rows
    if mode == "previous":
        for i in range(1, ncols):
            prev = None
            for r in rows:
                if r[i] is None:
                    r[i] = prev
                else:
                    prev = r[i]
        return rows
    if mode == "linear":
        for i in range(1, ncols):
            known = [(k, r[0], r[i]) for k, r in enumerate(rows) if r[i] is not None]
            for (k0, t0, v0), (k1, t1, v1) in itertools.pairwise(known):
                if not (_numeric(v0) and _numeric(v1)):
                    continue
                for k in range(k0 + 1, k1):
                    t = rows[k][0]
                    y = v0 + (v1 - v0) * (t - t0) / (t1 - t0)
                    rows[k][i] = int(y) if isinstance(v0, int) and isinstance(v1, int) else y
        return rows
    raise InfluxQLError(f"unknown fill mode {mode}")


# --------------------------------------------------------------------------- engine

Groups = dict[tuple[str, ...], list[list[Any]]]  # group tag values -> rows [time, v1, ...]


@dataclass
class _Plan:
    """One SELECT with everything resolved against the storage."""

    stmt: SelectStatement
    measurement: str
    columns: list[Column]
    tr: TimeRange
    cond: Expr | None
    dims: list[str]
    field_types: Mapping[str, str]
    tag_keys: list[str]


class QueryEngine:
    """Answers InfluxQL over a storage backend, as database ``millstream``."""

    def __init__(
        self,
        storage: Storage,
        database: str = DATABASE,
        now_ns: Callable[[], int] = time.time_ns,
        pushdown: bool = True,
    ) -> None:
        self.storage = storage
        self.database = database
        self.now_ns = now_ns
        self.pushdown = pushdown

    # -- entry points
    def execute(
        self, text: str, db: str | None = None, epoch: str | None = None, rp: str | None = None
    ) -> dict[str, Any]:
        """The InfluxDB JSON body for ``text``; raises :class:`ParseError` for bad syntax."""
        statements = parse(text)
        results = []
        for i, stmt in enumerate(statements):
            res = self.run(stmt, db, epoch, rp)
            results.append(res.as_json(i))
            if res.error is not None:
                break  # InfluxDB stops at the first failing statement
        return {"results": results}

    def run(
        self, stmt: Statement, db: str | None, epoch: str | None, rp: str | None = None
    ) -> StatementResult:
        if epoch is not None and epoch not in EPOCH_DIVISORS:
            epoch = None
        try:
            if isinstance(stmt, ShowDatabasesStatement):
                return StatementResult(
                    [{"name": "databases", "columns": ["name"], "values": [[self.database]]}]
                )
            if isinstance(stmt, ShowRetentionPoliciesStatement):
                self._check_db(stmt.database or db)
                return StatementResult(
                    [
                        {
                            "columns": [
                                "name",
                                "duration",
                                "shardGroupDuration",
                                "replicaN",
                                "default",
                            ],
                            "values": [[RETENTION_POLICY, "0s", "168h0m0s", 1, True]],
                        }
                    ]
                )
            if isinstance(stmt, ShowMeasurementsStatement):
                return self._show_measurements(stmt, db)
            if isinstance(stmt, ShowTagKeysStatement):
                return self._show_tag_keys(stmt, db)
            if isinstance(stmt, ShowTagValuesStatement):
                return self._show_tag_values(stmt, db)
            if isinstance(stmt, ShowFieldKeysStatement):
                return self._show_field_keys(stmt, db)
            if isinstance(stmt, SelectStatement):
                return self._select(stmt, db, epoch, rp)
        except InfluxQLError as exc:
            return StatementResult(error=str(exc))
        return StatementResult(error="statement not supported")

    # -- helpers
    def _check_db(self, db: str | None) -> None:
        if not db:
            raise InfluxQLError("database name required")
        if db != self.database:
            raise InfluxQLError(f"database not found: {db}")

    def _measurement(self, m: Measurement, db: str | None, rp: str | None = None) -> str:
        self._check_db(m.database or db)
        policy = m.retention_policy or rp
        if policy and policy != RETENTION_POLICY:
            raise InfluxQLError(f"retention policy not found: {policy}")
        assert m.name is not None
        return m.name

    def _sources(self, m: Measurement | None, db: str | None) -> list[str]:
        if m is None:
            self._check_db(db)
            return self.storage.measurements()
        name = self._measurement(m, db)
        return [name] if name in self.storage.measurements() else []

    @staticmethod
    def _page(values: list[list[Any]], limit: int, offset: int) -> list[list[Any]]:
        values = values[offset:]
        return values[:limit] if limit else values

    # -- SHOW
    def _show_measurements(self, s: ShowMeasurementsStatement, db: str | None) -> StatementResult:
        self._check_db(s.database or db)
        names = self.storage.measurements()
        if s.regex is not None:
            rx = s.regex.compile()
            names = [n for n in names if rx.search(n)]
        if s.name is not None:
            names = [n for n in names if n == s.name]
        values = self._page([[n] for n in sorted(names)], s.limit, s.offset)
        if not values:
            return StatementResult()
        return StatementResult([{"name": "measurements", "columns": ["name"], "values": values}])

    def _show_tag_keys(self, s: ShowTagKeysStatement, db: str | None) -> StatementResult:
        series = []
        for m in self._sources(s.source, s.database or db):
            keys = sorted(self.storage.tag_keys(m))
            values = self._page([[k] for k in keys], s.limit, s.offset)
            if values:
                series.append({"name": m, "columns": ["tagKey"], "values": values})
        return StatementResult(series)

    def _show_field_keys(self, s: ShowFieldKeysStatement, db: str | None) -> StatementResult:
        series = []
        for m in self._sources(s.source, s.database or db):
            fk = self.storage.field_keys(m)
            values = self._page([[k, fk[k]] for k in sorted(fk)], s.limit, s.offset)
            if values:
                series.append({"name": m, "columns": ["fieldKey", "fieldType"], "values": values})
        return StatementResult(series)

    def _show_tag_values(self, s: ShowTagValuesStatement, db: str | None) -> StatementResult:
        series = []
        _, cond = split_condition(s.condition, self.now_ns())  # meta queries ignore time
        for m in self._sources(s.source, s.database or db):
            all_keys = sorted(self.storage.tag_keys(m))
            if s.key_op == "IN":
                keys = [k for k in all_keys if k in s.keys]
            elif s.key_op == "=":
                keys = [k for k in all_keys if k == s.keys[0]]
            elif s.key_op == "!=":
                keys = [k for k in all_keys if k != s.keys[0]]
            else:
                assert s.key_regex is not None
                rx = s.key_regex.compile()
                keys = [k for k in all_keys if (rx.search(k) is not None) == (s.key_op == "=~")]
            rows: list[list[Any]] = []
            for key in keys:
                for v in sorted(self._tag_values_where(m, key, cond, all_keys)):
                    rows.append([key, v])
            values = self._page(rows, s.limit, s.offset)
            if values:
                series.append({"name": m, "columns": ["key", "value"], "values": values})
        return StatementResult(series)

    def _tag_values_where(
        self, measurement: str, key: str, cond: Expr | None, tag_keys: Sequence[str]
    ) -> set[str]:
        """Values of tag ``key`` among series matching ``cond``, through the storage API.

        The storage only filters tags by equality, so the condition is put in disjunctive
        normal form; in each conjunction, the values each named tag may take are listed
        (from ``tag_values``) and each combination asked for.
        """
        if cond is None:
            return set(self.storage.tag_values(measurement, key))
        for name in _refs(cond):
            if name not in tag_keys:
                raise InfluxQLError(
                    f"SHOW TAG VALUES ... WHERE can only filter on tags; {name!r} is not a tag "
                    f"of {measurement}"
                )
        out: set[str] = set()
        known: dict[str, list[str]] = {}
        for conj in _dnf(cond):
            choices: list[list[tuple[str, str]]] = []
            empty = False
            for k in sorted({n for leaf in conj for n in _refs(leaf)}):
                vals = known.setdefault(k, self.storage.tag_values(measurement, k))
                pred = compile_predicate(_and_all([c for c in conj if k in _refs(c)]), ())
                allowed = [v for v in vals if pred({k: v}, {})]
                if not allowed:
                    empty = True
                    break
                choices.append([(k, v) for v in allowed])
            if empty:
                continue
            combos: list[dict[str, str]] = [{}]
            for opts in choices:
                combos = [{**c, k: v} for c in combos for k, v in opts]
                if len(combos) > 10_000:
                    raise InfluxQLError("SHOW TAG VALUES ... WHERE matches too many tag sets")
            for combo in combos:
                out.update(self.storage.tag_values(measurement, key, combo))
        return out

    # -- SELECT
    def _select(
        self, s: SelectStatement, db: str | None, epoch: str | None, rp: str | None = None
    ) -> StatementResult:
        measurement = self._measurement(s.source, db, rp)
        now = self.now_ns()
        tr, cond = split_condition(s.condition, now)
        if measurement not in self.storage.measurements():
            self._columns(s, {}, [])  # still report a bad select list
            return StatementResult()
        field_types = self.storage.field_keys(measurement)
        tag_keys = sorted(self.storage.tag_keys(measurement))
        columns = self._columns(s, field_types, tag_keys)
        aggregated = any(c.func for c in columns)
        if s.time_dimension and not aggregated:
            raise InfluxQLError("GROUP BY requires at least one aggregate function")
        dims = sorted(tag_keys) if s.group_by_all_tags else sorted(set(s.tag_dimensions))
        if s.time_dimension and not tr.has_end:
            tr.end = now
        if tr.start > tr.end:
            return StatementResult()
        if not columns:
            return StatementResult()
        plan = _Plan(s, measurement, columns, tr, cond, dims, field_types, tag_keys)
        groups: Groups | None = None
        if aggregated:
            if self.pushdown:
                groups = self._pushdown(plan)
            if groups is None:
                groups = self._aggregate_raw(plan)
        else:
            groups = self._raw(plan)
        names = [c.name for c in columns]
        series = []
        for gkey in sorted(groups, reverse=s.descending):
            rows = groups[gkey]
            if s.descending:
                rows = rows[::-1]
            rows = self._page(rows, s.limit, s.offset)
            if not rows:
                continue
            for r in rows:
                r[0] = format_time(r[0], epoch)
                for i in range(1, len(r)):
                    v = r[i]
                    # Go writes an integral float64 without a fraction: 40, not 40.0
                    if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
                        r[i] = int(v)
            entry: dict[str, Any] = {"name": measurement}
            if dims:
                entry["tags"] = dict(zip(dims, gkey, strict=True))
            entry["columns"] = ["time", *names]
            entry["values"] = rows
            series.append(entry)
        series = series[s.soffset :]
        if s.slimit:
            series = series[: s.slimit]
        return StatementResult(series)

    def _columns(
        self, s: SelectStatement, field_types: Mapping[str, str], tag_keys: Sequence[str]
    ) -> list[Column]:
        columns: list[Column] = []
        has_agg = has_raw = False
        group_tags = set(tag_keys) if s.group_by_all_tags else set(s.tag_dimensions)
        for f in s.fields:
            e = f.expr
            if isinstance(e, Call):
                if e.name in KNOWN_UNSUPPORTED:
                    raise InfluxQLError(
                        f"function {e.name}() is not supported by Millstream's InfluxQL endpoint "
                        f"(supported: {', '.join(AGGREGATES)})"
                    )
                if e.name not in AGGREGATES:
                    raise InfluxQLError(f"undefined function {e.name}()")
                if len(e.args) != 1:
                    raise InfluxQLError(
                        f"invalid number of arguments for {e.name}, expected 1, got {len(e.args)}"
                    )
                has_agg = True
                arg = e.args[0]
                if isinstance(arg, Wildcard):
                    for name in sorted(field_types):
                        if e.name in ("mean", "sum", "min", "max") and field_types[name] not in (
                            "float",
                            "integer",
                        ):
                            continue
                        columns.append(Column(f"{f.alias or e.name}_{name}", e.name, name))
                elif isinstance(arg, VarRef):
                    columns.append(Column(f.alias or e.name, e.name, arg.name))
                else:
                    raise InfluxQLError(
                        f"expected field argument in {e.name}(), got {_render(arg)} "
                        "(math and nested functions are not supported)"
                    )
            elif isinstance(e, Wildcard):
                has_raw = True
                for name in sorted(set(field_types) | (set(tag_keys) - group_tags)):
                    columns.append(Column(name, None, name))
            elif isinstance(e, VarRef):
                has_raw = True
                columns.append(Column(f.alias or e.name, None, e.name))
            else:
                raise InfluxQLError(
                    f"unsupported field expression: {_render(e)} (math on fields is not "
                    "supported by Millstream's InfluxQL endpoint)"
                )
        if has_agg and has_raw:
            raise InfluxQLError("mixing aggregate and non-aggregate queries is not supported")
        if has_raw and field_types and not any(c.source in field_types for c in columns):
            raise InfluxQLError("statement must have at least one field in select clause")
        seen: dict[str, int] = {}
        for c in columns:
            n = seen.get(c.name, 0)
            seen[c.name] = n + 1
            if n:
                c.name = f"{c.name}_{n}"
        return columns

    def _read(
        self,
        measurement: str,
        fields: Sequence[str],
        tr: TimeRange,
        cond: Expr | None,
        field_types: Mapping[str, str],
        tag_keys: Sequence[str],
    ) -> dict[tuple[str, ...], dict[int, dict[str, FieldValue]]]:
        """Points of the series matching ``cond``: tag values -> time -> field values."""
        eq, _ = equality_tags(cond, tag_keys)
        pred = compile_predicate(cond, field_types)
        needed = sorted(set(fields) | (_refs(cond) & set(field_types) if cond else set()))
        needed = [f for f in needed if f in field_types]
        if not needed:
            return {}
        result = self.storage.query(
            SeriesQuery(
                measurement=measurement,
                fields=needed,
                tags=eq,
                start_ns=None if tr.start == MIN_TIME else tr.start,
                end_ns=None if tr.end == MAX_TIME else tr.end + 1,
                group_by=list(tag_keys),
            )
        )
        by_series: dict[tuple[str, ...], dict[int, dict[str, FieldValue]]] = {}
        for ser in result:
            key = tuple(ser.tags.get(k, "") or "" for k in tag_keys)
            rows = by_series.setdefault(key, {})
            for t, v in ser.points:
                if tr.start <= t <= tr.end:
                    rows.setdefault(t, {})[ser.field] = v
        out = {}
        for key, rows in by_series.items():
            tags = dict(zip(tag_keys, key, strict=True))
            kept = {t: vals for t, vals in rows.items() if pred(tags, vals)}
            if kept:
                out[key] = kept
        return out

    def _raw(self, plan: _Plan) -> Groups:
        columns, dims, field_types, tag_keys = (
            plan.columns,
            plan.dims,
            plan.field_types,
            plan.tag_keys,
        )
        data = self._read(plan.measurement, [c.source for c in columns], plan.tr, plan.cond,
                          field_types, tag_keys)  # fmt: skip
        idx = {k: i for i, k in enumerate(tag_keys)}
        groups: dict[tuple[str, ...], list[tuple[int, tuple[str, ...], list[Any]]]] = {}
        for skey, rows in data.items():
            gkey = tuple(skey[idx[d]] if d in idx else "" for d in dims)
            for t, vals in rows.items():
                row: list[Any] = [t]
                any_field = False
                for c in columns:
                    if c.source in field_types:
                        v = vals.get(c.source)
                        any_field = any_field or v is not None
                        row.append(v)
                    elif c.source in idx:
                        row.append(skey[idx[c.source]] or None)
                    else:
                        row.append(None)
                if any_field:
                    groups.setdefault(gkey, []).append((t, skey, row))
        out = {}
        for gkey, items in groups.items():
            items.sort(key=lambda x: (x[0], x[1]))
            out[gkey] = [row for _, _, row in items]
        return out

    def _aggregate_raw(self, plan: _Plan) -> Groups:
        s, columns, tr, dims = plan.stmt, plan.columns, plan.tr, plan.dims
        tag_keys = plan.tag_keys
        data = self._read(plan.measurement, [c.source for c in columns], tr, plan.cond,
                          plan.field_types, tag_keys)  # fmt: skip
        idx = {k: i for i, k in enumerate(tag_keys)}
        # group -> field -> [(time, value)]
        points: dict[tuple[str, ...], dict[str, list[tuple[int, FieldValue]]]] = {}
        for skey, rows in data.items():
            gkey = tuple(skey[idx[d]] if d in idx else "" for d in dims)
            per_field = points.setdefault(gkey, {})
            for t, vals in rows.items():
                for f, v in vals.items():
                    per_field.setdefault(f, []).append((t, v))
        td = s.time_dimension
        out = {}
        for gkey, per_field in points.items():
            if not any(per_field.get(c.source) for c in columns):
                continue
            for pts in per_field.values():
                pts.sort(key=lambda p: p[0])
            if td is None:
                row: list[Any] = [tr.start if tr.has_start else 0]
                single_selector = len(columns) == 1 and columns[0].func in SELECTORS
                for c in columns:
                    sel_t, sel_v = aggregate(c.func, per_field.get(c.source, []))
                    if single_selector and sel_t is not None:
                        row[0] = sel_t
                    row.append(sel_v)
                out[gkey] = [row]
                continue
            buckets: dict[int, dict[str, list[tuple[int, FieldValue]]]] = {}
            for f, pts in per_field.items():
                for t, v in pts:
                    buckets.setdefault(
                        self._bucket(t, td.interval_ns, td.offset_ns), {}
                    ).setdefault(f, []).append((t, v))
            values: dict[int, list[Any]] = {}
            for b, per in buckets.items():
                values[b] = [aggregate(c.func, per.get(c.source, []))[1] for c in columns]
            present = {c.source for c in columns if per_field.get(c.source)}
            out[gkey] = self._fill_buckets(s, tr, values, columns, min(buckets), present)
        return out

    @staticmethod
    def _bucket(t: int, every: int, offset: int) -> int:
        return (t - offset) // every * every + offset

    def _fill_buckets(
        self,
        s: SelectStatement,
        tr: TimeRange,
        values: Mapping[int, list[Any]],
        columns: Sequence[Column],
        data_start: int,
        present: set[str],
    ) -> list[list[Any]]:
        td = s.time_dimension
        assert td is not None
        every, offset = td.interval_ns, td.offset_ns
        first = self._bucket(tr.start if tr.has_start else data_start, every, offset)
        last = self._bucket(tr.end, every, offset)
        if (last - first) // every > MAX_BUCKETS:
            raise InfluxQLError(
                f"too many buckets: GROUP BY time({every}ns) over this time range makes more "
                f"than {MAX_BUCKETS}; narrow the range or widen the interval"
            )
        ncols = len(columns) + 1
        if s.fill == "none":
            rows = [[b, *values[b]] for b in sorted(values) if first <= b <= last]
        else:
            rows = [
                [b, *values.get(b, [None] * len(columns))] for b in range(first, last + 1, every)
            ]
        # count() fills empty buckets with 0, but only for a field the group has points of
        count_cols = {
            i + 1 for i, c in enumerate(columns) if c.func == "count" and c.source in present
        }
        return apply_fill(rows, ncols, s.fill, s.fill_value, count_cols)

    def _pushdown(self, plan: _Plan) -> Groups | None:
        """Aggregate in the storage when the answer stays exact, else None (raw path).

        ``first``/``last`` go to the storage per series; when a group turns out to hold
        several series of a field, InfluxDB's tie-breaking between them needs the points
        and the raw path answers instead. Without ``GROUP BY time``, the WHERE range is
        covered by at most two epoch-aligned buckets whose answers are folded (a mean as
        sum / count).
        """
        s, measurement, columns, tr = plan.stmt, plan.measurement, plan.columns, plan.tr
        cond, dims, tag_keys = plan.cond, plan.dims, plan.tag_keys
        td = s.time_dimension
        if any(d not in tag_keys for d in dims) or any(c.func is None for c in columns):
            return None
        if td is not None:
            if td.offset_ns:
                return None
            every = td.interval_ns
        else:
            if not (tr.has_start and tr.has_end):
                return None
            if len(columns) == 1 and columns[0].func in SELECTORS:
                return None  # the answer's time is the selected point's: needs the points
            every = 1 << (tr.end - tr.start).bit_length()  # >= the span: at most 2 buckets
        filters = pushdown_filters(cond, tag_keys)
        if filters is None or len(filters) > MAX_PUSHDOWN_QUERIES:
            return None
        if len(filters) > 1 and td is not None:
            # Several tag sets (Grafana's /^(a|b)$/): their answers merge exactly when each
            # lands in its own group, or when the aggregate merges (a sum of sums...).
            varying = {k for f in filters for k in f if any(f.get(k) != g.get(k) for g in filters)}
            if not varying <= set(dims) and any(c.func == "mean" for c in columns):
                return None
        requests: set[tuple[str, str]] = set()
        for c in columns:
            assert c.func is not None
            if c.func == "mean" and td is None:
                requests |= {("sum", c.source), ("count", c.source)}
            else:
                requests.add((c.func, c.source))
        start = None if tr.start == MIN_TIME else tr.start
        end = None if tr.end == MAX_TIME else tr.end + 1
        # (agg, field) -> group -> bucket -> value
        results: dict[tuple[str, str], dict[tuple[str, ...], dict[int, FieldValue]]] = {}
        for agg, fld in sorted(requests):
            got = results.setdefault((agg, fld), {})
            per_series = agg in SELECTORS[:2]  # first, last
            seen: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
            for eq in filters:
                group_by = list(tag_keys) if per_series else list(dims)
                query = SeriesQuery(measurement, [fld], tags=eq, start_ns=start, end_ns=end,
                                    every_ns=every, agg=agg, group_by=group_by)  # fmt: skip
                for ser in self.storage.query(query):
                    if not ser.points:
                        continue
                    gkey = tuple(ser.tags.get(d, "") or "" for d in dims)
                    if per_series:
                        skey = tuple(ser.tags.get(k, "") or "" for k in tag_keys)
                        seen.setdefault(gkey, set()).add(skey)
                        if len(seen[gkey]) > 1:
                            return None
                    buckets = got.setdefault(gkey, {})
                    for b, v in ser.points:
                        buckets[b] = v if b not in buckets else _merge(agg, buckets[b], v)
        gkeys = {g for per in results.values() for g in per}
        out: Groups = {}
        for gkey in gkeys:
            if td is None:
                row = [tr.start, *(self._fold(c, results, gkey) for c in columns)]
                if any(v is not None for v in row[1:]):
                    out[gkey] = [row]
                continue
            values: dict[int, list[Any]] = {}
            for i, c in enumerate(columns):
                for b, v in results.get((str(c.func), c.source), {}).get(gkey, {}).items():
                    values.setdefault(b, [None] * len(columns))[i] = v
            values = {b: v for b, v in values.items() if any(x is not None for x in v)}
            if not values:
                continue
            present = {
                c.source for c in columns if results.get((str(c.func), c.source), {}).get(gkey)
            }
            out[gkey] = self._fill_buckets(s, tr, values, columns, min(values), present)
        return out

    @staticmethod
    def _fold(
        c: Column,
        results: Mapping[tuple[str, str], Mapping[tuple[str, ...], Mapping[int, FieldValue]]],
        gkey: tuple[str, ...],
    ) -> FieldValue | None:
        """One column's value over the whole range, from its (at most two) buckets."""

        def buckets(agg: str) -> list[tuple[int, FieldValue]]:
            return sorted(results.get((agg, c.source), {}).get(gkey, {}).items())

        if c.func == "mean":
            sums, counts = buckets("sum"), buckets("count")
            n = sum(int(v) for _, v in counts)
            return math.fsum(float(v) for _, v in sums) / n if n else None
        got = buckets(str(c.func))
        if not got:
            return None
        if c.func == "first":
            return got[0][1]
        if c.func == "last":
            return got[-1][1]
        value = got[0][1]
        for _, v in got[1:]:
            value = _merge(c.func, value, v)
        return value
