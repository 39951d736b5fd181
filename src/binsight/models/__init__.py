"""Counting models: a torchvision backbone with a head that turns features into a count distribution."""

# Before anything in this package imports torchvision: see torchvision_compat's docstring.
from binsight.models import torchvision_compat  # noqa: F401
