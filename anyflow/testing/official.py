"""diffusers' AnyFlow FAR classes with official semantics restored, as a test reference.

diffusers 0.42.1 ``AnyFlowCausalAttnProcessor`` zero-pads q/k/v to a multiple of 128 tokens before
calling flex attention, also in the mask-free KV-cache inference step. There is no mask to exclude the
padded keys, so ``ceil(Lq/128)*128 - Lq`` zero keys (score 0, value 0) join every softmax. The official
NVlabs/AnyFlow code attends only to real keys. :func:`official_far_semantics` drops those padded keys
inside diffusers' own attention call and changes nothing else, so the patched diffusers model is the
official model; the masked paths (cache step, training), which exclude padding through the mask, are
untouched.
"""

from __future__ import annotations

import contextlib
import math
import threading

_STATE = threading.local()


@contextlib.contextmanager
def official_far_semantics():
    """Within this context, diffusers' FAR KV-cache inference step ignores its zero-padded keys."""
    from diffusers.models.transformers import transformer_anyflow_far as mod

    proc_cls = mod.AnyFlowCausalAttnProcessor
    orig_call = proc_cls.__call__
    orig_dispatch = mod.dispatch_attention_fn

    def call(self, attn, hidden_states, *args, **kwargs):
        _STATE.query_len = hidden_states.shape[1]
        try:
            return orig_call(self, attn, hidden_states, *args, **kwargs)
        finally:
            _STATE.query_len = None

    def dispatch(query, key, value, attn_mask=None, **kwargs):
        q_len = getattr(_STATE, "query_len", None)
        if attn_mask is None and q_len is not None:
            pad = int(math.ceil(q_len / 128.0) * 128 - q_len)
            if pad:
                key, value = key[:, : key.shape[1] - pad], value[:, : value.shape[1] - pad]
        return orig_dispatch(query, key, value, attn_mask=attn_mask, **kwargs)

    proc_cls.__call__ = call
    mod.dispatch_attention_fn = dispatch
    try:
        yield
    finally:
        proc_cls.__call__ = orig_call
        mod.dispatch_attention_fn = orig_dispatch
