"""Compile Triton kernels for Hopper (sm_90) without a GPU, for tests.

:data:`COMPILE_ONLY_SM90` is the head of a script run in a fresh interpreter (without ``TRITON_INTERPRET``):
it installs a stand-in Triton driver that reports an sm_90 target, so Triton lowers each kernel to PTX and
runs its bundled ``ptxas`` while nothing is launched, and replaces ``torch.library.wrap_triton`` by a recorder:
``kernel[grid](*args, **kwargs)`` appends ``(kernel, args, kwargs)`` to ``launches``. The script then calls
the op wrappers on CPU tensors and compiles every recorded launch with ``compile_launches()``.
This catches what the interpreter does not check: ``tl.dot`` shapes, constexpr and loop-carried types,
shared memory and register limits.
"""

COMPILE_ONLY_SM90 = '''
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class CompileOnly:  # Triton lowers to PTX and runs its bundled ptxas; nothing is launched
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(CompileOnly())
launches = []


class Record:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))


torch.library.wrap_triton = Record
MAX_SHARED = 232448  # H100 / H200 opt-in shared memory per block


def compile_launches(every_config=True):
    """Compile the recorded launches (each autotune config, or only the last); returns
    ``[(kernel name, [fits in shared memory, per config])]`` and clears ``launches``."""
    out = []
    for kernel, args, kwargs in launches:
        fn = kernel
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn
        configs = getattr(kernel, "configs", None)
        if not configs:
            configs = [triton.Config({}, num_warps=kwargs.pop("num_warps", 4), num_stages=kwargs.pop("num_stages", 3))]
        if not every_config:
            configs = configs[-1:]
        fits = []
        for c in configs:
            k = fn.run(*args, grid=(1,), warmup=True, num_warps=c.num_warps, num_stages=c.num_stages,
                       **kwargs, **c.kwargs)
            fits.append(k.metadata.shared <= MAX_SHARED)
        out.append((fn.__name__, fits))
    launches.clear()
    return out
'''
