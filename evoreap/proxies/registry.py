"""The proxy registry: a proxy turns one chunk of teacher-forced positions into one value per position.

A proxy is a function ``fn(inputs: ProxyInputs) -> Tensor [B, T]``; :func:`evoreap.proxies.evaluate` averages it
over the valid positions, per domain and overall. Register new ones with::

    @register_proxy("top5", higher_is_better=True, needs_reference=True)
    def top5(inputs):
        return (inputs.ref["topk_ids"][..., :5] == inputs.logits.argmax(-1, keepdim=True)).any(-1).float()

Every built-in (``nll``, ``kl``, ``esap``, ``top1``) is registered when this module is imported; a name is
registered once (a second registration raises :class:`~evoreap.errors.RegistryError`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from evoreap.errors import UsageError
from evoreap.reference import log_partition
from evoreap.registry import Registry


@dataclass(frozen=True, eq=False)
class ProxyInputs:
    """One chunk of positions of one batch.

    Attributes:
        logits: ``[B, T, V]`` the output head's values for the candidate (the model under evaluation), in the model's
            dtype, not normalised: what a proxy needs of them comes from the properties below, each computed on
            first use and shared by every proxy of the chunk.
        targets: ``[B, T]`` int64 actual next tokens.
        valid: ``[B, T]`` bool; values at invalid positions are ignored (they may be anything, even NaN).
        ref: the reference rows for these positions (``topk_logprobs``, ``topk_ids``, ``tail_logmass``,
            ``target_logprob``, ``valid``), or None when no proxy asked for one.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    ref: dict[str, torch.Tensor] | None = None

    @cached_property
    def _partition(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # with a reference, the tail outside its top-K ids comes from the same pass as the normaliser
        return log_partition(self.logits, self.ref["topk_ids"] if self.ref is not None else None)

    @cached_property
    def log_normaliser(self) -> torch.Tensor:
        """``[B, T]`` float32 log of the softmax's denominator: a log-prob is ``logit - log_normaliser``."""
        return self._partition[0]

    @cached_property
    def logprobs(self) -> torch.Tensor:
        """``[B, T, V]`` float32 log-probs: a full pass over the vocabulary that the built-in proxies do without."""
        return self.logits.to(self.log_normaliser.dtype) - self.log_normaliser[..., None]

    @cached_property
    def target_logprobs(self) -> torch.Tensor:
        """``[B, T]`` float32 log-prob of the actual next token."""
        z = self.log_normaliser
        return self.logits.gather(-1, self.targets[..., None]).squeeze(-1).to(z.dtype) - z

    @cached_property
    def coarse(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference and candidate on the reference's (K+1)-bucket partition: ``(log p [B,T,K], log p_tail [B,T],
        log q [B,T,K], log q_tail [B,T])``; computed once per chunk and shared by kl and esap."""
        if self.ref is None:
            raise UsageError("this proxy reads reference distributions: register it with needs_reference=True")
        z = self.log_normaliser
        q = self.logits.gather(-1, self.ref["topk_ids"].long()).to(z.dtype) - z[..., None]
        return self.ref["topk_logprobs"].float(), self.ref["tail_logmass"].float(), q, self._partition[1]


ProxyFn = Callable[[ProxyInputs], torch.Tensor]


@dataclass(frozen=True)
class Proxy:
    """A registered proxy. ``ideal`` is the value of a perfect candidate where one exists (esap: 1)."""

    name: str
    fn: ProxyFn
    higher_is_better: bool
    needs_reference: bool
    ideal: float | None = None
    description: str = ""

    def loss(self, value: float) -> float:
        """The value turned into a loss, lower is better: ``ideal - value`` or ``-value`` when higher is better."""
        if not self.higher_is_better:
            return value
        return (self.ideal - value) if self.ideal is not None else -value


PROXIES: Registry[Proxy] = Registry("proxy", quote=True, suggestions=1)


def register_proxy(name: str, *, higher_is_better: bool, needs_reference: bool, ideal: float | None = None,
                   description: str = "") -> Callable[[ProxyFn], ProxyFn]:
    """Decorator adding ``fn`` to the registry under ``name``; a name already taken raises
    :class:`~evoreap.errors.RegistryError`."""

    def add(fn: ProxyFn) -> ProxyFn:
        doc = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        PROXIES.add(name, Proxy(name, fn, higher_is_better, needs_reference, ideal, doc))
        return fn

    return add


def get_proxy(name: str) -> Proxy:
    return PROXIES.get(name)


def _xlogratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), 0 where p underflows to 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


@register_proxy("nll", higher_is_better=False, needs_reference=False)
def nll(inputs: ProxyInputs) -> torch.Tensor:
    """Next-token negative log-likelihood of the candidate (nats per token)."""
    return -inputs.target_logprobs


@register_proxy("kl", higher_is_better=False, needs_reference=True)
def kl(inputs: ProxyInputs) -> torch.Tensor:
    """KL(unpruned || candidate) per token over the reference's top-K ids plus one tail bucket (nats)."""
    lp, lpt, lq, lqt = inputs.coarse
    return _xlogratio(lp, lq).sum(-1) + _xlogratio(lpt, lqt)


@register_proxy("esap", higher_is_better=True, needs_reference=True, ideal=1.0)
def esap(inputs: ProxyInputs) -> torch.Tensor:
    """Expected speculative acceptance, sum_x min(p, q) = 1 - total variation, over top-K ids plus the tail."""
    lp, lpt, lq, lqt = inputs.coarse
    return torch.minimum(lp, lq).exp().sum(-1) + torch.minimum(lpt, lqt).exp()


@register_proxy("top1", higher_is_better=True, needs_reference=True, ideal=1.0)
def top1(inputs: ProxyInputs) -> torch.Tensor:
    """Top-1 agreement: the candidate's most likely next token is the unpruned model's."""
    return (inputs.logits.argmax(-1) == inputs.ref["topk_ids"][..., 0].long()).float()


__all__ = ["PROXIES", "Proxy", "ProxyInputs", "get_proxy", "register_proxy"]
