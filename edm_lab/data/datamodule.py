"""A LightningDataModule that feeds an in-memory ArrayDataset to training as (image, one-hot label)."""
from __future__ import annotations

import lightning
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from edm_lab.data.datasets import ArrayDataset


def one_hot_labels(dataset: ArrayDataset) -> Tensor:
    """(n, num_classes) float32 one-hot rows; (n, 0) when the dataset has no labels."""
    n = len(dataset)
    if dataset.labels is None:
        return torch.zeros(n, 0, dtype=torch.float32)
    labels = dataset.labels.to(torch.int64)
    width = dataset.num_classes if dataset.num_classes > 0 else int(labels.max()) + 1 if n else 0
    if n and (labels.min() < 0 or labels.max() >= width):
        raise ValueError(f"dataset {dataset.name}: labels must lie in [0, {width}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return torch.nn.functional.one_hot(labels, width).to(torch.float32)


class TrainingView(Dataset):
    """Item i < n is (sample i, one-hot label i); with xflip, item n + i is sample i mirrored left-right
    (the reference's `xflip`: the dataset doubled, labels shared)."""

    def __init__(self, dataset: ArrayDataset, xflip: bool = False):
        if xflip and not dataset.is_image:
            raise ValueError(f"xflip needs an image dataset (n, C, H, W); {dataset.name} has samples of shape "
                             f"{dataset.sample_shape}")
        self.samples = dataset.samples
        self.labels = one_hot_labels(dataset)
        self.xflip = xflip

    def __len__(self) -> int:
        return len(self.samples) * (2 if self.xflip else 1)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        raw, flipped = index % len(self.samples), index >= len(self.samples)
        image = self.samples[raw]
        return (image.flip(-1) if flipped else image), self.labels[raw]


class ImageDataModule(lightning.LightningDataModule):
    """Training batches of (images (B, C, H, W) in [-1, 1], labels (B, num_classes) float32 one-hot).

    Shuffling draws from a torch.Generator seeded by `seed`: each train_dataloader() call replays the
    same sequence of epochs. The reference streams an infinite shuffled sequence; epochs are the
    Lightning equivalent. Under DDP, Lightning's `use_distributed_sampler` swaps the shuffling sampler
    for a DistributedSampler (seeded by Lightning's global seed); nothing here prevents that.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, num_workers: int = 0, xflip: bool = False,
                 seed: int = 0, drop_last: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.xflip = xflip
        self.seed = seed
        self.drop_last = drop_last
        self.train_set = TrainingView(dataset, xflip)
        self.save_hyperparameters({"dataset": dataset.fingerprint, "batch_size": batch_size, "xflip": xflip,
                                   "seed": seed, "drop_last": drop_last})

    @property
    def label_dim(self) -> int:
        return self.train_set.labels.shape[1]

    def train_dataloader(self) -> DataLoader:
        if self.drop_last and len(self.train_set) < self.batch_size:
            raise ValueError(f"dataset {self.dataset.name} has {len(self.train_set)} items, fewer than one batch "
                             f"of {self.batch_size} (drop_last=True would yield no batch)")
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          drop_last=self.drop_last)
