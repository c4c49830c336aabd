"""Model families and the one registry: `create(name, **opts)`, `list_models(pattern)`."""

from edgeres.models import resnet, resnet_cifar, wrn  # noqa: F401  (registers the builders)
from edgeres.models.registry import ModelCfg, create, is_known, list_models, register_model, split_name

__all__ = ["ModelCfg", "create", "is_known", "list_models", "register_model", "split_name"]
