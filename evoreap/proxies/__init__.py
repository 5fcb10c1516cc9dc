"""Proxies: cheap scores of a masked candidate against the unpruned model.

Built-ins (per scored token, then averaged per domain and overall):

* ``nll``  next-token loss of the candidate; lower is better; needs no reference.
* ``kl``   KL(unpruned || candidate); lower is better.
* ``esap`` sum_x min(p_unpruned(x), p_candidate(x)) = 1 - total variation, the EvoESAP fitness; higher is better.
* ``top1`` agreement of the candidate's most likely next token with the unpruned model's; higher is better.

Tail treatment: the unpruned distribution is cached as its top-K tokens plus one lumped tail bucket
(:mod:`evoreap.reference`). ``kl`` and ``esap`` are computed exactly on that (K+1)-bucket coarsening, with the
candidate's probabilities gathered on the same K ids and its tail mass = 1 - their sum (taken as a log-sum-exp over
the other ids). Merging outcomes can only lose information, so the coarse KL is a lower bound on the full KL
(data-processing inequality) and the coarse ESAP an upper bound on the full ESAP (its error is at most the tail
mass); both are exact when K equals the vocabulary size.
"""

from evoreap.proxies.evaluate import ProxyResult, evaluate, select_sequences, token_order
from evoreap.proxies.registry import PROXIES, Proxy, ProxyInputs, get_proxy, register_proxy
from evoreap.proxies.weights import loss_value, parse_proxy_weights, weighted_value

__all__ = ["PROXIES", "Proxy", "ProxyInputs", "ProxyResult", "evaluate", "get_proxy", "loss_value",
           "parse_proxy_weights", "register_proxy", "select_sequences", "token_order", "weighted_value"]
