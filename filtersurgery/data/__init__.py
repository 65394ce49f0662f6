"""Layer 0, data: datasets as tensors (Fashion-MNIST, CIFAR-100, ImageFolder, the shipped demo),
data parts, the GPU-resident batch loader (``datasets``) and augmentation (``augment``).

``filtersurgery.data`` keeps every public name it had as a module."""
from .datasets import (DATASET_NAMES, DEBIAN_FASHION_MNIST, DEFAULT_IMAGE_SIZE, DEMO_FILE, FASHION_MNIST_CLASSES,
                       FASHION_MNIST_FILES, IMAGE_EXTENSIONS, IN_MEMORY_LIMIT_BYTES, BatchLoader, ImageData, Images,
                       LazyImages, channel_stats, check_classes, decode_image, default_root, demo_path, load_cifar100,
                       load_dataset, load_demo, load_fashion_mnist, load_imagefolder, output_size, read_idx,
                       split_parts)
