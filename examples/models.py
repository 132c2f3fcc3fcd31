"""Model factories for the CLI and the examples: ``examples.models:cifarnet`` etc.

They are the package's own definitions (``reuse_compiler.models``), re-exported so the
commands in the README read naturally from a source checkout.
"""

from reuse_compiler.models import MODELS, alexnet, cifarnet, functional_net, vgg19

__all__ = ["MODELS", "alexnet", "cifarnet", "functional_net", "vgg19"]
