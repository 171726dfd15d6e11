"""Filters to the SQL the server evaluates: SQL text as is, pyarrow and polars expressions translated.

The server takes a SQL boolean expression (DataFusion's dialect). A `pyarrow.compute.Expression`
has no public tree, so its canonical text (`str(expr)`) is parsed; a polars expression is read
from its JSON serialisation. Both cover what a filter needs: comparisons, `and`/`or`/`not`,
`is_in`, `is_null`/`is_valid` (`is_not_null`), over columns and literals. Anything else raises
`Untranslatable`, a `ValueError` that says what could not be translated; polars then filters
locally instead, and pyarrow users can pass SQL text.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pyarrow as pa


class Untranslatable(ValueError):
    """A filter expression with a part that has no SQL translation here."""


def to_sql(filter: Any) -> str | None:
    """SQL text for `filter`: `None`, SQL text, or a `pyarrow.compute.Expression`.

    >>> import pyarrow.compute as pc
    >>> to_sql((pc.field("percent_mito") <= 0.05) & pc.field("cell_type").isin(["B cells"]))
    "((\\"percent_mito\\" <= 0.05) AND (\\"cell_type\\" IN ('B cells')))"
    """
    if filter is None or isinstance(filter, str):
        return filter
    import pyarrow.compute as pc

    if isinstance(filter, pc.Expression):
        return _Arrow(str(filter)).parse()
    raise TypeError(f"a filter is SQL text or a pyarrow.compute.Expression, not {type(filter).__name__}")


def identifier(name: str) -> str:
    """A column name quoted for SQL, so case and spaces survive."""
    return '"' + name.replace('"', '""') + '"'


def literal(value: Any) -> str:
    """A Python value as a SQL literal."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise Untranslatable(f"the literal {value!r} has no SQL spelling here")
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise Untranslatable(f"the literal {value!r} ({type(value).__name__}) has no SQL translation")


_COMPARISONS = {"==": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


class _Arrow:
    """A recursive-descent parser of pyarrow's expression text, writing SQL as it goes.

    The grammar it reads is what `Expression.ToString` prints: `(a op b)` for comparisons and
    `and`/`or`, `invert(x)`, `is_in(x, {value_set=type:[...], ...})`, `is_null(x, {...})`,
    `is_valid(x)`, field names bare, strings in double quotes, `null[...]` for a null literal.
    """

    _TOKEN = re.compile(
        r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<number>-?(?:\d+\.?\d*(?:e[+-]?\d+)?|inf|nan))(?![\w.])'
        r"|(?P<op>==|!=|<=|>=|<|>|\(|\)|,|\{|\}|\[|\]|=|:)|(?P<word>[A-Za-z_][\w.]*))",
    )

    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = self._TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise Untranslatable(f"cannot read the expression {text!r} at {text[pos:pos + 20]!r}")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def parse(self) -> str:
        sql = self.expr()
        if self.i != len(self.tokens):
            raise Untranslatable(f"cannot translate {self.text!r}: unexpected {self.peek()[1]!r}")
        return sql

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if value is not None and token[1] != value:
            raise Untranslatable(f"cannot translate {self.text!r}: expected {value!r}, found {token[1]!r}")
        self.i += 1
        return token

    def expr(self) -> str:
        kind, value = self.peek()
        if value == "(":
            self.take("(")
            left = self.expr()
            op = self.take()[1]
            right = self.expr()
            self.take(")")
            if op in _COMPARISONS:
                return f"({left} {_COMPARISONS[op]} {right})"
            if op in ("and", "or"):
                return f"({left} {op.upper()} {right})"
            raise Untranslatable(f"cannot translate the operator {op!r} in {self.text!r}")
        if kind == "string":
            self.take()
            return literal(json.loads(value))
        if kind == "number":
            self.take()
            if value in ("inf", "-inf", "nan", "-nan"):
                raise Untranslatable(f"the literal {value} in {self.text!r} has no SQL spelling here")
            return value
        if kind == "word":
            self.take()
            if value in ("true", "false"):
                return value.upper()
            if value == "null":  # null[type]
                self.skip_brackets()
                return "NULL"
            if self.peek()[1] == "(":
                return self.call(value)
            return identifier(value)
        raise Untranslatable(f"cannot translate {self.text!r}: unexpected {value!r}")

    def skip_brackets(self):
        if self.peek()[1] == "[":
            depth = 0
            while True:
                v = self.take()[1]
                depth += v == "["
                depth -= v == "]"
                if depth == 0:
                    return

    def call(self, name: str) -> str:
        self.take("(")
        if name == "invert":
            inner = self.expr()
            self.take(")")
            return f"(NOT {inner})"
        if name in ("is_null", "is_valid"):
            inner = self.expr()
            if self.peek()[1] == ",":  # options, e.g. {nan_is_null=false}
                self.take(",")
                self.skip_options()
            self.take(")")
            return f"({inner} IS {'NOT ' if name == 'is_valid' else ''}NULL)"
        if name == "is_in":
            inner = self.expr()
            self.take(",")
            values = self.value_set()
            self.take(")")
            if not values:
                return "FALSE"
            return f"({inner} IN ({', '.join(values)}))"
        raise Untranslatable(
            f"cannot translate the function {name}() in {self.text!r}: filters take comparisons, "
            "and/or/invert, is_in, is_null and is_valid; pass SQL text for more"
        )

    def skip_options(self):
        self.take("{")
        depth = 1
        while depth:
            v = self.take()[1]
            if v == "":
                raise Untranslatable(f"cannot read the options in {self.text!r}")
            depth += v == "{"
            depth -= v == "}"

    def value_set(self) -> list[str]:
        """`{value_set=type:[v, ...], null_matching_behavior=...}` as SQL literals."""
        self.take("{")
        self.take("value_set")
        self.take("=")
        self.take()  # the type, e.g. string or int64
        self.take(":")
        self.take("[")
        values = []
        while self.peek()[1] != "]":
            kind, value = self.take()
            if kind == "string":
                values.append(literal(json.loads(value)))
            elif kind == "number":
                values.append(value)
            elif value in ("true", "false"):
                values.append(value.upper())
            elif value == "null":
                values.append("NULL")
            elif value != ",":
                raise Untranslatable(f"cannot translate the value {value!r} in {self.text!r}")
        self.take("]")
        while self.peek()[1] not in ("}", ""):
            self.take()
        self.take("}")
        return values


# polars ---------------------------------------------------------------------------------------

_POLARS_OPS = {"Eq": "=", "NotEq": "<>", "Lt": "<", "LtEq": "<=", "Gt": ">", "GtEq": ">=",
               "And": "AND", "Or": "OR", "LogicalAnd": "AND", "LogicalOr": "OR"}


def polars_to_sql(expr: Any) -> str:
    """SQL for a polars predicate, read from its JSON serialisation; raises `Untranslatable`."""
    try:
        tree = json.loads(expr.meta.serialize(format="json"))
    except Exception as e:  # a polars without JSON serialisation, or an expression it refuses
        raise Untranslatable(f"cannot serialise the polars expression {expr}: {e}") from e
    return _polars(tree)


def _polars(node: Any) -> str:
    if not isinstance(node, dict) or len(node) != 1:
        raise Untranslatable(f"cannot translate the polars node {str(node)[:80]}")
    (kind, body), = node.items()
    if kind == "Column":
        return identifier(body)
    if kind == "Literal":
        return _polars_literal(body)
    if kind == "BinaryExpr":
        op = _POLARS_OPS.get(body["op"])
        if op is None:
            raise Untranslatable(f"cannot translate the polars operator {body['op']}")
        return f"({_polars(body['left'])} {op} {_polars(body['right'])})"
    if kind == "Function":
        function = body["function"]
        inputs = body["input"]
        if function == {"Boolean": "Not"} and len(inputs) == 1:
            return f"(NOT {_polars(inputs[0])})"
        if function == {"Boolean": "IsNull"} and len(inputs) == 1:
            return f"({_polars(inputs[0])} IS NULL)"
        if function == {"Boolean": "IsNotNull"} and len(inputs) == 1:
            return f"({_polars(inputs[0])} IS NOT NULL)"
        if isinstance(function, dict) and "IsIn" in function.get("Boolean", {}) and len(inputs) == 2:
            values = _polars_list(inputs[1])
            if not values:
                return "FALSE"
            return f"({_polars(inputs[0])} IN ({', '.join(values)}))"
    raise Untranslatable(f"cannot translate the polars expression part {kind}")


def _polars_literal(body: Any) -> str:
    if isinstance(body, dict) and len(body) == 1:
        (kind, value), = body.items()
        if kind == "Dyn" and isinstance(value, dict) and len(value) == 1:
            (_, v), = value.items()
            return literal(v)
        if kind == "Scalar":
            return _polars_scalar(value)
    raise Untranslatable(f"cannot translate the polars literal {str(body)[:80]}")


def _polars_scalar(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        (kind, v), = value.items()
        if kind in ("String", "Boolean", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16",
                    "UInt32", "UInt64", "Float32", "Float64"):
            return literal(v)
        if kind == "Null":
            return "NULL"
    if isinstance(value, dict) and "dtype" in value and "value" in value:
        return _polars_scalar(value["value"])
    raise Untranslatable(f"cannot translate the polars scalar {str(value)[:80]}")


def _polars_list(node: Any) -> list[str]:
    """The values of an `is_in` list literal (a polars Series, serialised as Arrow IPC)."""
    try:
        scalar = node["Literal"]["Scalar"]
        payload = scalar.get("List") if isinstance(scalar, dict) else None
        if payload is None and isinstance(scalar, dict) and "value" in scalar:
            payload = scalar["value"].get("List")
        table = pa.ipc.open_stream(bytes(payload)).read_all()
        values = table.column(0).combine_chunks()
        if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            values = values.flatten()
        return [literal(v) for v in values.to_pylist()]
    except Untranslatable:
        raise
    except Exception as e:
        raise Untranslatable(f"cannot read the is_in values: {e}") from e
