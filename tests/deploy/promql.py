"""Metric names out of PromQL expressions, and the series names a live ``/metrics`` exports.

Prometheus 2.42 (Debian's) has no endpoint that lists an expression's selectors, so
:func:`metric_names` is a small tokenizer: it drops string literals, label matchers ``{...}``,
ranges and subquery steps ``[...]``, the label lists of ``by``/``without``/``on``/``ignoring``/
``group_left``/``group_right``, numbers and ``offset`` durations; of the identifiers left, one
followed by ``(`` is a function or aggregation, and keywords are dropped. What remains are the
metric names. ``tests/deploy/test_promql_names.py`` pins this on tricky expressions, and every
expression is also evaluated by a real Prometheus, so a misparse cannot hide a bad query.
"""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

# Grafana's interval variables, replaced by a duration before Prometheus evaluates a panel's query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${__rate_interval}": "1m",
    "${__interval}": "15s",
    "${__range}": "1h",
}

_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "inf", "nan", "atan2",
}  # fmt: skip

_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([A-Za-z_:][A-Za-z0-9_:]*)"')
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-zA-Z]+", re.IGNORECASE)
_AT = re.compile(r"@\s*(start\(\)|end\(\)|[0-9.]+)")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_:])(0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def substitute_grafana_variables(expr: str) -> str:
    """Replace Grafana's ``$__rate_interval`` and friends by fixed durations."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names that the PromQL expression ``expr`` selects.

    Examples
    --------
    >>> sorted(metric_names('sum by (le) (rate(foveate_update_seconds_bucket{job="w"}[5m]))'))
    ['foveate_update_seconds_bucket']
    """
    names = set(_NAME_MATCHER.findall(expr))  # {__name__="x"} selects x too
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _AT.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    for match in _IDENT.finditer(text):
        word = match.group(0)
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function or an aggregation operator
        if word.lower() in _KEYWORDS or word.startswith("$"):
            continue
        names.add(word)
    return names


def exported_series_names(exposition: str) -> set[str]:
    """Every series name that a Prometheus text exposition declares, suffixes included.

    A labelled metric with no child yet still has its ``# TYPE`` line, so it counts as exported:
    a counter ``x`` gives ``x_total`` and ``x_created``, a histogram ``x_bucket``/``x_sum``/
    ``x_count``/``x_created``, a summary ``x``/``x_sum``/``x_count``/``x_created``.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names
