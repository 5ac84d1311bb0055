"""The data case: a real JPEG image folder through the stream and the device pipelines.

Writes Fashion-MNIST (Debian's ``dataset-fashion-mnist``) as an image folder in ImageNet
layout, JPEG at each ``--sizes`` (default 64 and 128 px): ``--images`` train images
(default 20 000) and a tenth as many val images, plus a ``--small`` folder (2 000) for the
memory comparison. Each case is a real ``mutualkd run`` process (the ``independent``
strategy, one peer: timm's tiny ``test_resnet`` by default, so that loading, not the model,
sets the pace; ``--steps`` batches of ``--batch``) whose ``metrics.jsonl`` gives images/s
and the data-wait share, and whose process tree (the training process and its
data-loading workers) is sampled every 100 ms for its peak memory: the sum of PSS over
the tree (each page shared by forked workers counted once, split among them) and the
training process's own RSS.

Cases per size: ``device`` (the whole folder decoded up front, then batched on the
device), ``stream`` with 0, 1 and 2 workers, and ``stream`` with 2 workers on the small
folder: its peak RSS next to the large folder's shows that the stream pipeline's memory
does not grow with the number of images.

    python benchmarks/bench_data.py --md-out data.md --json-out data.json
    python benchmarks/bench_data.py --images 4000 --sizes 64 --steps 20   # a quick look
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    size: int
    images: int
    pipeline: str
    workers: int
    images_per_s: float
    data_wait_share: float
    peak_pss_mib: float  # the whole tree: training process and workers
    peak_main_rss_mib: float  # the training process alone
    startup_s: float  # from the process start to its first step (decoding, for the device pipeline)
    wall_s: float


def write_folder(root: Path, n_train: int, n_val: int, size: int) -> Path:
    """Fashion-MNIST's first ``n_train`` train and ``n_val`` test images as JPEGs under ``root``."""
    from mutualkd.config import DataConfig
    from mutualkd.data import FASHION_MNIST_SYSTEM_DIR, load_dataset
    from mutualkd.data._base import Split
    from mutualkd.data.export import write_image_folder

    if (root / "train").is_dir():
        return root
    if not FASHION_MNIST_SYSTEM_DIR.is_dir():
        sys.exit(f"Fashion-MNIST is not at {FASHION_MNIST_SYSTEM_DIR}: apt-get install dataset-fashion-mnist")
    train, test, _ = load_dataset(DataConfig(dataset="fashion_mnist"))
    reps = -(-n_train // len(train))  # more images than Fashion-MNIST has: its images again, under new names
    take = lambda s, n: Split(s.images.repeat(reps, 1, 1, 1)[:n], s.labels.repeat(reps)[:n])  # noqa: E731
    return write_image_folder(take(train, n_train), take(test, n_val), root, size=size, quality=90)


def recipe(out: Path, root: Path, size: int, pipeline: str, workers: int, steps: int, batch: int,
           model: str) -> dict:
    return {
        "run": {"name": f"{pipeline}-{workers}", "out_dir": str(out), "device": "cpu", "progress": False,
                "log_every": steps, "max_steps": steps, "epochs": 1},
        "data": {"dataset": "image_folder", "root": str(root), "pipeline": pipeline, "image_size": size,
                 "batch_size": batch, "eval_batch_size": 256, "num_workers": workers, "augment": True,
                 "memory_budget_gb": 64.0},
        "peers": [{"model": model}],
        "optimizer": {"name": "sgd", "lr": 0.05},
        "strategy": {"name": "independent"},
    }


def run_case(tmp: Path, root: Path, size: int, images: int, pipeline: str, workers: int, steps: int,
             batch: int, model: str) -> Result:
    import tomli_w

    out = tmp / f"runs-{size}-{images}"
    spec = recipe(out, root, size, pipeline, workers, steps, batch, model)
    path = tmp / f"{size}-{images}-{pipeline}-{workers}.toml"
    shutil.rmtree(out / spec["run"]["name"], ignore_errors=True)  # a case measured again starts afresh
    path.write_text(tomli_w.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mutualkd", "run", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root_proc = psutil.Process(proc.pid)
    peak = main_peak = 0
    while proc.poll() is None:
        try:
            main_peak = max(main_peak, root_proc.memory_info().rss)
            tree = [root_proc, *root_proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    log = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        sys.exit(f"{path}: exit {proc.returncode}\n{log[-3000:]}")
    records = [json.loads(x) for x in (out / spec["run"]["name"] / "metrics.jsonl").read_text().splitlines() if x]
    epoch = next(r for r in records if r["kind"] == "epoch")
    startup = wall - epoch["train_seconds"]
    return Result(size, images, pipeline, workers, epoch["images_per_s"], epoch["data_wait_share"], peak / 2**20,
                  main_peak / 2**20, startup, wall)


def markdown(results: list[Result]) -> str:
    lines = ["| size | images | pipeline | workers | images/s | data wait | peak PSS, all processes (MiB)"
             " | peak RSS, training process (MiB) | start-up (s) |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.size} | {r.images} | {r.pipeline} | {r.workers if r.pipeline == 'stream' else '-'} |"
                     f" {r.images_per_s:.0f} | {100 * r.data_wait_share:.1f}% | {r.peak_pss_mib:.0f} | {r.peak_main_rss_mib:.0f} |"
                     f" {r.startup_s:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,128", help="image sizes, comma-separated")
    ap.add_argument("--images", type=int, default=20_000, help="train images of the large folder")
    ap.add_argument("--small", type=int, default=2_000, help="train images of the small folder (memory comparison)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per case (fewer than an epoch of --small)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--model", default="test_resnet", help="the peer's timm model")
    ap.add_argument("--only", default=None, help="run only these cases, e.g. stream-2 (pipeline-workers), comma-separated")
    ap.add_argument("--workdir", type=Path, default=None, help="where the folders and runs go (default: a temp dir)")
    ap.add_argument("--md-out", type=Path, default=None)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="mkd-bench-data-"))
    tmp.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    for size in (int(s) for s in args.sizes.split(",")):
        # Both folders have the same val split, and a case trains fewer steps than one epoch of
        # the small one: the two runs differ only in the number of train images.
        n_val = args.images // 10
        big = write_folder(tmp / f"fmnist-{size}-{args.images}", args.images, n_val, size)
        small = write_folder(tmp / f"fmnist-{size}-{args.small}-val{n_val}", args.small, n_val, size)
        cases = [(big, args.images, "device", 0), (big, args.images, "stream", 0), (big, args.images, "stream", 1),
                 (big, args.images, "stream", 2), (small, args.small, "stream", 2)]
        if args.only:
            keep = set(args.only.split(","))
            cases = [c for c in cases if f"{c[2]}-{c[3]}" in keep]
        for root, n, pipeline, workers in cases:
            r = run_case(tmp, root, size, n, pipeline, workers, args.steps, args.batch, args.model)
            print(f"{size}px {n} images {pipeline} workers={workers}: {r.images_per_s:.0f} img/s, data wait"
                  f" {100 * r.data_wait_share:.1f}%, peak PSS {r.peak_pss_mib:.0f} MiB (training process RSS"
                  f" {r.peak_main_rss_mib:.0f} MiB), start-up {r.startup_s:.1f} s",
                  flush=True)
            results.append(r)
    text = markdown(results)
    print(text)
    if args.md_out:
        args.md_out.write_text(text)
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
