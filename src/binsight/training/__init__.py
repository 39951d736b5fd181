"""Training and evaluation of counting models: plain PyTorch, readable top to bottom."""

# Before anything in this package imports torchvision: see binsight.models.torchvision_compat.
from binsight.models import torchvision_compat  # noqa: F401
