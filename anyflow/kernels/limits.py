"""Limits of the kernels, in one place: Python checks them before a launch, the kernels are built to them.

The Triton kernels (this package) import these numbers; the CUDA kernels (``csrc/kernels``) state the
same ones as macros and constants, and ``tests/test_kernel_limits.py`` reads the C++ sources to check
that both sides agree. Importing this module needs neither Triton nor torch.
"""

#: Non-empty segments of one call: frame segments of the conditioning ops (``ANYFLOW_MAX_SEGMENTS``,
#: csrc/kernels/segments.h) and KV segments of the segmented attention (``ANYFLOW_ATTN_MAX_SEGMENTS``,
#: csrc/kernels/attention.h).
MAX_SEGMENTS = 4
#: Widest attention head: a ``[BLOCK_M, D]`` fp32 accumulator per program (``ANYFLOW_ATTN_MAX_HEAD_DIM``).
MAX_HEAD_DIM = 256
#: Widest head of the Triton apply_rope kernel (one head per block).
MAX_ROPE_DIM = 16384
#: Query groups and key ranges per group of a chunk-causal layout in the CUDA kernel
#: (``ANYFLOW_ATTN_MAX_GROUPS``, ``ANYFLOW_ATTN_MAX_RANGES``).
MAX_GROUPS = 64
MAX_RANGES = 4
#: batch * heads of an attention call: the grid's y dimension (CUDA and Triton).
MAX_BATCH_HEADS = 65535
#: Chunks one row block of the CUDA row kernels holds: ``kChunks`` (4) per thread x ``kMaxThreads`` (1024)
#: (csrc/kernels/conditioning.cu, rope.cu); a chunk is 16 bytes' worth of elements when the vector width
#: divides the row (residual_norm) or the head dim (qk_norm_rope), else 1 element (residual_norm) or 2
#: (qk_norm_rope).
ROW_CHUNKS_PER_THREAD = 4
ROW_MAX_THREADS = 1024
MAX_ROW_CHUNKS = ROW_CHUNKS_PER_THREAD * ROW_MAX_THREADS
