"""What a GEAR cache does to a causal LM's next-token predictions, measured on the user's own text.

    >>> from lowrank_ops.kvcache.hf_quality import cache_quality
    >>> cache_quality(model, input_ids, GEARConfig(), prefill=512)
    CacheQuality(tokens=..., perplexity_dense=..., perplexity_gear=..., kl=..., top1_agreement=..., ratio_vs_fp16=...)

Teacher forcing, the way the cache is used: the first ``prefill`` tokens go in as one prompt
(compressed after the prefill's own attention), then every later token one decode step at a
time through the "gear" attention, which reads the compressed cache; each step's logits predict
the next token of ``input_ids``. The reference is the same model over the same tokens with its
uncompressed attention (one forward: what a DynamicCache decode gives, up to rounding). Reported
over the scored tokens (positions ``prefill`` … end): both perplexities, the mean KL divergence
KL(dense ‖ gear) in nats, the share of tokens whose most likely next token agrees, and the GEAR
cache's bytes against an fp16 cache at the end. The model's attention implementation is restored
afterwards, whatever happens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from lowrank_ops.core.checks import check_int, check_tensor
from lowrank_ops.kvcache.config import GEARConfig
from lowrank_ops.kvcache.hf import GEAR_ATTENTION, GEARCache


@dataclass(frozen=True)
class CacheQuality:
    """Next-token quality with the compressed cache against the uncompressed one (see the module docstring)."""

    tokens: int
    perplexity_dense: float
    perplexity_gear: float
    kl: float
    top1_agreement: float
    ratio_vs_fp16: float


def _gear_logits(model: nn.Module, input_ids: Tensor, cache: GEARCache, prefill: int) -> Tensor:
    """(batch, T − prefill, vocab) logits predicting tokens prefill … T−1: the prompt in one step,
    then one decode step per token."""
    steps = [model(input_ids=input_ids[:, :prefill], cache=cache).logits[:, -1]]
    for t in range(prefill, input_ids.shape[1] - 1):
        steps.append(model(input_ids=input_ids[:, t: t + 1], cache=cache).logits[:, -1])
    return torch.stack(steps, dim=1)


def cache_quality(model: nn.Module, input_ids: Tensor, config: Optional[GEARConfig] = None, *, prefill: int,
                  layer_configs: Optional[Mapping[int, Optional[GEARConfig]]] = None) -> CacheQuality:
    """Score ``input_ids`` (batch, T) token ids, unpadded, with a :class:`GEARCache` of ``config``
    (and ``layer_configs``) against the model's uncompressed attention; ``prefill`` (1 ≤ prefill < T)
    tokens are the prompt. See the module docstring."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers causal LM, got {type(model).__name__}")
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
    check_int("prefill", prefill, low=1, high=input_ids.shape[1] - 1)
    cache = GEARCache(config, model_config=model.config, layer_configs=layer_configs)  # validates the settings
    targets = input_ids[:, prefill:].long()
    original = model.config._attn_implementation
    try:
        with torch.no_grad():
            dense = model(input_ids=input_ids).logits[:, prefill - 1: -1]
            model.set_attn_implementation(GEAR_ATTENTION)
            gear = _gear_logits(model, input_ids, cache, prefill)
    finally:
        model.set_attn_implementation(original)
    log_dense, log_gear = dense.float().log_softmax(-1), gear.float().log_softmax(-1)
    nll_dense = -log_dense.gather(-1, targets[..., None]).mean()
    nll_gear = -log_gear.gather(-1, targets[..., None]).mean()
    kl = (log_dense.exp() * (log_dense - log_gear)).sum(-1).mean()
    agree = (dense.argmax(-1) == gear.argmax(-1)).float().mean()
    return CacheQuality(
        tokens=targets.numel(), perplexity_dense=nll_dense.exp().item(), perplexity_gear=nll_gear.exp().item(),
        kl=kl.item(), top1_agreement=agree.item(), ratio_vs_fp16=cache.memory_report()["ratio_vs_fp16"])
