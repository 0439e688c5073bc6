"""Every private torch surface svgd_fx imports, in one place: the list to check on a torch upgrade.

(Attributes read defensively elsewhere, such as ``OptimizedModule.dynamo_ctx`` in the backend's
``_svgd_backend_of`` and Dynamo's ``callback_handler``, are documented where they are read.)
"""

from __future__ import annotations

from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.eval_frame import OptimizedModule, skip_code
from torch._dynamo.external_utils import wrap_inline
from torch._dynamo.utils import counters
from torch._functorch import config as functorch_config
from torch._functorch._aot_autograd.descriptors import GradAOTOutput, PlainAOTInput
from torch._functorch.partitioners import default_partition
from torch._guards import detect_fake_mode

__all__ = ["make_boxed_func", "aot_autograd", "OptimizedModule", "counters", "functorch_config", "GradAOTOutput",
           "PlainAOTInput", "default_partition", "detect_fake_mode", "compile_fx", "compiling_frame", "skip_code",
           "wrap_inline"]


def compile_fx(gm, example_inputs, config_patches: dict):
    """inductor's ``compile_fx`` (imported at the first compile: 0.6 s that ``import svgd_fx`` need not pay)."""
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx

    return inductor_compile_fx(gm, example_inputs, config_patches=config_patches)


def compiling_frame():
    """Dynamo's translator of the frame being compiled (its ``f_locals``, ``parent``), or None."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:  # a private API: the caller falls back to the Python stack
        return None
