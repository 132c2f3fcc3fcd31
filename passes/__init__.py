"""FX graph analysis (``analysis``) and the convolution rewrite (``conv_rewrite``)."""

from .analysis import ConvSite, ReuseTraceError, find_convs, trace
from .conv_rewrite import emit_reuse_conv, rebuild

__all__ = ["ConvSite", "ReuseTraceError", "find_convs", "trace", "emit_reuse_conv", "rebuild"]
