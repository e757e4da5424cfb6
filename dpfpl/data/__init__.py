"""Datasets and federated partitions (numpy + PIL only; importing this does not import torch)."""

from .base import ArraySplit, Dataset, FileSplit, ImageSplit
from .partition import ClientData, few_shot, partition
from .registry import dataset_names, load_dataset, load_run_dataset

__all__ = [
    "ArraySplit", "ClientData", "Dataset", "FileSplit", "ImageSplit",
    "dataset_names", "few_shot", "load_dataset", "load_run_dataset", "partition",
]
