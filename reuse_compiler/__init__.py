"""reuse-compiler: adaptive deep reuse (Ning, Guan, Shen) as a PyTorch compiler pass.

>>> import torch, reuse_compiler
>>> from reuse_compiler.models import cifarnet
>>> gm = reuse_compiler.reuse_compile(cifarnet(in_channels=1, image_size=28), torch.randn(8, 1, 28, 28))
>>> gm(torch.randn(8, 1, 28, 28)).shape
torch.Size([8, 10])
"""

from reuse_compiler.passes.analysis import ReuseTraceError
from reuse_compiler.runtime import ops as _ops  # noqa: F401  (registers the reuse:: operators)

from .api import reuse_compile, set_stage
from .checkpoint import load_checkpoint, load_stage_dict, save_checkpoint, stage_dict
from .config import ReuseConfig
from .controller import AdaptiveReuse
from .export import export_onnx
from .plan import LayerPlan, ReusePlan

__all__ = [
    "reuse_compile",
    "set_stage",
    "AdaptiveReuse",
    "save_checkpoint",
    "load_checkpoint",
    "stage_dict",
    "load_stage_dict",
    "export_onnx",
    "ReuseConfig",
    "ReusePlan",
    "LayerPlan",
    "ReuseTraceError",
]

__version__ = "0.1.0"
