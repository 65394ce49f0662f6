"""Layer 0, data; public as ``filtersurgery.data``: datasets as tensors (``datasets``: ``load_dataset``;
``sources``: Fashion-MNIST, CIFAR-100, the embedded demo subset; ``imagefolder``), their one interface
(``images``: ``ImageData``), the split protocol (``splits``: ``split_parts``), the GPU-resident batch loader
(``loader``: ``BatchLoader``) and augmentation (``augment``)."""
from filtersurgery.data.datasets import DATASET_NAMES, load_dataset
from filtersurgery.data.imagefolder import DEFAULT_IMAGE_SIZE, IMAGE_EXTENSIONS, load_imagefolder, output_size
from filtersurgery.data.images import ImageData, Images, LazyImages, channel_stats, check_classes, decode_image
from filtersurgery.data.loader import BatchLoader
from filtersurgery.data.sources import (DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, default_root, demo_path,
                                        load_cifar100, load_demo, load_fashion_mnist, read_idx)
from filtersurgery.data.splits import split_parts

__all__ = ["load_dataset", "DATASET_NAMES", "ImageData", "Images", "LazyImages", "BatchLoader", "split_parts",
           "check_classes", "channel_stats", "decode_image", "load_fashion_mnist", "load_demo", "load_cifar100",
           "load_imagefolder", "output_size", "read_idx", "demo_path", "default_root", "DEBIAN_FASHION_MNIST",
           "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS", "DEFAULT_IMAGE_SIZE"]
