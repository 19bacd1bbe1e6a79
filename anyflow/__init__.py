"""anyflow: a fast engine for AnyFlow any-step video diffusion (flow maps on Wan2.1, bidirectional and FAR).

Importing this package is cheap and safe everywhere: it needs only torch, never initialises CUDA, and
does not import Triton, diffusers or the compiled extension ``anyflow._C`` until a feature asks for them.

Public entry points:

* :func:`anyflow.enable` - accelerate a diffusers ``AnyFlowPipeline`` / ``AnyFlowFARPipeline`` or their
  transformers in place; returns a handle with ``.disable()``.
* :mod:`anyflow.ops` - the fused operations (time-pair conditioning, adaLN modulate, gated residual,
  FAR attention, Euler shortcut update) with a backend registry (``"torch"``, ``"triton"``, ``"cuda"``).
* :func:`anyflow.load_pipeline` - load a diffusers-format AnyFlow folder (upstream or legacy layout).
"""

__version__ = "0.1.0"

__all__ = ["__version__", "enable", "load_pipeline"]


def _say_if_extension_absent() -> None:
    """Print one line on stderr, once per process, when the compiled backend is missing (see
    :func:`anyflow._ext.absent_notice`); an installation with ``anyflow._C`` built prints nothing."""
    import sys

    from ._ext import absent_notice

    notice = absent_notice()
    if notice is not None:
        print(notice, file=sys.stderr)


_say_if_extension_absent()


def enable(pipe_or_transformer, backend: str = "auto", *, attention=None, cuda_graphs: bool = False,
           context_parallel=None):
    """Accelerate a diffusers AnyFlow pipeline or transformer in place. See :func:`anyflow.integration.enable`."""
    from .integration import enable as _enable

    return _enable(pipe_or_transformer, backend=backend, attention=attention, cuda_graphs=cuda_graphs,
                   context_parallel=context_parallel)


def load_pipeline(path, **kwargs):
    """Load a diffusers-format AnyFlow folder. See :func:`anyflow.models.loading.load_pipeline`."""
    from .models.loading import load_pipeline as _load

    return _load(path, **kwargs)
