"""A real data set that ships with a package (scikit-learn's 8x8 handwritten digits, offline) and a tiny ViT
classifier for it; shared by the SPP tests and their two-process worker."""

from __future__ import annotations

import torch
import transformers as T

TRAIN = 1400  # the first 1400 digits train and search, the last 397 are held out


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # [1797, 1, 8, 8] in [-1, 1]
    return x, torch.tensor(data.target)


def tiny_vit(seed: int = 0) -> T.ViTForImageClassification:
    torch.manual_seed(seed)
    config = T.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, num_labels=10)
    return T.ViTForImageClassification(config)


class Digits(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int = TRAIN):
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def train(model, x, y, steps: int = 200, lr: float = 5e-3, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, TRAIN, (batch,), generator=g)
        model(pixel_values=x[idx], labels=y[idx]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(pixel_values=x[TRAIN:]).logits.argmax(-1) == y[TRAIN:]).float().mean())
