"""Scalarising a :class:`ProxyResult`: per-domain weights (``--proxy-weights code:2,drama:1``) and the
lower-is-better loss convention used by the search."""

from __future__ import annotations

import math

from evoreap.errors import UsageError
from evoreap.proxies.evaluate import ProxyResult
from evoreap.proxies.registry import get_proxy


def parse_proxy_weights(text: str) -> dict[str, float]:
    """``"code:2,drama:1"`` -> ``{"code": 2.0, "drama": 1.0}``; weights are non-negative, not all zero."""
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.rpartition(":")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"proxy weight {item!r} is not DOMAIN:WEIGHT; write e.g. code:2,drama:1")
        try:
            weight = float(value)
        except ValueError:
            raise UsageError(f"proxy weight {item!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise UsageError(f"proxy weight {item!r}: weights must be finite and non-negative")
        if name in out:
            raise UsageError(f"proxy weights name domain {name!r} twice")
        out[name] = weight
    if not out:
        raise UsageError(f"no proxy weights in {text!r}; write e.g. code:2,drama:1")
    if sum(out.values()) <= 0:
        raise UsageError("proxy weights are all zero; give at least one domain a positive weight")
    return out


def weighted_value(result: ProxyResult, proxy: str, weights: dict[str, float] | None = None) -> float:
    """The overall (token-weighted) value of ``proxy``, or with ``weights`` the weighted mean of its per-domain
    values; domains not named in ``weights`` get weight 0."""
    if proxy not in result.values:
        raise UsageError(f"proxy {proxy!r} was not evaluated; evaluated: {', '.join(result.values)}")
    if weights is None:
        return result.values[proxy]
    missing = [d for d, w in weights.items() if w > 0 and d not in result.per_domain]
    if missing:
        raise UsageError(f"proxy weights name domain(s) {', '.join(missing)} that have no scored tokens in this "
                         f"evaluation; domains present: {', '.join(result.per_domain)}")
    total = sum(w for w in weights.values() if w > 0)
    if total <= 0:
        raise UsageError("proxy weights are all zero; give at least one domain a positive weight")
    return sum(w * result.per_domain[d][proxy] for d, w in weights.items() if w > 0) / total


def loss_value(result: ProxyResult, proxy: str, weights: dict[str, float] | None = None) -> float:
    """:func:`weighted_value` as a loss, lower is better (kl, nll as they are; esap as 1 - esap)."""
    return get_proxy(proxy).loss(weighted_value(result, proxy, weights))
