"""`make demo`: a real merge end to end on the embedded defaults.

Starts the local S3 server, generates a small Llama-shaped model (several shards) and a PEFT LoRA
adapter, uploads both, merges S3→S3 on a local Ray cluster, verifies the result, draws what the
merge changed, takes the adapter out again (unmerge) to show how much of the base comes back,
loads the merged model with transformers to show it predicts as base + adapter do, and stops the
server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from lora_merge import s3_server

BUCKET = "demo"
DEMO_MODEL = dict(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)


def generate(root: str) -> tuple[str, str]:
    """A random-weight Llama in bf16, saved in 8 MB shards, and a rank-16 LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**DEMO_MODEL)
    base, adapter = os.path.join(root, "base"), os.path.join(root, "adapter")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base, max_shard_size="8MB")
    lora = LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(LlamaForCausalLM(config), lora)
    with torch.no_grad():  # stands in for training (LoRA's B starts at zero): later layers learn more
        for name, param in model.named_parameters():
            if "lora_B" in name:
                layer = int(name.split(".layers.")[1].split(".")[0])
                param.normal_(std=0.01 * (1 + layer) * (0.5 if "mlp" in name else 1.0))
    model.save_pretrained(adapter)
    return base, adapter


def upload(server: s3_server.S3Server, local: str, prefix: str) -> str:
    client = server.client()
    for name in sorted(os.listdir(local)):
        client.upload_file(os.path.join(local, name), BUCKET, f"{prefix}/{name}")
    return f"s3://{BUCKET}/{prefix}"


def download(server: s3_server.S3Server, prefix: str, local: str) -> str:
    client = server.client()
    os.makedirs(local, exist_ok=True)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
        for obj in page.get("Contents", []):
            client.download_file(BUCKET, obj["Key"], os.path.join(local, os.path.basename(obj["Key"])))
    return local


def show_predictions(base: str, adapter: str, merged: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    tokens = torch.randint(0, DEMO_MODEL["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1))
    merged_model = LlamaForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).float().eval()
    unmerged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                         adapter).float().eval()
    plain = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16).float().eval()
    with torch.no_grad():
        got, expected, before = (m(tokens).logits[0].argmax(-1) for m in (merged_model, unmerged, plain))
    agree = int((got == expected).sum())
    print(f"next-token predictions on 16 positions: merged model {got.tolist()}")
    print(f"  base + adapter (PEFT, unmerged) agree on {agree}/16; the base alone agrees on "
          f"{int((got == before).sum())}/16")


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=".demo", help="scratch space (default %(default)s), removed after")
    parser.add_argument("--picture", default="demo-merge-report.png",
                        help="where the picture of what the merge changed goes (default %(default)s), kept")
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    lora_merge = os.path.join(os.path.dirname(sys.executable), "lora-merge")

    print("starting the local S3 server (SeaweedFS) ...", flush=True)
    server = s3_server.start(os.path.join(workdir, "s3"))
    try:
        os.environ.update(server.env())
        server.create_bucket(BUCKET)
        print("generating a Llama-shaped base and a LoRA adapter ...", flush=True)
        base, adapter = generate(os.path.join(workdir, "generated"))
        base_uri, adapter_uri = upload(server, base, "llama-demo"), upload(server, adapter, "llama-demo-lora")
        merged_uri = f"s3://{BUCKET}/llama-demo-merged"
        report = os.path.join(workdir, "report.json")
        picture = os.path.abspath(args.picture)
        run([lora_merge, "merge", "--base", base_uri, "--adapter", adapter_uri, "--output", merged_uri,
             "--report", report, "--report-png", f"{merged_uri}/merge_report.png"])
        run([lora_merge, "verify", "--base", base_uri, "--adapter", adapter_uri, "--merged", merged_uri])
        run([lora_merge, "report", merged_uri, "--png", picture])
        unmerged_uri = f"s3://{BUCKET}/llama-demo-unmerged"
        run([lora_merge, "unmerge", "--merged", merged_uri, "--adapter", adapter_uri, "--output", unmerged_uri])
        summary = json.load(open(report))
        merged = download(server, "llama-demo-merged", os.path.join(workdir, "merged"))
        manifest = json.load(open(os.path.join(merged, "merge_manifest.json")))
        lora = manifest["adapters"][0]
        print(f"\nmerged {summary['fused_tensors']} LoRA pairs (r={lora['config']['r']}, scale "
              f"{next(iter(lora['scales'].values())):g}) into the {summary['shards']} shards of {base_uri}")
        print(f"{summary['bytes_written'] / 1e6:.1f} MB written in {summary['seconds']:.1f} s "
              f"({summary['gb_per_second']:.2f} GB/s, Ray start-up included); output: {merged_uri}")
        print(f"files there: {', '.join(sorted(os.listdir(merged)))}")
        show_predictions(base, adapter, merged)
        unmerged = download(server, "llama-demo-unmerged", os.path.join(workdir, "unmerged"))
        recovery = json.load(open(os.path.join(unmerged, "merge_manifest.json")))["recovery"]
        print(f"unmerged again: {recovery['tensors_identical']} of {recovery['tensors']} tensors and "
              f"{recovery['elements_identical'] / recovery['elements']:.1%} of elements came back bit for bit; the "
              f"rest within {recovery['max_ulps']} ulp (a bf16 merge cannot be undone exactly; the base's digests "
              "are in the merged model's manifest)")
        print(f"picture of what the merge changed (layers × modules, ‖ΔW‖/‖W‖): {picture}, and beside the "
              f"model as {merged_uri}/merge_report.png")
    finally:
        s3_server.stop(server)
        print("stopped the S3 server", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
