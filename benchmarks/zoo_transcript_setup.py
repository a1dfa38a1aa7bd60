"""Material for the transcript in docs/zoo-transcript.md: the scikit-learn digits as image folders
(``digits/{train,val}/<class>/<i>.png``, RGB, 32 px; every fourth image in val), a timm ResNet-10t
trained on the train folder (saved as a safetensors state dict) and a small Hugging Face ViT trained on them (saved with save_pretrained,
with its image processor's settings). No download: timm's and transformers' models start from
random weights drawn from explicit seeds.

    python benchmarks/zoo_transcript_setup.py WORKDIR [--epochs 6]

Needs timm and transformers (the zoo environment).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def digits_folder(root: Path, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Every digit of scikit-learn's set as ``root/{train,val}/<class>/<i>.png`` (every fourth one in
    val); returns the train images as tensors in [0, 1] at ``size`` px (what the training uses)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    xs, ys = [], []
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        folder = root / ("val" if i % 4 == 3 else "train") / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (np.clip(img / 16.0, 0, 1) * 255).astype(np.uint8)
        im = Image.fromarray(pixels).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        im.save(folder / f"{i:04d}.png")
        if i % 4 != 3:
            xs.append(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            ys.append(int(label))
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def train(model, x, y, *, epochs: int, seed: int, normalize, logits=lambda out: out) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(logits(model(normalize(x[idx]))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((logits(model(normalize(x))).argmax(1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    import timm
    import transformers
    from safetensors.torch import save_file

    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x, y = digits_folder(args.workdir / "digits")
    print(f"wrote the digits to {args.workdir / 'digits'}: train/ ({len(y)} images) and val/ (10 class folders each, "
          "32 px RGB PNG)")

    t0 = time.perf_counter()
    cfg = timm.get_pretrained_cfg("resnet10t").to_dict()
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        resnet = timm.create_model("resnet10t", num_classes=10)
    acc = train(resnet, x, y, epochs=args.epochs, seed=0, normalize=lambda t: (t - mean) / std)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(args.workdir / "resnet10t-digits.safetensors"))
    print(f"timm resnet10t: {args.epochs} epochs, training-set accuracy {acc:.3f} ({time.perf_counter() - t0:.0f} s) -> "
          f"{args.workdir / 'resnet10t-digits.safetensors'}")

    t0 = time.perf_counter()
    config = transformers.ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10,
                                    id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vit = transformers.ViTForImageClassification(config)
    acc = train(vit, x, y, epochs=args.epochs, seed=1, normalize=lambda t: (t - 0.5) / 0.5, logits=lambda o: o.logits)
    folder = args.workdir / "vit-digits"
    vit.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, indent=2))
    print(f"hf ViT (3 blocks, 128 MLP units each): {args.epochs} epochs, training-set accuracy {acc:.3f} "
          f"({time.perf_counter() - t0:.0f} s) -> {folder}")


if __name__ == "__main__":
    main()
