"""Classifier models by name: ``models.get("convnet", channels=1, num_classes=10, image_size=28)``.

Every model has ``forward(x) -> logits [N, num_classes]``, ``embed(x) -> features [N, feature_dim]`` and a
``feature_dim`` attribute.
"""

# The model modules register themselves on import.
from dpdistill.models.convnet import ConvNet
from dpdistill.models.lenet import LeNet
from dpdistill.models.mlp import MLP
from dpdistill.models.registry import get, names, options, register
from dpdistill.models.resnet import ResNet18

__all__ = ["MLP", "ConvNet", "LeNet", "ResNet18", "get", "names", "options", "register"]
