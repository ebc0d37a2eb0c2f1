#!/usr/bin/env python3
"""Image classification throughput: kiln against PyTorch + transformers, on the same machine in
one run (training images/s and inference images/s; target: at least PyTorch's speed).

    cargo build --release --bin kiln
    python3 bench/vision.py                          # ~10-15 min on 2 cores
    python3 bench/vision.py --models digits --digits-steps 200
    python3 bench/vision.py --steps 30 --repeats 3   # scale up

Models (randomly initialised with transformers, seeded, saved with save_pretrained(...,
safe_serialization=True) next to a preprocessor_config.json; both sides load the same files):

  resnet18   ResNetConfig(embedding_size=64, hidden_sizes=[64,128,256,512], depths=[2,2,2,2],
             layer_type="basic"), 224x224 input, K=4 classes (11.2M parameters)
  vit-tiny   ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
             intermediate_size=768, image_size=224, patch_size=16), K=4 classes (5.5M)
  digits     ResNetConfig(embedding_size=16, hidden_sizes=[16,32,64], depths=[1,1,1],
             layer_type="basic"), 32x32 input, 10 classes (0.2M)

preprocessor_config.json: size {height: S, width: S}, ImageNet mean/std, resample 2 (bilinear).

Data (written once per run into a temporary directory, class-folder zips, kiln's layout):

  224 models  synthetic 224x224 RGB PNGs, one folder per class: a class colour, stripes at a
              class angle, a random disc and pixel noise (so the PNGs are ~100 kB, photo-like to
              inflate). (--steps + --warmup-steps) * batch training images (192 by default),
              8 per class for validation (passed as --validation-file, so kiln holds none out).
  digits      scikit-learn's real 8x8 digits through scripts/digits_zip.py (greyscale PNGs):
              the first 150 per class (1,500) cycled to (--digits-steps + --warmup-steps) * batch
              training images (2,432 by default; copies are renamed `-rK`), the next 20 per
              class (--skip 150) for validation. Upscaled to 32x32 by the preprocessing on both
              sides.

Every PNG is 8-bit with filter type 0 on every row (what scripts/digits_zip.py writes too), so
the PyTorch side can decode it with zlib + numpy (Pillow and torchvision are not required).

What runs (each configuration in a fresh child process, --repeats times, interleaved):

  kiln train         `kiln train --set strategy=full --set n_epochs=1 --set batch_size=16
                     --set augmentation=crop_flip --json-progress`, RAYON_NUM_THREADS=--threads.
                     kiln keeps the images encoded in memory; each step's batch is decoded,
                     random-resized-cropped (scale 0.25-1, ratio 3/4-4/3), resized (bilinear,
                     image crate Triangle), flipped (p=0.5) and normalised on worker threads
                     (std::thread, available_parallelism() = 2 here), the next batch while the
                     current one trains. So kiln's figure INCLUDES decoding and augmentation.
  torch train        ResNetForImageClassification / ViTForImageClassification (eager, float32,
                     train mode) fed by a torch DataLoader(num_workers=2, batch 16, shuffled):
                     each worker decodes the PNG (zlib.decompress + numpy), takes the same random
                     resized crop as kiln (same ranges, same 10-try rule with a centre-square
                     fallback), resizes it with F.interpolate(bilinear, antialias=True), flips
                     with p=0.5 and normalises. So the torch figure INCLUDES decoding and
                     augmentation too, overlapped by the workers as a typical user would.
  torch train (pre)  diagnostic (skip with --no-extra): the same loop, but every batch was
                     decoded and augmented before the clock starts: model + optimizer alone.
  kiln lora          (ViT models only) `kiln train --set strategy=lora`, otherwise as kiln train:
                     kiln's defaults, rank 8, alpha 16, dropout 0.1 on query and value, the
                     backbone frozen, adapters at 5e-4 and the head at 1e-3.
  torch lora         (ViT models only) torch train with every backbone weight frozen and query
                     and value wrapped in adapters computed as kiln's (bench/lora_torch.py), the
                     same rates.
  kiln infer         `kiln train --set strategy=head_only`: before its first step kiln puts every
                     image (training + validation) once through the frozen backbone in eval mode,
                     in batches of 32 (the "feature bank"). Timed from its `started` event to its
                     "Feature bank: ..." message: decoding + eval preprocessing (resize, centre
                     crop, normalise, on 2 threads, not overlapped with compute) of all images
                     and the backbone forward passes (pooled features, no head).
  torch infer        the same work in PyTorch: validation images decoded and preprocessed first,
                     then the training images 32 at a time (decode + preprocess on a 2-thread
                     pool, then the forward), then the validation features; backbone only
                     (model.resnet(...).pooler_output, model.vit(...).last_hidden_state[:, 0]),
                     eval mode, torch.inference_mode(). Run cold (the figure compared, as kiln's
                     is cold) and once more warm (recorded in the JSON).

Everything the optimizer does is the same on both sides: AdamW (betas 0.9/0.999, eps 1e-8),
learning rates 1e-4 backbone / 1e-3 head (kiln's defaults for vision `full`), weight decay 0.01
except on parameters kiln's optim::is_no_decay excludes (names ending in "bias" or containing
"layernorm"; BatchNorm weights do decay on both sides), linear schedule with 10% warm-up,
gradient clipping at 1.0, cross-entropy, the loss read back every step, --threads threads
(RAYON_NUM_THREADS for kiln; torch.set_num_threads + OMP/MKL_NUM_THREADS for PyTorch; each
DataLoader worker runs with 1 torch thread), the same batch size and input size.

Timing excludes the first --warmup-steps steps on both sides: train images/s = images of steps
W+1..N / (time at the end of step N - time at the end of step W), all within epoch 1. For kiln
the time of a step is when its JSON `step` event arrives on stderr; for PyTorch it is taken right
after optimizer.step() and loss.item(). Evaluation and export come after step N and are not
counted. Peak RSS is the child's ru_maxrss (for torch train: the main process only, not the
DataLoader workers).

Results: a table on stdout and bench/results/vision-YYYY-MM-DD-HHMMSS.json (--out).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_torch  # noqa: E402
EVAL_BATCH = 32  # kiln's EVAL_BATCH (src/train/image_classify.rs)
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
CLK_TCK = os.sysconf("SC_CLK_TCK")
# scikit-learn's smallest digit class has 174 images: 150 train + 20 validation per class.
DIGITS_TRAIN_PER_CLASS = 150

MODELS = {
    # name: (family, input side, classes, default data)
    "resnet18": ("resnet", 224, 4, "synthetic"),
    "vit-tiny": ("vit", 224, 4, "synthetic"),
    "digits": ("resnet", 32, 10, "digits"),
}


# ---------------------------------------------------------------------------------------------
# Models and data


def make_model(name: str, out: Path, seed: int) -> None:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    family, side, k, _ = MODELS[name]
    labels = [f"class_{i}" for i in range(k)] if name != "digits" else [str(i) for i in range(k)]
    id2label = {i: l for i, l in enumerate(labels)}
    label2id = {l: i for i, l in enumerate(labels)}
    torch.manual_seed(seed)
    if name == "resnet18":
        cfg = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                           layer_type="basic", num_labels=k, id2label=id2label, label2id=label2id)
        model = ResNetForImageClassification(cfg)
    elif name == "digits":
        cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                           layer_type="basic", num_labels=k, id2label=id2label, label2id=label2id)
        model = ResNetForImageClassification(cfg)
    else:
        cfg = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                        image_size=224, patch_size=16, num_labels=k, id2label=id2label, label2id=label2id)
        model = ViTForImageClassification(cfg)
    model.save_pretrained(out, safe_serialization=True)
    pre = {
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": MEAN, "image_std": STD, "resample": 2, "rescale_factor": 1 / 255,
        "size": {"height": side, "width": side}, "image_processor_type": "ViTImageProcessor",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")


def png_bytes(arr, level: int = 6) -> bytes:
    """8-bit greyscale (HxW) or RGB (HxWx3) PNG, filter type 0 on every row."""
    import numpy as np

    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    rows = arr.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, level)) + chunk(b"IEND", b"")


def synthetic_image(rng, cls: int, k: int, side: int):
    """A class colour, stripes at a class angle, a random disc and noise."""
    import numpy as np

    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    hue = cls / k
    base = np.array([0.5 + 0.4 * math.cos(2 * math.pi * (hue + j / 3)) for j in range(3)], np.float32)
    angle = math.pi * cls / k + rng.uniform(-0.2, 0.2)
    period = rng.uniform(12, 28)
    stripes = 0.5 + 0.5 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period + rng.uniform(0, 6.3))
    img = base[None, None, :] * (0.6 + 0.4 * stripes[..., None])
    cx, cy, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(side / 10, side / 4)
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
    img[disc] = np.array([rng.uniform(0, 1) for _ in range(3)], np.float32)
    img = img * 255 + np.asarray(rng.normal(0, 8, size=img.shape), np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_synthetic_zip(path: Path, k: int, per_class: int, side: int, seed: int) -> int:
    import numpy as np

    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for c in range(k):
            for i in range(per_class):
                z.writestr(f"class_{c}/{i:04d}.png", png_bytes(synthetic_image(rng, c, k, side)))
    return k * per_class


def make_digits_zip(path: Path, per_class: int, skip: int, seed: int) -> int:
    script = REPO / "scripts/digits_zip.py"
    if not script.is_file():
        sys.exit(f"{script} not found (it comes with kiln's image classification)")
    cmd = [sys.executable, str(script), str(path), "--digits", "0-9", "--per-class", str(per_class),
           "--skip", str(skip), "--seed", str(seed)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    with zipfile.ZipFile(path) as z:
        return sum(1 for n in z.namelist() if n.endswith(".png"))


def replicate_zip(src: Path, dst: Path, n: int) -> int:
    """dst holds src's images cycled to n entries; copies get a `-rK` suffix. The classes take
    turns (each class's images in zip order), so that fewer entries than src holds still cover
    every class: a short run's validation data has no class its training data lacks."""
    with zipfile.ZipFile(src) as z:
        by_class: dict[str, list[str]] = {}
        for x in z.namelist():
            if x.lower().endswith(".png"):
                by_class.setdefault(x.rstrip("/").split("/")[-2], []).append(x)
        names = [x for turn in itertools.zip_longest(*by_class.values()) for x in turn if x is not None]
        data = [z.read(x) for x in names]
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for i in range(n):
            name = names[i % len(names)]
            if i >= len(names):
                name = f"{name[:-4]}-r{i // len(names)}.png"
            z.writestr(name, data[i % len(names)])
    return n


def read_zip(path: Path) -> tuple[list[bytes], list[str]]:
    """(image bytes, class names) in zip order; the class is the image's parent folder."""
    images, labels = [], []
    with zipfile.ZipFile(path) as z:
        for n in z.namelist():
            if n.lower().endswith(".png"):
                images.append(z.read(n))
                labels.append(n.rstrip("/").split("/")[-2])
    return images, labels


# ---------------------------------------------------------------------------------------------
# PyTorch-side preprocessing (what kiln's src/data/images.rs does, in numpy + torch)


def decode_png(data: bytes):
    """HxWx3 uint8 of an 8-bit greyscale/RGB/RGBA PNG whose rows all use filter type 0."""
    import numpy as np

    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat = 8, []
    w = h = depth = colour = None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or interlace != 0 or colour not in (0, 2, 6):
                raise ValueError("only 8-bit, non-interlaced grey/RGB/RGBA PNGs are supported")
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    ch = {0: 1, 2: 3, 6: 4}[colour]
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * ch)
    if raw[:, 0].any():
        raise ValueError("PNG rows use filters other than 0 (write the data with bench/vision.py)")
    px = raw[:, 1:].reshape(h, w, ch)
    if ch == 1:
        return np.repeat(px, 3, axis=2)
    return px[:, :, :3]


class Pre:
    """kiln's Preprocess for a `size: {height, width}` config: resize to exactly side x side,
    centre crop (a no-op then), rescale, normalise; training: random resized crop + flip."""

    def __init__(self, side: int):
        import torch

        self.side = side
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def _resize(self, chw, h: int, w: int):
        import torch.nn.functional as F

        if chw.shape[1] == h and chw.shape[2] == w:
            return chw.float()
        return F.interpolate(chw[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]

    def _finish(self, chw):
        return (chw / 255.0 - self.mean) / self.std

    def eval(self, data: bytes):
        import torch

        chw = torch.from_numpy(decode_png(data).copy()).permute(2, 0, 1)
        return self._finish(self._resize(chw, self.side, self.side))

    def train(self, data: bytes, rng: random.Random, flip: bool = True):
        import torch

        chw = torch.from_numpy(decode_png(data).copy()).permute(2, 0, 1)
        h, w = chw.shape[1], chw.shape[2]
        area = w * h
        window = None
        for _ in range(10):  # src/data/images.rs Preprocess::train
            target = area * rng.uniform(0.25, 1.0)
            ratio = math.exp(rng.uniform(math.log(0.75), math.log(4 / 3)))
            cw, chh = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 1 <= cw <= w and 1 <= chh <= h:
                window = (rng.randint(0, w - cw), rng.randint(0, h - chh), cw, chh)
                break
        if window is None:
            s = min(w, h)
            window = ((w - s) // 2, (h - s) // 2, s, s)
        x, y, cw, chh = window
        out = self._resize(chw[:, y : y + chh, x : x + cw], self.side, self.side)
        if flip and rng.random() < 0.5:
            out = torch.flip(out, dims=[2])
        return self._finish(out)


class TrainSet:
    """torch Dataset: item i of the epoch's order -> (augmented pixels, class)."""

    def __init__(self, images, targets, side, seed):
        self.images, self.targets, self.side, self.seed = images, targets, side, seed
        self.pre = None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.pre is None:
            self.pre = Pre(self.side)
        rng = random.Random(self.seed * 1_000_003 + i)
        return self.pre.train(self.images[i], rng), self.targets[i]


def _worker_init(_):
    import torch

    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# PyTorch side (child process: --worker torch-train | torch-infer)


def load_torch_model(model_dir: str):
    from transformers import AutoConfig, ResNetForImageClassification, ViTForImageClassification

    cfg = AutoConfig.from_pretrained(model_dir)
    cls = ResNetForImageClassification if cfg.model_type == "resnet" else ViTForImageClassification
    return cls.from_pretrained(model_dir), cfg.model_type


def is_no_decay(name: str) -> bool:  # kiln's optim::is_no_decay
    n = name.lower()
    return n.endswith("bias") or "layernorm" in n or "layer_norm" in n or n.endswith(".gamma") or n.endswith(".beta")


def torch_train_worker(args) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, mtype = load_torch_model(args.model_dir)
    label_id = {l: i for l, i in model.config.label2id.items()}
    images, names = read_zip(Path(args.training_file))
    targets = [label_id[n] for n in names]
    side = args.side
    n = len(images)
    bs = args.batch_size
    steps_per_epoch = math.ceil(n / bs)

    groups = []
    backbone_lr = 1e-4
    if args.strategy == "lora":
        # kiln's defaults: rank 8, alpha 16, dropout 0.1 on query and value; the head trains.
        # (transformers 5 names them q_proj and v_proj, earlier versions query and value)
        lora_torch.add_lora(torch, model.vit, ["query", "value", "q_proj", "v_proj"], 8, 16.0, 0.1)
        backbone_lr = 5e-4
    named = [(nm, p) for nm, p in model.named_parameters() if p.requires_grad]
    for head, lr in ((False, backbone_lr), (True, 1e-3)):
        for decay in (True, False):
            ps = [p for nm, p in named if nm.startswith("classifier") == head and (not is_no_decay(nm)) == decay]
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": 0.01 if decay else 0.0})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    total = steps_per_epoch
    warm = round(total * 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))

    ds = TrainSet(images, targets, side, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if args.variant == "pre":
        # Diagnostic: every batch decoded and augmented before the clock starts.
        order = torch.randperm(n, generator=gen).tolist()
        batches = []
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            batches.append((torch.stack([ds[j][0] for j in idx]), torch.tensor([targets[j] for j in idx])))
        loader = batches
    else:
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, generator=gen,
                                             num_workers=args.loader_workers, worker_init_fn=_worker_init)
    model.train()
    marks: list[tuple[float, float, int]] = []
    examples = 0
    losses = []
    t_start = time.perf_counter()
    for x, y in loader:
        logits = model(pixel_values=x).logits
        loss = F.cross_entropy(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        examples += len(y)
        marks.append((time.perf_counter(), time.process_time(), examples))
    w = args.warmup_steps
    last = len(marks)
    (t_w, c_w, e_w), (t_n, c_n, e_n) = marks[w - 1], marks[last - 1]
    result = {
        "side": "torch", "variant": args.variant, "strategy": args.strategy, "model_type": mtype,
        "torch": torch.__version__,
        "steps": last, "timed_steps": f"{w + 1}..{last}",
        "train_img_per_s": (e_n - e_w) / (t_n - t_w),
        "main_process_cores_used": (c_n - c_w) / (t_n - t_w),
        "first_step_s": marks[0][0] - t_start,
        "step_s": [round(b[0] - a[0], 4) for a, b in zip(marks, marks[1:])],
        "loss_first_last": [losses[0], losses[-1]],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    # Validation accuracy after the epoch: a sanity check only.
    vimages, vnames = read_zip(Path(args.validation_file))
    pre = Pre(side)
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(vimages), EVAL_BATCH):
            x = torch.stack([pre.eval(b) for b in vimages[i : i + EVAL_BATCH]])
            pred = model(pixel_values=x).logits.argmax(-1).tolist()
            correct += sum(int(p == label_id[nm]) for p, nm in zip(pred, vnames[i : i + EVAL_BATCH]))
    result["valid_accuracy"] = correct / len(vimages)
    print(json.dumps(result))


def torch_infer_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model, mtype = load_torch_model(args.model_dir)
    model.eval()
    backbone = model.resnet if mtype == "resnet" else model.vit
    images, _ = read_zip(Path(args.training_file))
    vimages, _ = read_zip(Path(args.validation_file))
    pre = Pre(args.side)
    pool = concurrent.futures.ThreadPoolExecutor(args.threads)

    def features(x):
        out = backbone(pixel_values=x)
        return out.pooler_output.flatten(1) if mtype == "resnet" else out.last_hidden_state[:, 0]

    def one_pass() -> float:
        # As kiln's head_only start: validation pixels first, then the training images 32 at a
        # time (decode + preprocess on `threads` threads, then the forward), then validation.
        t0 = time.perf_counter()
        with torch.inference_mode():
            vpx = torch.stack(list(pool.map(pre.eval, vimages)))
            parts = []
            for i in range(0, len(images), EVAL_BATCH):
                x = torch.stack(list(pool.map(pre.eval, images[i : i + EVAL_BATCH])))
                parts.append(features(x))
            for i in range(0, len(vimages), EVAL_BATCH):
                parts.append(features(vpx[i : i + EVAL_BATCH]))
            torch.cat(parts)
        return time.perf_counter() - t0

    n = len(images) + len(vimages)
    cold = one_pass()
    warm = one_pass()
    print(json.dumps({"side": "torch", "model_type": mtype, "torch": torch.__version__, "infer_images": n,
                      "infer_s": cold, "infer_img_per_s": n / cold, "infer_warm_img_per_s": n / warm}))


# ---------------------------------------------------------------------------------------------
# Child processes


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except OSError:
        return None


def run_child(cmd: list[str], env: dict, cwd: Path, on_stderr_line=None) -> dict:
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    err_lines: list[str] = []
    out_chunks: list[str] = []

    def read_err():
        for line in p.stderr:
            t = time.time()
            err_lines.append(line.rstrip("\n"))
            if on_stderr_line:
                on_stderr_line(t, line, p.pid)

    th = [threading.Thread(target=read_err), threading.Thread(target=lambda: out_chunks.append(p.stdout.read()))]
    for x in th:
        x.start()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    for x in th:
        x.join()
    return {"rc": p.returncode, "stdout": "".join(out_chunks), "stderr": err_lines,
            "wall_s": time.time() - t0, "max_rss_mib": ru.ru_maxrss / 1024.0, "cpu_s": ru.ru_utime + ru.ru_stime}


def fail(what: str, res: dict):
    # kiln prints "Error: ..." and then a backtrace: show the error first.
    errors = [l for l in res["stderr"] if l.startswith("Error")]
    tail = "\n".join(res["stderr"][-30:])
    sys.exit(f"{what} failed (exit {res['rc']}):\n{tail}\n{res['stdout'][-2000:]}\n" + "\n".join(errors))


def run_kiln(args, m: dict, strategy: str, work: Path, rep: int) -> dict:
    out = work / f"kiln-{m['name']}-{strategy}-{rep}"
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(args.threads)
    env.pop("LD_PRELOAD", None)
    env.setdefault("KILN_LOG", "warn")
    cmd = [
        str(args.kiln), "train", "--model", str(m["dir"]),
        "--training-file", str(m["train"]), "--validation-file", str(m["valid"]),
        "--output", str(out), "--seed", str(args.seed), "--json-progress",
        "--set", f"strategy={strategy}", "--set", "n_epochs=1",
        "--set", f"batch_size={args.batch_size}", "--set", f"augmentation={args.augmentation}",
    ]
    steps: dict[int, tuple[float, float | None]] = {}
    events: list[tuple[float, dict]] = []

    def on_line(t, line, pid):
        try:
            ev = json.loads(line)
        except ValueError:
            return
        if ev.get("type") == "step":
            steps[ev["step"]] = (t, cpu_seconds(pid))
        events.append((t, ev))

    res = run_child(cmd, env, work, on_line)
    if res["rc"] != 0:
        fail(f"kiln {strategy} ({m['name']})", res)
    final = json.loads(res["stdout"].strip().splitlines()[-1])
    r = {"side": "kiln", "strategy": strategy, "max_rss_mib": res["max_rss_mib"], "wall_s": res["wall_s"],
         "cpu_s": res["cpu_s"], "metrics": final.get("metrics"),
         "kiln_reported_img_per_s": final.get("train_examples_per_second")}
    t_started = next((t for t, ev in events if ev.get("type") == "started"), None)
    if strategy in ("full", "lora"):
        w, last = args.warmup_steps, max(steps)
        n, bs = m["n_train"], args.batch_size
        imgs = sum(min(bs, n - (s - 1) * bs) for s in range(w + 1, last + 1))
        (t_w, c_w), (t_n, c_n) = steps[w], steps[last]
        r.update(
            steps=last, timed_steps=f"{w + 1}..{last}", train_img_per_s=imgs / (t_n - t_w),
            cores_used=(c_n - c_w) / (t_n - t_w) if c_w is not None and c_n is not None else None,
            first_step_s=steps[1][0] - t_started if t_started else None,
            step_s=[round(steps[s][0] - steps[s - 1][0], 4) for s in range(2, last + 1)],
            loss_first_last=[next(ev["train_loss"] for _, ev in events if ev.get("type") == "step"),
                             [ev["train_loss"] for _, ev in events if ev.get("type") == "step"][-1]],
        )
    else:
        msg = next(((t, ev) for t, ev in events if "Feature bank" in json.dumps(ev)), None)
        if msg is None or t_started is None:
            sys.exit(f"kiln head_only ({m['name']}): no `started` event or no 'Feature bank' message on stderr")
        n_img = m["n_train"] + m["n_valid"]
        infer_s = msg[0] - t_started
        rep_s = re.search(r"in ([0-9.]+) s", json.dumps(msg[1]))
        r.update(infer_images=n_img, infer_s=infer_s, infer_img_per_s=n_img / infer_s,
                 feature_bank_reported_s=float(rep_s.group(1)) if rep_s else None)
    return r


def run_torch(args, m: dict, kind: str, variant: str, work: Path, strategy: str = "full") -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(args.threads)
    env.pop("LD_PRELOAD", None)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--variant", variant,
           "--model-dir", str(m["dir"]), "--side", str(m["side"]),
           "--training-file", str(m["train"]), "--validation-file", str(m["valid"]),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--seed", str(args.seed),
           "--warmup-steps", str(args.warmup_steps), "--loader-workers", str(args.loader_workers),
           "--strategy", strategy]
    res = run_child(cmd, env, work)
    if res["rc"] != 0:
        fail(f"torch {kind} {variant} ({m['name']})", res)
    r = json.loads(res["stdout"].strip().splitlines()[-1])
    r.update(max_rss_mib=res["max_rss_mib"], wall_s=res["wall_s"], cpu_s=res["cpu_s"])
    return r


# ---------------------------------------------------------------------------------------------
# Driver


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def busy_jiffies() -> int:
    """Machine-wide non-idle CPU time (all cores), in clock ticks, from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(vals[:8]) - vals[3] - vals[4]  # minus idle and iowait


def busy_cores(seconds: float) -> float:
    b0, t0 = busy_jiffies(), time.time()
    time.sleep(seconds)
    return (busy_jiffies() - b0) / CLK_TCK / (time.time() - t0)


def wait_idle(args) -> tuple[float, float | None]:
    """Waits (at most --wait-idle seconds) until the machine uses under --idle-below cores over
    3 s (bench/decoder.py's rule); returns the seconds waited and the last figure."""
    if args.wait_idle <= 0:
        return 0.0, None
    start, said = time.time(), -1e9
    while True:
        b = busy_cores(3.0)
        waited = time.time() - start
        if b < args.idle_below or waited >= args.wait_idle:
            if b >= args.idle_below:
                print(f"the machine is still busy ({b:.2f} cores) after {waited:.0f} s: measuring anyway", file=sys.stderr)
            return waited, b
        if waited - said >= 60:
            print(f"waiting for the machine to be idle ({b:.2f} cores busy, {waited:.0f} s so far)", file=sys.stderr)
            said = waited


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "")
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split(":")[1].strip()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "mem": mem, "kernel": platform.release(),
            "python": platform.python_version()}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=1):
    return "-" if x is None else f"{x:,.{nd}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", type=Path, default=REPO / "target/release/kiln", help="kiln binary [target/release/kiln]")
    ap.add_argument("--models", default="resnet18,vit-tiny,digits", help="comma-separated: " + ",".join(MODELS))
    ap.add_argument("--steps", type=int, default=10, help="timed training steps for the 224 models")
    ap.add_argument("--digits-steps", type=int, default=150, help="timed training steps for digits")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps excluded from timing (both sides)")
    ap.add_argument("--valid-per-class", type=int, default=8, help="validation images per class (224 models)")
    ap.add_argument("--digits-valid-per-class", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loader-workers", type=int, default=2, help="torch DataLoader worker processes")
    ap.add_argument("--augmentation", default="crop_flip", choices=["crop_flip", "crop", "none"],
                    help="kiln's augmentation (the torch side always does crop+flip; change both for a fair table)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--only", default="", help="semicolon-separated configurations, e.g. 'torch train;torch infer'")
    ap.add_argument("--no-extra", action="store_true", help="skip the diagnostic 'torch train (pre)'")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="before each run wait up to S seconds until the machine uses under --idle-below cores")
    ap.add_argument("--idle-below", type=float, default=0.3)
    ap.add_argument("--retries", type=int, default=0,
                    help="measure a run again when other processes used more than --max-other-cores during it")
    ap.add_argument("--max-other-cores", type=float, default=0.3)
    ap.add_argument("--keep", type=Path, default=None, help="write models and data here and keep them")
    ap.add_argument("--out", type=Path, default=None, help="results JSON [bench/results/vision-DATE-TIME.json]")
    # Child process arguments.
    ap.add_argument("--worker", choices=["torch-train", "torch-infer"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="loader", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="full", choices=["full", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--side", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--training-file", help=argparse.SUPPRESS)
    ap.add_argument("--validation-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "torch-train":
        return torch_train_worker(args)
    if args.worker == "torch-infer":
        return torch_infer_worker(args)

    models = [s.strip() for s in args.models.split(",") if s.strip()]
    for name in models:
        if name not in MODELS:
            sys.exit(f"unknown model '{name}' (choose from {', '.join(MODELS)})")
    configs = ["kiln train", "torch train", "torch train (pre)", "kiln infer", "torch infer", "kiln lora",
               "torch lora"]
    if args.no_extra:
        configs.remove("torch train (pre)")
    if args.only:
        want = {s.strip() for s in args.only.split(";")}
        unknown = want - set(configs)
        if unknown:
            sys.exit(f"unknown configuration(s) {sorted(unknown)}; choose from {configs}")
        configs = [c for c in configs if c in want]
    if any(c.startswith("kiln") for c in configs):
        if not args.kiln.is_file() or not os.access(args.kiln, os.X_OK):
            sys.exit(f"kiln binary not found at {args.kiln}: build it with `cargo build --release --bin kiln` "
                     "(or pass --kiln PATH; --only 'torch train;torch infer' runs the PyTorch side alone)")
        probe = subprocess.run([str(args.kiln), "train", "--help"], capture_output=True, text=True)
        if probe.returncode != 0:
            sys.exit(f"{args.kiln} train --help failed:\n{probe.stderr[-2000:]}")
    if args.warmup_steps < 1:
        sys.exit("--warmup-steps must be at least 1 (the first step's clock starts at step W's end)")

    started = dt.datetime.now()
    tmp = None
    if args.keep:
        work = args.keep.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kiln-bench-vision-")
        work = Path(tmp.name)
    bs = args.batch_size
    specs = []
    try:
        for name in models:
            family, side, k, data = MODELS[name]
            d = work / name
            mdir = d / "model"
            if not (mdir / "model.safetensors").exists():
                mdir.mkdir(parents=True, exist_ok=True)
                make_model(name, mdir, args.seed)
            steps = (args.digits_steps if name == "digits" else args.steps) + args.warmup_steps
            per_class = math.ceil(steps * bs / k)
            train, valid = d / "train.zip", d / "valid.zip"
            if data == "digits":
                # The first DIGITS_TRAIN_PER_CLASS of each class (shuffled) cycled to the steps
                # wanted; the next --digits-valid-per-class for validation.
                base = d / "digits-base.zip"
                make_digits_zip(base, DIGITS_TRAIN_PER_CLASS, 0, args.seed)
                n_train = replicate_zip(base, train, steps * bs)
                n_valid = make_digits_zip(valid, args.digits_valid_per_class, DIGITS_TRAIN_PER_CLASS, args.seed)
            else:
                n_train = make_synthetic_zip(train, k, per_class, side, args.seed)
                n_valid = make_synthetic_zip(valid, k, args.valid_per_class, side, args.seed + 1)
            from safetensors import safe_open
            with safe_open(str(mdir / "model.safetensors"), "np") as f:
                n_params = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys()
                               if "running_" not in key and "num_batches" not in key)
            specs.append({"name": name, "family": family, "side": side, "classes": k, "dir": mdir,
                          "train": train, "valid": valid, "n_train": n_train, "n_valid": n_valid,
                          "params": n_params, "train_zip_bytes": train.stat().st_size})
            print(f"{name}: {n_params / 1e6:.2f}M parameters, {n_train} training + {n_valid} validation images "
                  f"({train.stat().st_size / n_train / 1024:.1f} KiB per PNG), {side}x{side}", file=sys.stderr)

        runs: dict[str, dict[str, list[dict]]] = {
            m["name"]: {c: [] for c in configs if "lora" not in c or m["family"] == "vit"} for m in specs}
        disturbed: list[dict] = []
        def run_config(m: dict, c: str, rep: int) -> dict:
            if c == "kiln train":
                return run_kiln(args, m, "full", work, rep)
            if c == "kiln infer":
                return run_kiln(args, m, "head_only", work, rep)
            if c == "torch train":
                return run_torch(args, m, "torch-train", "loader", work)
            if c == "torch train (pre)":
                return run_torch(args, m, "torch-train", "pre", work)
            if c == "kiln lora":
                return run_kiln(args, m, "lora", work, rep)
            if c == "torch lora":
                return run_torch(args, m, "torch-train", "loader", work, strategy="lora")
            return run_torch(args, m, "torch-infer", "eval", work)

        def measure(m: dict, c: str, rep: int) -> dict:
            """Waits for an idle machine (--wait-idle), runs the configuration and records the
            cores other processes used meanwhile (machine-wide busy time from /proc/stat minus
            the child's own CPU); repeats a disturbed run up to --retries times."""
            for attempt in range(args.retries + 1):
                waited, idle_before = wait_idle(args)
                la0, b0, t0 = loadavg(), busy_jiffies(), time.time()
                r = run_config(m, c, rep)
                wall = time.time() - t0
                busy = (busy_jiffies() - b0) / CLK_TCK / wall
                other = max(0.0, busy - r["cpu_s"] / wall)
                r.update(loadavg_before=la0, loadavg_after=loadavg(), machine_busy_cores=round(busy, 3),
                         other_cores=round(other, 3), waited_for_idle_s=round(waited, 1),
                         busy_cores_before=idle_before, attempt=attempt + 1)
                if other <= args.max_other_cores or attempt == args.retries:
                    return r
                print(f"{m['name']} {c}: other processes used {other:.2f} cores during the run: measuring again",
                      file=sys.stderr)
                disturbed.append(dict(r, model=m["name"], config=c))
            raise AssertionError("unreachable")

        for rep in range(args.repeats):
            for m in specs:
                for c in configs:
                    if "lora" in c and m["family"] != "vit":
                        continue  # LoRA adapts attention projections: ViT only
                    r = measure(m, c, rep)
                    if r.get("step_s"):
                        # step_s[j] is step j+2's duration: the timed steps are step_s[W-1:].
                        timed = r["step_s"][args.warmup_steps - 1 :]
                        r["median_step_s"] = statistics.median(timed)
                        r["median_step_img_per_s"] = bs / r["median_step_s"]
                    runs[m["name"]][c].append(r)
                    fig = (f"train {fmt(r['train_img_per_s'], 2)} img/s" if "train_img_per_s" in r
                           else f"inference {fmt(r['infer_img_per_s'], 2)} img/s")
                    print(f"[{rep + 1}/{args.repeats}] {m['name']:<9} {c:<18} {fig}, peak RSS "
                          f"{fmt(r['max_rss_mib'], 0)} MiB, wall {r['wall_s']:.0f} s, load {r['loadavg_before'][0]:.2f}, "
                          f"other processes {r['other_cores']:.2f} cores", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    summary: dict[str, dict] = {}
    for m in specs:
        s = {}
        for c, rs in runs[m["name"]].items():
            key = "infer_img_per_s" if "infer" in c else "train_img_per_s"
            s[c] = {
                "img_per_s": median([r.get(key) for r in rs]),
                "img_per_s_runs": [round(r[key], 3) for r in rs if r.get(key)],
                "median_step_img_per_s": median([r.get("median_step_img_per_s") for r in rs]),
                "max_rss_mib": median([r["max_rss_mib"] for r in rs]),
                "valid_accuracy": median([(r.get("metrics") or {}).get("valid_accuracy", r.get("valid_accuracy"))
                                          for r in rs]),
                "loadavg_1m": [r["loadavg_before"][0] for r in rs],
                "other_cores": [r["other_cores"] for r in rs],
            }
        summary[m["name"]] = s

    def get(name, c):
        return summary[name].get(c, {}).get("img_per_s")

    ratios = {}
    for m in specs:
        for what, k_c, t_c in (("train", "kiln train", "torch train"), ("train vs torch (pre)", "kiln train", "torch train (pre)"),
                               ("inference", "kiln infer", "torch infer"), ("lora train", "kiln lora", "torch lora")):
            a, b = get(m["name"], k_c), get(m["name"], t_c)
            if a and b:
                ratios[f"{m['name']} {what}: kiln / torch"] = a / b

    print()
    print(f"batch {bs}, {args.threads} threads, kiln augmentation {args.augmentation}, steps 1..{args.warmup_steps} "
          f"excluded, median of {args.repeats}; images/s")
    print()
    print("| model | kiln train | torch train | ratio | torch train (pre-decoded) | kiln infer | torch infer | ratio | "
          "peak RSS MiB kiln / torch (train) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for m in specs:
        n = m["name"]
        kt, tt, tp, ki, ti = (get(n, c) for c in ("kiln train", "torch train", "torch train (pre)", "kiln infer", "torch infer"))
        rk = summary[n].get("kiln train", {}).get("max_rss_mib")
        rt = summary[n].get("torch train", {}).get("max_rss_mib")
        print(f"| {n} | {fmt(kt, 2)} | {fmt(tt, 2)} | {fmt(kt / tt if kt and tt else None, 2)} | {fmt(tp, 2)} | "
              f"{fmt(ki, 2)} | {fmt(ti, 2)} | {fmt(ki / ti if ki and ti else None, 2)} | {fmt(rk, 0)} / {fmt(rt, 0)} |")
    lora = [m for m in specs if summary[m["name"]].get("kiln lora") or summary[m["name"]].get("torch lora")]
    if lora:
        print()
        print("LoRA training (rank 8 on query and value), images/s:")
        print()
        print("| model | kiln lora | torch lora | ratio | peak RSS MiB kiln / torch |")
        print("|---|---:|---:|---:|---|")
        for m in lora:
            n = m["name"]
            kl, tl = get(n, "kiln lora"), get(n, "torch lora")
            rk = summary[n].get("kiln lora", {}).get("max_rss_mib")
            rt = summary[n].get("torch lora", {}).get("max_rss_mib")
            print(f"| {n} | {fmt(kl, 2)} | {fmt(tl, 2)} | {fmt(kl / tl if kl and tl else None, 2)} | "
                  f"{fmt(rk, 0)} / {fmt(rt, 0)} |")
    print()
    print("Training, images/s from the median step time (batch / median step; robust to stalls from other work):")
    print()
    print("| model | kiln train | torch train | ratio | torch train (pre-decoded) |")
    print("|---|---:|---:|---:|---:|")
    for m in specs:
        n = m["name"]
        kt, tt, tp = (summary[n].get(c, {}).get("median_step_img_per_s") for c in ("kiln train", "torch train", "torch train (pre)"))
        print(f"| {n} | {fmt(kt, 2)} | {fmt(tt, 2)} | {fmt(kt / tt if kt and tt else None, 2)} | {fmt(tp, 2)} |")
        if kt and tt:
            ratios[f"{n} train (median step): kiln / torch"] = kt / tt
        kl, tl = (summary[n].get(c, {}).get("median_step_img_per_s") for c in ("kiln lora", "torch lora"))
        if kl and tl:
            ratios[f"{n} lora train (median step): kiln / torch"] = kl / tl
    print()
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}")

    out = args.out or REPO / "bench/results" / f"vision-{started:%Y-%m-%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    kiln_version = None
    if args.kiln.is_file():
        kiln_version = subprocess.run([str(args.kiln), "--version"], capture_output=True, text=True).stdout.strip() or None
    doc = {
        "benchmark": "vision",
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": machine(),
        "git_head": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "kiln_binary": str(args.kiln), "kiln_version": kiln_version,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("worker", "variant", "model_dir", "side", "training_file", "validation_file")},
        "models": [{k: (str(v) if isinstance(v, Path) else v) for k, v in m.items()
                    if k not in ("dir", "train", "valid")} for m in specs],
        "loadavg_end": loadavg(),
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
        "disturbed_runs": disturbed,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
