"""Side-by-side benchmark: lora-merge against PEFT and a plain copy of the same checkpoint.

    .venv/bin/python -m bench.bench                      # ~4.5 GB Llama-shaped bf16, local disk
    .venv/bin/python -m bench.bench --size-gb 1 --rounds 3
    .venv/bin/python -m bench.bench --storage s3         # S3→S3 on a local SeaweedFS, vs boto3 copy
    .venv/bin/python -m bench.bench --storage s3 --targets q_proj,v_proj   # ... an adapter on q and v only
    .venv/bin/python -m bench.bench --moe 64 --hidden 2048   # MoE experts stored one by one (target_parameters)
    .venv/bin/python -m bench.bench --quantized fp8          # the same checkpoint also as FP8 block-scaled
    .venv/bin/python -m bench.bench --quantized nvfp4 --scales fresh   # ... or compressed-tensors NVFP4
    .venv/bin/python -m bench.bench --batch 3                # one batch of 3 outputs vs 3 merges one after another
    .venv/bin/python -m bench.bench --demo --rounds 5        # `make demo`'s 40 MB merge, S3 to S3, start to exit

Rounds alternate the methods so that a noisy machine hurts them alike. Each run ends with
`sync`, so every method pays for getting its bytes to disk. Reported: median wall time, peak
memory (PSS) of the whole process tree, throughput in GB/s of checkpoint bytes, and ratios; where
lora-merge's time went; and a line per target of the run's kind (bench/targets.py): met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile

from bench.checkpoint import QUANTIZED, adapter_on, build, build_moe, more_adapters, quantize
from bench.proctree import Measured, measure
from bench.targets import LOCAL, MERGE, verdicts

EXECUTOR_METHODS = {MERGE: ["--executor", "ray"], LOCAL: ["--executor", "local"]}
HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(sys.executable)

PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out, device = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size="1GB")
"""

BOTO3_COPY_SCRIPT = """
import os, sys, tempfile, boto3
from botocore.config import Config
src, dst = sys.argv[1:3]
client = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
def split(uri):
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")
(sb, sp), (db, dp) = split(src), split(dst)
keys = [o["Key"] for o in client.list_objects_v2(Bucket=sb, Prefix=sp + "/")["Contents"]]
with tempfile.TemporaryDirectory() as tmp:
    for key in keys:
        local = os.path.join(tmp, os.path.basename(key))
        client.download_file(sb, key, local)
        client.upload_file(local, db, dp + "/" + os.path.basename(key))
        os.unlink(local)
"""


def _sh(command: list[str]) -> list[str]:
    return ["sh", "-c", " ".join(f"'{c}'" for c in command) + " && sync"]


def _chain(commands: list[list[str]]) -> list[str]:
    return ["sh", "-c", " && ".join(" ".join(f"'{c}'" for c in command) for command in commands) + " && sync"]


def batch_methods(args, base: str, adapter: str, out: str) -> dict[str, list[str]]:
    """N adapters into N models: N merges one after another (N reads of the base), and one batch."""
    adapters = more_adapters(adapter, args.batch)
    merge = os.path.join(VENV_BIN, "lora-merge")
    outs = [os.path.join(out, f"model-{number}") for number in range(1, args.batch + 1)]
    common = ["--base", base, "--device", args.device]
    one_by_one = [[merge, "merge", *common, "--adapter", a, "--output", o] for a, o in zip(adapters, outs)]
    groups = [arg for a, o in zip(adapters, outs) for arg in ("--output", o, "--adapter", a)]
    return {f"{args.batch} merges, one after another": _chain(one_by_one),
            f"1 batch of {args.batch} outputs": _chain([[merge, "batch", *common, *groups]])}


def base_bytes_read(out: str) -> int:
    """What the runs' tasks fetched from the base, from the manifests of the outputs under `out`: a
    shard a task read for several outputs is recorded in each of them, once per output."""
    total = 0.0
    for name in sorted(os.listdir(out)):
        manifest = os.path.join(out, name, "merge_manifest.json")
        if os.path.exists(manifest):
            shards = json.load(open(manifest))["output"]["shards"]
            total += sum(s["base_bytes_read"] / s.get("outputs", 1) for s in shards)
    return round(total)


def methods(args, base: str, adapter: str, out: str, quantized: str | None = None) -> dict[str, list[str]]:
    if args.batch:
        return batch_methods(args, base, adapter, out)
    def lora_merge(source: str) -> list[str]:
        return [os.path.join(VENV_BIN, "lora-merge"), "merge", "--base", source, "--adapter", adapter,
                "--output", out, "--device", args.device]

    # lora-merge on a Ray it starts (the default), and/or on threads of its own process (--executor local)
    merges = {name: flags for name, flags in EXECUTOR_METHODS.items() if args.executor in (flags[-1], "both")}
    if args.storage == "s3":
        return {"boto3 copy": [sys.executable, "-c", BOTO3_COPY_SCRIPT, base, out],
                **{name: lora_merge(base) + ["--overwrite", *flags] for name, flags in merges.items()}}
    runs = {"copy (cp -r)": _sh(["cp", "-r", base, out]),
            "PEFT": _sh([sys.executable, "-c", PEFT_SCRIPT, base, adapter, out, args.device]),
            **{name: _sh(lora_merge(base) + flags) for name, flags in merges.items()}}
    if quantized:  # the same model stored FP8: decode, fuse, requantize each touched weight
        runs |= {f"copy (cp -r), {args.quantized}": _sh(["cp", "-r", quantized, out]),
                 f"lora-merge, {args.quantized}": _sh(lora_merge(quantized) + ["--scales", args.scales])}
    return runs


def clear(out: str, storage: str) -> None:
    if storage == "s3":
        from merge_core.io.registry import open_storage
        output = open_storage(out)
        for name in output.list_names():
            output.delete(name)
    else:
        shutil.rmtree(out, ignore_errors=True)


def checkpoint_bytes(base: str) -> int:
    return sum(os.path.getsize(os.path.join(base, n)) for n in os.listdir(base) if n.endswith(".safetensors"))


def table(results: dict[str, list[Measured]], nbytes: dict[str, int], reference: str,
          read: dict[str, list[int]] | None = None) -> str:
    """Medians per method; GB/s of each method's own checkpoint (nbytes by method, all it writes);
    with `read`, the bytes each method's tasks fetched from the base."""
    rows = []
    med = {name: statistics.median(m.seconds for m in runs) for name, runs in results.items()}
    peak = {name: statistics.median(m.peak_bytes for m in runs) for name, runs in results.items()}
    extra = " base GB read |" if read else ""
    rows.append(f"| method | median wall s | peak memory GB | GB/s |{extra} wall vs {reference} | memory vs "
                f"{reference} |")
    rows.append("|---|---:|---:|---:|" + ("---:|" if read else "") + "---:|---:|")
    for name in results:
        shown = f" {statistics.median(read[name]) / 1e9:.2f} |" if read else ""
        rows.append(f"| {name} | {med[name]:.1f} | {peak[name] / 1e9:.2f} | {nbytes[name] / med[name] / 1e9:.2f} |"
                    f"{shown} {med[reference] / med[name]:.2f}x | {peak[reference] / peak[name]:.2f}x |")
    return "\n".join(rows)


def stages(out: str, storage: str, wall: float) -> dict[str, float] | None:
    """Where a lora-merge run's time went, from the manifest it wrote: summed over its shard tasks
    (which run side by side) the waits on reads, the fuse, the writes and the hashing (on threads
    beside them); the driver's plan, Ray's start (a local Ray, or joining a cluster), the shards'
    tasks (from the first submitted to the last done: a worker's first task waits for it to import
    torch) and the final task; the rest of the wall time is the process's own start (Python,
    imports) and Ray's shutdown. Last, what the store copied itself (S3 to S3: untouched bytes)."""
    from merge_core.io.registry import open_storage
    from merge_core.names import MANIFEST_NAME

    output = open_storage(out)
    if not output.exists(MANIFEST_NAME):
        return None
    manifest = json.loads(output.read_bytes(MANIFEST_NAME))
    shards, timings = manifest["output"]["shards"], manifest["timings"]
    driver = sum(timings.get(f"{stage}_seconds", 0) for stage in ("plan", "start", "merge", "finalize"))
    return {"read wait": sum(s["read_wait_seconds"] for s in shards), "fuse": sum(s["fuse_seconds"] for s in shards),
            "write": sum(s["write_seconds"] for s in shards), "hash": sum(s.get("hash_seconds", 0) for s in shards),
            "tasks": sum(s["seconds"] for s in shards), "plan": timings.get("plan_seconds", 0),
            "Ray start": timings.get("start_seconds", 0), "merge (wall)": timings.get("merge_seconds", 0),
            "final task": timings.get("finalize_seconds", 0), "process, shutdown": wall - driver,
            "GB the store copied": sum(s.get("bytes_copied", 0) for s in shards) / 1e9}


def stage_table(breakdowns: dict[str, list[dict[str, float]]]) -> str:
    names = list(next(iter(breakdowns.values()))[0])
    rows = ["| per-stage medians, s | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for method, runs in breakdowns.items():
        rows.append(f"| {method} | " + " | ".join(f"{statistics.median(r[n] for r in runs):.1f}" for n in names)
                    + " |")
    return "\n".join(rows)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=4.5)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--storage", default="local", choices=("local", "s3"))
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lora-merge-bench"))
    parser.add_argument("--json", help="also write the raw measurements here")
    parser.add_argument("--quantized", choices=QUANTIZED, help="also store the checkpoint quantized and measure the "
                        "copy and the merge of that beside the dense: fp8 (block-scaled 128×128, DeepSeek-V3's layout) "
                        "or a compressed-tensors preset (fp8-dynamic, fp8-block, w8a8, w4a16, w4a16-asym, nvfp4, "
                        "mxfp4, mxfp8)")
    parser.add_argument("--scales", choices=("keep", "fresh"), default="keep", help="with --quantized: lora-merge's "
                        "--scales (default keep)")
    parser.add_argument("--targets", metavar="MODULES", help="the adapter on these linear layers only, comma-"
                        "separated (e.g. q_proj,v_proj: most of each shard untouched; default every linear layer)")
    parser.add_argument("--batch", type=int, metavar="N", help="N adapters into N models: N merges one after "
                        "another against one `lora-merge batch` of N outputs (local storage)")
    parser.add_argument("--demo", action="store_true", help="`make demo`'s model (40 MB, 8 MB shards, LoRA r=16 on "
                        "every linear layer) S3 to S3 on a local SeaweedFS, as the demo merges it: lora-merge's start "
                        "to its exit against a boto3 download + upload")
    parser.add_argument("--executor", choices=("ray", "local", "both"), default="both", help="lora-merge on a Ray "
                        "it starts (ray), on threads of its own process (local), or both side by side (default)")
    parser.add_argument("--moe", type=int, metavar="EXPERTS", help="a Qwen3-MoE-shaped checkpoint with this many "
                        "experts per layer, stored one by one, and LoRA on them through target_parameters")
    args = parser.parse_args(argv)
    if args.demo:
        if args.moe or args.quantized or args.batch:
            parser.error("--demo merges the demo's own model")
        args.storage = "s3"
    if args.batch and (args.storage != "local" or args.moe or args.quantized):
        parser.error("--batch compares merges of the dense checkpoint on local storage")
    return args


def _checkpoint(args: argparse.Namespace) -> tuple[str, str, str]:
    """(base, adapter, what they are), built under --workdir (kept between runs)."""
    if args.demo:
        from infra.demo import generate

        root = os.path.join(args.workdir, "demo")
        if not os.path.exists(os.path.join(root, "adapter", "adapter_model.safetensors")):
            shutil.rmtree(root, ignore_errors=True)
            generate(root)
        return os.path.join(root, "base"), os.path.join(root, "adapter"), "make demo's Llama, LoRA r=16 on every linear"
    if args.moe:
        base, adapter = build_moe(os.path.join(args.workdir, f"{args.size_gb:g}gb-h{args.hidden}-moe{args.moe}"),
                                  args.size_gb, hidden=args.hidden, experts=args.moe, shard_gb=args.shard_gb)
        return base, adapter, (f"Qwen3-MoE-shaped, {args.moe} experts per layer stored one by one, LoRA r=16 on "
                               "attention and (target_parameters) on the experts")
    base, adapter = build(os.path.join(args.workdir, f"{args.size_gb:g}gb-h{args.hidden}"), args.size_gb,
                          hidden=args.hidden, intermediate=int(args.hidden * 2.6875), shard_gb=args.shard_gb)
    if args.targets:
        targets = args.targets.split(",")
        return base, adapter_on(adapter, targets), f"LoRA r=16 on {' and '.join(targets)} only"
    return base, adapter, "LoRA r=16 on every linear layer"


def _rounds(args, base: str, adapter: str, out: str, quantized: str | None):
    """Every method, round after round; (measurements, lora-merge's per-stage breakdowns) by method."""
    results: dict[str, list[Measured]] = {}
    breakdowns: dict[str, list[dict[str, float]]] = {}
    read: dict[str, list[int]] = {}
    for round_number in range(args.rounds):
        for name, command in methods(args, base, adapter, out, quantized).items():
            clear(out, args.storage)
            measured = measure(command)
            if measured.returncode != 0:
                print(measured.output[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} failed with exit {measured.returncode}")
            results.setdefault(name, []).append(measured)
            if args.batch:
                read.setdefault(name, []).append(base_bytes_read(out))
            breakdown = stages(out, args.storage, measured.seconds) if name.startswith("lora-merge") else None
            if breakdown:
                breakdowns.setdefault(name, []).append(breakdown)
            print(f"round {round_number + 1}: {name}: {measured.seconds:.1f} s, "
                  f"peak {measured.peak_bytes / 1e9:.2f} GB", file=sys.stderr)
    clear(out, args.storage)
    return results, breakdowns, read


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    base, adapter, described = _checkpoint(args)
    quantized = (quantize(base, os.path.join(os.path.dirname(base), f"base-{args.quantized}"), args.quantized)
                 if args.quantized else None)
    nbytes = checkpoint_bytes(base)
    server = None
    out = os.path.join(args.workdir, "out")
    if args.storage == "s3":
        from lora_merge import s3_server
        from tests.conftest import BUCKET, upload_dir
        server = s3_server.start(os.path.join(args.workdir, "s3"))
        os.environ.update(server.env())
        server.create_bucket(BUCKET)
        base, adapter = upload_dir(server, base, "bench/base"), upload_dir(server, adapter, "bench/adapter")
        out = f"s3://{BUCKET}/bench/out"
    try:
        results, breakdowns, read = _rounds(args, base, adapter, out, quantized)
    finally:
        if server:
            s3_server.stop(server)
    shape = "8 MB shards" if args.demo else f"hidden {args.hidden}, {args.shard_gb:g} GB shards"
    print(f"checkpoint: {nbytes / 1e9:.2f} GB bf16, {shape}, "
          f"{described}{f'; {args.batch} adapters like it into {args.batch} models' if args.batch else ''}; "
          f"storage {args.storage}; device {args.device}; "
          f"{args.rounds} rounds; machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    sizes = {name: checkpoint_bytes(quantized) if args.quantized and name.endswith(args.quantized) else
             nbytes * (args.batch or 1) for name in results}
    print(table(results, sizes, list(results)[0] if args.batch else next(n for n in results if n.startswith(MERGE)),
                read or None))
    if breakdowns:
        print(stage_table(breakdowns))
    for line in verdicts(args, {name: statistics.median(m.seconds for m in runs) for name, runs in results.items()},
                         {name: statistics.median(m.peak_bytes for m in runs) for name, runs in results.items()}):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: [vars(m) | {"output": ""} for m in v] for k, v in results.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
