"""Layer 0, models: build any timm / torchvision / CIFAR-ResNet model from a spec string
(``factory``) and the CIFAR ResNets themselves (``cifar_resnet``)."""
from .cifar_resnet import BasicBlock, CifarResNet, cifar_resnet
from .factory import SOURCES, TIMM_CNN_MODULES, build_model, close_matches, list_cnns, parse_spec
