"""The bidirectional AnyFlow forward (``AnyFlowTransformer3DModel.forward``) through :mod:`anyflow.ops`.

Every token attends to every token of the clip; the pieces (text context, time rows, RoPE tables, blocks,
head) are those of :mod:`.blocks`. Source: diffusers ``AnyFlowTransformer3DModel.forward`` and the official
bidirectional forward in ``far/models/transformer_far_wan_model.py`` (NVlabs/AnyFlow).
"""

from __future__ import annotations

from .. import ops
from . import blocks
from .blocks import SelfAttention, as_text, check_latents, frame_times, head, onloaded, patchify, unpatchify


def dense_self_attention(cos, sin, *, shard=None) -> SelfAttention:
    """Bidirectional self-attention over the whole sequence (:func:`anyflow.models.blocks.rotary_attention` with
    :func:`anyflow.ops.sdpa`); ``cos``, ``sin`` are the fp32 ``[N, Dh/2]`` RoPE tables of its ``N`` tokens
    (:func:`anyflow.models.blocks.rope_for`), this rank's under Ulysses (``shard``)."""
    return blocks.rotary_attention(cos, sin, lambda layer, q, k, v: ops.sdpa(q, k, v), shard=shard)


@onloaded
def bidirectional_forward(
    model, hidden_states, timestep, r_timestep, encoder_hidden_states, encoder_hidden_states_image=None
):
    """``AnyFlowTransformer3DModel.forward`` through the op layer, on the backend of :class:`anyflow.ops.backend`.

    Args:
        model: a diffusers ``AnyFlowTransformer3DModel`` (enabled or not; its parameters are read).
        hidden_states: ``[B, F, C, H, W]`` latents z_t (model dtype).
        timestep, r_timestep: ``[B, F]`` (or scalar / ``[B]``) time pair (t, r) in [0, 1000].
        encoder_hidden_states: ``[B, L, text_dim]`` text, or a :class:`~anyflow.models.blocks.TextContext`.
        encoder_hidden_states_image: optional ``[B, L_img, image_dim]`` image embedding (I2V models).

    Returns:
        ``[B, F, C, H, W]`` mean velocity u in the model dtype.

    Raises:
        ValueError: latents not ``[B, F, C, H, W]`` with the model's channels and a size divisible by the
            patch; timesteps of another shape; an image embedding for a model without image embedder.
    """
    check_latents("hidden_states", hidden_states, model)
    b, f, _, hh, ww = hidden_states.shape
    p = model.config.patch_size
    grid = (hh // p[1], ww // p[2])
    text = as_text(model, encoder_hidden_states, encoder_hidden_states_image)
    t = frame_times("timestep", timestep, b, f, hidden_states.device)
    r = frame_times("r_timestep", r_timestep, b, f, hidden_states.device)
    delta = ops.delta_time(t, r, model.condition_embedder.deltatime_type)
    e_rows, m_rows = blocks.time_rows(model, t, delta, text.raw_dtype)
    segs = ((f, grid[0] * grid[1]),)
    cos, sin = blocks.rope_for(model, 0, f, grid, False, hidden_states.device)
    x = patchify(model.patch_embedding, hidden_states)
    shard = blocks.split_sequence(model, segs)  # Ulysses context parallelism: this rank's tokens
    x, (m_rows, e_rows), cos, sin = blocks.shard_inputs(shard, x, (m_rows, e_rows), cos, sin)
    segs = segs if shard is None else shard.segments
    x = blocks.run_blocks(model, x, text, m_rows, segs, dense_self_attention(cos, sin, shard=shard))
    out = head(model, x, e_rows, segs)
    return unpatchify(model, out if shard is None else shard.gather(out), f, hh, ww)
