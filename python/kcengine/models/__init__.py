"""Models: CIFAR ResNets, torchvision models by name, and checkpoint loading of any format."""
from .checkpoints import (MissingWeightsError, extract_state_dict, hub_cache_path, load_state_dict_into,
                          read_checkpoint, strip_prefixes)
from .cifar_resnet import CIFAR_DEPTHS, BasicBlock, CifarResNet, OptionAShortcut, cifar_resnet
from .zoo import (CIFAR_CHECKPOINT_URLS, CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, LoadedModel,
                  is_cifar_model, list_models, load_model)

__all__ = [
    "CifarResNet", "BasicBlock", "OptionAShortcut", "CIFAR_DEPTHS", "cifar_resnet",
    "MissingWeightsError", "extract_state_dict", "strip_prefixes", "load_state_dict_into", "read_checkpoint",
    "hub_cache_path", "LoadedModel", "load_model", "list_models", "is_cifar_model", "CIFAR_CHECKPOINT_URLS",
    "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD",
]
