"""Training throughput (images/s) of the LoRA training step on a given pipeline, on this machine.

    python bench/train_throughput.py [--model DIR] [--batch 16] [--resolution 32] [--steps 30]

Without --model it builds the tests' tiny random pipeline. Prints img/s and step time
(median over steps after 5 warm-up steps) and peak RSS.
"""

import argparse
import resource
import statistics
import tempfile
import time

import torch
from omegaconf import OmegaConf
from peft import LoraConfig

from tests.tiny import build_tiny_pipeline
from toolkit.training.module import LoRADiffusion


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=4)
    args = ap.parse_args()
    model = args.model or str(build_tiny_pipeline(tempfile.mkdtemp() + "/tiny"))
    torch.manual_seed(0)
    module = LoRADiffusion(
        pretrained={"name_or_path": model}, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
        lora=LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    opt = module.optimizer_fn(module.denoiser_lora_params)
    batch = {"pixel_values": torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1,
             "captions": ["a large red striped circle in the center on a black background"] * args.batch}
    times = []
    for i in range(args.steps + 5):
        t = time.perf_counter()
        loss = module.diffusion_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 5:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    print(OmegaConf.to_yaml({"model": model, "batch": args.batch, "resolution": args.resolution,
                             "threads": torch.get_num_threads(), "step_s": round(step, 4),
                             "img_per_s": round(args.batch / step, 1),
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


if __name__ == "__main__":
    main()
