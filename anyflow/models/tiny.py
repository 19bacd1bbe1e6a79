"""Tiny AnyFlow models built locally (no hub): transformers, offline tokenizer, text encoder, VAE and whole
pipelines, for ``anyflow make-tiny``, ``model.tiny`` training configs, benchmarks and tests.

The shapes keep every code path alive (several heads, RoPE split over three axes, FAR compressed
patches) while a forward takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch

#: Transformer kwargs shared by the bidirectional and FAR tiny models. head_dim 12 gives a RoPE split
#: of 2/2/2 complex pairs over (frame, row, col), like Wan's 22/21/21 at head_dim 128.
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
    cross_attn_norm=True,
    eps=1e-6,
    rope_max_seq_len=64,
    gate_value=0.25,
    deltatime_type="r",
)

TINY_FAR_EXTRA = dict(compressed_patch_size=(1, 4, 4), full_chunk_limit=3, chunk_partition=(1, 3, 3, 3, 3, 3, 3, 2))


def tiny_transformer(kind: str = "bidirectional", seed: int = 0, dtype=torch.float32, **overrides):
    """Build a randomly initialised tiny diffusers AnyFlow transformer.

    Args:
        kind: ``"bidirectional"`` (``AnyFlowTransformer3DModel``) or ``"far"``
            (``AnyFlowFARTransformer3DModel``).
        seed: seed for the parameter initialisation. Every parameter, including the zero-initialised
            ones of a fresh model, is re-drawn so that no branch is trivially zero.
        dtype: parameter dtype.
        overrides: config keys to change.

    Raises:
        ValueError: unknown ``kind``.
    """
    from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel

    if kind == "bidirectional":
        cls, cfg = AnyFlowTransformer3DModel, dict(TINY_TRANSFORMER)
    elif kind == "far":
        cls, cfg = AnyFlowFARTransformer3DModel, dict(TINY_TRANSFORMER, **TINY_FAR_EXTRA)
    else:
        raise ValueError(f"kind must be 'bidirectional' or 'far', got {kind!r}")
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = cls(**cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm2.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p.shape[-1]) ** 0.5))
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Tiny text encoder, tokenizer, VAE and whole pipelines (all built locally, no hub access)
# --------------------------------------------------------------------------------------------------

#: Words that tokenize to one id each; anything else falls back to single characters (WordPiece).
_TINY_WORDS = (
    "a an the and of in on at with to is are his her its their this that it from by for over under "
    "red green blue yellow white black orange purple small big tiny old young slow fast bright dark "
    "panda cat dog bird fish horse person man woman child car boat tree flower sky sea river mountain "
    "city street forest beach snow rain sun light water fire cloud road house camera video scene "
    "eating walking running flying swimming sitting standing looking playing dancing moving bamboo "
    "across through front behind close up view shot day night sunset"
).split()
_TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()"

#: Latent channel statistics of the tiny VAE (fixed, deliberately not 0/1 so normalisation matters).
TINY_LATENTS_MEAN = [round(0.05 * ((7 * i) % 11 - 5), 4) for i in range(16)]
TINY_LATENTS_STD = [round(0.8 + 0.05 * ((5 * i) % 9), 4) for i in range(16)]

#: Chunk partition written into tiny FAR checkpoints: 6 latent frames = 21 pixel frames. Four chunks
#: with ``full_chunk_limit`` 3 keep the compressed-context branch alive in the last chunk and in the
#: cache steps.
TINY_CHECKPOINT_CHUNK_PARTITION = (1, 1, 2, 2)


def tiny_tokenizer():
    """Build an offline UMT5-style tokenizer (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2).

    A WordPiece model over a few hundred lowercase words plus single characters (and their ``##``
    continuations), so any ASCII prompt tokenizes without ``<unk>``; text is NFKC-normalised and
    lowercased, split on whitespace and punctuation, and ``</s>`` is appended like T5.

    Returns:
        transformers.PreTrainedTokenizerFast: supports ``padding="max_length"``, truncation,
        attention masks, ``return_tensors="pt"`` and ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in ["<pad>", "</s>", "<unk>", *_TINY_WORDS, *_TINY_CHARS, *("##" + c for c in _TINY_CHARS)]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_text_encoder(seed: int = 0, dtype=torch.float32):
    """Build a tiny randomly initialised ``transformers.UMT5EncoderModel`` (d_model 32 = tiny ``text_dim``).

    Args:
        seed: seed for the parameter initialisation.
        dtype: parameter dtype.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(tiny_tokenizer()),
        d_model=TINY_TRANSFORMER["text_dim"],
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    model = UMT5EncoderModel(config).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def tiny_vae(seed: int = 0, dtype=torch.float32):
    """Build a tiny randomly initialised ``diffusers.AutoencoderKLWan`` (z_dim 16, spatial /8, temporal /4).

    Args:
        seed: seed for the parameter initialisation.
        dtype: parameter dtype.
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=list(TINY_LATENTS_MEAN),
        latents_std=list(TINY_LATENTS_STD),
    )
    vae.eval()
    # a fresh module is fp32 already; .to() would only add diffusers' keep-in-fp32 warning
    return vae if dtype == torch.float32 else vae.to(dtype)


def tiny_pipeline(kind: str = "bidirectional", seed: int = 0, dtype=torch.float32, **transformer_overrides):
    """Assemble a tiny diffusers ``AnyFlowPipeline`` (``kind="bidirectional"``) or ``AnyFlowFARPipeline`` (``"far"``).

    Components: :func:`tiny_tokenizer`, :func:`tiny_text_encoder`, :func:`tiny_transformer`,
    :func:`tiny_vae` and ``FlowMapEulerDiscreteScheduler(shift=5.0)``. All parameters are in ``dtype``.

    Args:
        kind: ``"bidirectional"`` or ``"far"``.
        seed: base seed; each component uses a distinct derived seed.
        dtype: parameter dtype of every component.
        transformer_overrides: transformer config keys to change (e.g. ``chunk_partition``).

    Raises:
        ValueError: unknown ``kind``.
    """
    from diffusers import AnyFlowFARPipeline, AnyFlowPipeline, FlowMapEulerDiscreteScheduler

    cls = AnyFlowFARPipeline if kind == "far" else AnyFlowPipeline
    return cls(
        transformer=tiny_transformer(kind, seed=seed, dtype=dtype, **transformer_overrides),
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_text_encoder(seed + 10, dtype=dtype),
        vae=tiny_vae(seed + 20, dtype=dtype),
        scheduler=FlowMapEulerDiscreteScheduler(shift=5.0),
    )


def _legacy_transformer_config(cfg: dict, kind: str) -> dict:
    """Rewrite an upstream transformer config the way the official converter writes it (NVlabs/AnyFlow
    convert_anyflow_to_diffusers.py)."""
    copied = ("attention_head_dim", "cross_attn_norm", "deltatime_type", "eps", "ffn_dim", "freq_dim", "gate_value",
              "in_channels", "num_attention_heads", "num_layers", "out_channels", "rope_max_seq_len", "text_dim")
    return dict(
        {k: cfg[k] for k in copied},
        _class_name="FAR_Wan_Transformer3DModel",
        _diffusers_version="0.35.1",
        added_kv_proj_dim=None,
        chunk_partition=list(cfg["chunk_partition"]) if kind == "far" else None,
        compressed_patch_size=list(cfg.get("compressed_patch_size", (1, 4, 4))),
        full_chunk_limit=cfg.get("full_chunk_limit", 3),
        image_dim=None,
        init_far_model=kind == "far",
        init_flowmap_model=True,
        patch_size=list(cfg["patch_size"]),
        pos_embed_seq_len=None,
        qk_norm="rms_norm_across_heads",
    )


def save_tiny_checkpoint(path, kind: str = "far", seed: int = 0, layout: str = "upstream", dtype=torch.float32):
    """Write a tiny AnyFlow checkpoint folder (diffusers format) in the upstream or the legacy layout.

    ``layout="upstream"`` is what ``AnyFlowFARPipeline.save_pretrained`` writes. ``layout="legacy"``
    rewrites ``model_index.json``, ``transformer/config.json`` and ``scheduler/scheduler_config.json``
    the way NVlabs' ``convert_anyflow_to_diffusers.py`` does (``FARWanAnyFlowPipeline`` /
    ``WanAnyFlowPipeline``, ``FAR_Wan_Transformer3DModel`` with ``init_far_model`` /
    ``init_flowmap_model``, ``FlowMapDiscreteScheduler`` with ``weight_type``); weights are identical.
    FAR checkpoints get ``chunk_partition`` :data:`TINY_CHECKPOINT_CHUNK_PARTITION` (21 pixel frames).

    Args:
        path: output folder (created; existing files of the same name are overwritten).
        kind: ``"far"`` or ``"bidirectional"``.
        seed: base seed of :func:`tiny_pipeline`.
        layout: ``"upstream"`` or ``"legacy"``.
        dtype: parameter dtype of the saved weights.

    Returns:
        pathlib.Path: the folder.

    Raises:
        ValueError: unknown ``kind`` or ``layout``.
    """
    import json
    from pathlib import Path

    if layout not in ("upstream", "legacy"):
        raise ValueError(f"layout must be 'upstream' or 'legacy', got {layout!r}")
    overrides = {"chunk_partition": TINY_CHECKPOINT_CHUNK_PARTITION} if kind == "far" else {}
    pipe = tiny_pipeline(kind, seed=seed, dtype=dtype, **overrides)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    if layout == "upstream":
        return path

    def rewrite(file: Path, data: dict) -> None:
        file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    rewrite(
        path / "model_index.json",
        {
            "_class_name": "FARWanAnyFlowPipeline" if kind == "far" else "WanAnyFlowPipeline",
            "_diffusers_version": "0.35.1",
            "scheduler": ["far.schedulers.scheduling_flowmap_euler_discrete", "FlowMapDiscreteScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["far.models.transformer_far_wan_model", "FAR_Wan_Transformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
        },
    )
    rewrite(path / "transformer" / "config.json", _legacy_transformer_config(dict(pipe.transformer.config), kind))
    rewrite(
        path / "scheduler" / "scheduler_config.json",
        {
            "_class_name": "FlowMapDiscreteScheduler",
            "_diffusers_version": "0.35.1",
            "num_train_timesteps": pipe.scheduler.config.num_train_timesteps,
            "shift": float(pipe.scheduler.config.shift),
            "weight_type": "gaussian",
        },
    )
    return path
