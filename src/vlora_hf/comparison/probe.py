"""Linear probes: is what a family asks about still in the tower's features, and (VLoRA) in the generator's
output? A probe far above the model's own score means the information is there and the reader (the generator,
the projector or the LLM) does not use it; a low probe means it was lost before.

Targets are what each image alone decides: the number of shapes (count, small_count), the kind of small shapes
(small_shape), and for relation images the drawn axis with the colour of the first shape along it (the fact
both relation questions need). Probes fit on training-split images and score on eval-split ones.
"""

import torch

from ..data import shapes, shapes_families
from ..data.shapes_dataset import preprocess_bank
from ..training.llava_baseline import TowerView, is_llava


def targets(family: str, n: int, split: str, seed: int = 0) -> tuple[list, list[str]]:
    """-> (PIL images, labels) of `n` images that decide `family`'s answer."""
    images, labels = [], []
    for i in range(n):
        if family == "count":
            s = shapes.draw_sample(2 * i + 1, seed, split)
            images.append(s.image)
            labels.append(str(s.count))
            continue
        s = shapes_families.draw_family("small" if family.startswith("small") else "relation", i, seed, split)
        images.append(s.image)
        if family == "small_count":
            labels.append(str(len(s.shapes)))
        elif family == "small_shape":
            labels.append(s.shapes[0][0])
        else:
            axis = "x" if ("left of" in s.qa[1][0] or "right of" in s.qa[1][0]) else "y"  # the drawn axis
            labels.append(f"{axis}:{s.shapes[0][1]}")
    return images, labels


@torch.no_grad()
def features(model, processor, images) -> dict[str, torch.Tensor]:
    """{"tower": [n, P*Dv]} and, for VLoRA, {"generator": [n, D]}: what the projector / generator reads and
    what the generator writes."""
    model.eval()
    pixels = preprocess_bank(images, processor.image_processor)
    if is_llava(model):
        return {"tower": TowerView(model).get_vision_features(pixels).flatten(1)}
    tower = model.model.get_vision_features(pixels)
    return {"tower": tower.flatten(1), "generator": model.model.generator(tower).flatten(1)}


def linear_probe(train_x, train_y: list[str], test_x, test_y: list[str], steps: int = 150, lr: float = 1e-2,
                 weight_decay: float = 1e-2, seed: int = 0) -> float:
    """Standardised features -> softmax regression (AdamW, full batch); -> held-out accuracy."""
    classes = sorted(set(train_y) | set(test_y))
    ytr = torch.tensor([classes.index(y) for y in train_y])
    yte = torch.tensor([classes.index(y) for y in test_y])
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(seed)
    head = torch.nn.Linear(xtr.shape[1], len(classes))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(head(xtr), ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float((head(xte).argmax(-1) == yte).float().mean())


def probe_model(model, processor, families=("count", "small_count", "small_shape", "relation"),
                n_train: int = 600, n_test: int = 300) -> dict[str, dict[str, float]]:
    """-> {family: {"tower": accuracy, "generator": accuracy (VLoRA only)}}."""
    out = {}
    for family in families:
        tr_images, tr_labels = targets(family, n_train, "train")
        te_images, te_labels = targets(family, n_test, "eval")
        tr, te = features(model, processor, tr_images), features(model, processor, te_images)
        out[family] = {name: linear_probe(tr[name], tr_labels, te[name], te_labels) for name in tr}
    return out


__all__ = ["features", "linear_probe", "probe_model", "targets"]
