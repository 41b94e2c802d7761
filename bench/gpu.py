"""ResNet50 training-step throughput at the study's input size on one CUDA GPU.

Measures what a fold's training step costs on the GPU, without the loader: forward + backward +
Adam step on random tensors of the network's input shape (3 channels: image, this lesion's mask, the
study's other lesions; 512 x 256). Variants: fp32; bf16 autocast + channels_last; the same with
torch.compile. Batches: the study's 8 and larger ones to find the best. Prints a table, writes JSON.
Uses only torch/torchvision (no wbs_dist install, no network), so it runs on any CUDA node.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode


ARCHS = {"resnet50": torchvision.models.resnet50, "inception_v3": torchvision.models.inception_v3,
         "vgg16": torchvision.models.vgg16, "densenet169": torchvision.models.densenet169}


def _net(arch: str):
    kwargs = {"aux_logits": False, "init_weights": False} if arch == "inception_v3" else {}
    return ARCHS[arch](weights=None, num_classes=1, **kwargs)


def build(channels_last: bool, compile_: bool, arch: str = "resnet50"):
    model = _net(arch)
    # Same adaptation as wbs_dist.models: 3 input channels are the study's stacked image + masks.
    model = model.cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step_model = torch.compile(model) if compile_ else model
    return model, step_model, opt


def make_step(step_model, opt, bf16: bool):
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = step_model(x).squeeze(1)
            loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def flops_per_sample(h: int, w: int, arch: str = "resnet50") -> float:
    model = _net(arch).cuda()
    x = torch.randn(2, 3, h, w, device="cuda")
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    return fc.get_total_flops() / 2


def bench(variant: str, batch: int, h: int, w: int, seconds: float, arch: str = "resnet50") -> dict:
    bf16 = variant != "fp32"
    model, step_model, opt = build(channels_last=bf16, compile_=variant == "bf16+cl+compile", arch=arch)
    x = torch.randn(batch, 3, h, w, device="cuda")
    if bf16:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device="cuda").float()
    step = make_step(step_model, opt, bf16)
    t0 = time.perf_counter()
    for _ in range(3):                               # warm-up (and compilation)
        step(x, y)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while True:
        step(x, y)
        n += 1
        if n % 10 == 0:
            torch.cuda.synchronize()
            if time.perf_counter() - t0 > seconds:
                break
    dt = time.perf_counter() - t0
    return {"arch": arch, "variant": variant, "batch": batch, "steps": n, "samples_per_s": n * batch / dt,
            "step_ms": 1000 * dt / n, "warmup_s": warm,
            "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batches", default="8,32,64,128")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--variants", default="fp32,bf16+cl,bf16+cl+compile")
    ap.add_argument("--compile-batches", default="8,64", help="compile is slow to warm up: fewer batches")
    ap.add_argument("--json", default="gpu_bench.json")
    ap.add_argument("--archs", default="", help="also compare these architectures (fp32 and bf16+cl at "
                    "batch 8 and the largest of --batches), e.g. inception_v3,vgg16,densenet169")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32; TF32 shown separately would be a 4th variant
    torch.backends.cudnn.allow_tf32 = False
    fps = flops_per_sample(args.height, args.width)
    dev = torch.cuda.get_device_name()
    print(f"# {dev}, torch {torch.__version__}, torchvision {torchvision.__version__}, {platform.node()}")
    print(f"# ResNet50 {args.height}x{args.width}x3, fwd+bwd {fps / 1e9:.1f} GFLOP/sample (FlopCounterMode), Adam step")
    rows = []
    print(f"{'variant':>18} {'batch':>5} {'samples/s':>10} {'step ms':>8} {'TFLOP/s':>8} {'mem GiB':>8} {'warm s':>7}")
    for variant in args.variants.split(","):
        batches = args.compile_batches if "compile" in variant else args.batches
        for b in (int(v) for v in batches.split(",")):
            torch.cuda.reset_peak_memory_stats()
            r = bench(variant, b, args.height, args.width, args.seconds)
            r["tflops"] = r["samples_per_s"] * fps / 1e12
            rows.append(r)
            print(f"{variant:>18} {b:5d} {r['samples_per_s']:10.1f} {r['step_ms']:8.2f} {r['tflops']:8.1f} "
                  f"{r['max_mem_gib']:8.2f} {r['warmup_s']:7.1f}", flush=True)
            torch.cuda.empty_cache()
    for arch in [a for a in args.archs.split(",") if a]:
        afps = flops_per_sample(args.height, args.width, arch)
        for variant in ("fp32", "bf16+cl"):
            for b in (8, max(int(v) for v in args.batches.split(","))):
                torch.cuda.reset_peak_memory_stats()
                r = bench(variant, b, args.height, args.width, args.seconds, arch)
                r["tflops"] = r["samples_per_s"] * afps / 1e12
                rows.append(r)
                print(f"{arch + ' ' + variant:>18} {b:5d} {r['samples_per_s']:10.1f} {r['step_ms']:8.2f} "
                      f"{r['tflops']:8.1f} {r['max_mem_gib']:8.2f} {r['warmup_s']:7.1f}", flush=True)
                torch.cuda.empty_cache()
    rows_r50 = [r for r in rows if r["arch"] == "resnet50"]
    base = next(r for r in rows_r50 if r["variant"] == "fp32" and r["batch"] == 8)
    best = max(rows_r50, key=lambda r: r["samples_per_s"])
    print(f"# best: {best['variant']} batch {best['batch']}: {best['samples_per_s']:.0f} samples/s, "
          f"{best['samples_per_s'] / base['samples_per_s']:.1f}x fp32 batch 8")
    with open(args.json, "w") as fh:
        json.dump({"device": dev, "torch": torch.__version__, "gflop_per_sample": fps / 1e9,
                   "height": args.height, "width": args.width, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
