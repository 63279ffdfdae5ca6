"""Recipe table (model size -> mesh) for TPU v5e and H100 hosts, from `per_device_memory`.

Prints a Markdown table: per-device bytes of params, grads and AdamW state under the
(data, fsdp, tensor) mesh of each row (exact, from the shardings) plus activations for one
sequence per batch shard, against the device's memory. Nothing is allocated (abstract meshes,
abstract parameters); runs on a CPU in seconds.

    python -m experiments.mesh_recipes [--seq-len 2048] [--attention flash]
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import tyro

from jaxalign import MeshConfig, TransformerConfig, get_config, num_params, per_device_memory
from jaxalign.models.config import RopeScaling
from jaxalign.sharding import abstract_mesh

GIB = 2**30
HBM_GIB = {"TPU v5e": 16.0, "H100": 80.0}  # per chip / GPU (v5e: 16 GB HBM2; H100 SXM: 80 GB)

LLAMA3 = dict(family="llama", vocab_size=128256, max_seq_len=8192, rope_theta=500000.0,
              rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
MODELS = {
    "GPT-2 124M": get_config("gpt2"),
    "Llama-3.2-1B": get_config("llama-3.2-1b"),
    # shapes of meta-llama/Llama-3.1-8B and -70B (config.json)
    "Llama-3.1-8B": TransformerConfig(**LLAMA3, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                      d_ff=14336, tie_embeddings=False),
    "Llama-3.1-70B": TransformerConfig(**LLAMA3, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                       d_ff=28672, tie_embeddings=False),
}
# (model, hardware, devices (hosts × per host), mesh, remat). Tensor parallelism stays inside a
# host (ICI / NVLink): jax.make_mesh puts the last mesh axis on neighbouring devices.
RECIPES = [
    ("GPT-2 124M", "TPU v5e", "1", MeshConfig(1, 1, 1), False),
    ("GPT-2 124M", "H100", "8 (1 host)", MeshConfig(8, 1, 1), False),
    ("Llama-3.2-1B", "TPU v5e", "8 (1 host)", MeshConfig(1, 8, 1), False),
    ("Llama-3.2-1B", "H100", "8 (1 host)", MeshConfig(8, 1, 1), False),
    ("Llama-3.1-8B", "TPU v5e", "32 (8 × 4)", MeshConfig(1, 32, 1), True),
    ("Llama-3.1-8B", "H100", "8 (1 host)", MeshConfig(1, 8, 1), False),
    ("Llama-3.1-70B", "TPU v5e", "256 (64 × 4)", MeshConfig(1, 64, 4), True),
    ("Llama-3.1-70B", "H100", "32 (4 × 8)", MeshConfig(1, 4, 8), True),
    ("Llama-3.1-70B", "H100", "16 (2 × 8)", MeshConfig(1, 2, 8), True),
]


@dataclasses.dataclass
class Args:
    seq_len: int = 2048  # T of each training sequence
    rows_per_shard: int = 1  # sequences per batch shard (global batch = rows × data × fsdp)
    attention: str = "flash"  # "flash" (fused kernel, no [T,T] scores) or "xla" (what the model runs now)


def main(args: Args) -> None:
    print(f"bf16 params/compute, AdamW (moments in bf16), T={args.seq_len}, "
          f"{args.rows_per_shard} sequence(s) per batch shard, attention={args.attention}\n")
    print("| model | params | hardware | devices | mesh (data, fsdp, tensor) | params+grads+AdamW GiB/dev "
          "| remat | activations GiB/dev | total GiB/dev | HBM GiB | fits (< 90%) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, hardware, devices, mesh_config, remat in RECIPES:
        config = MODELS[name].replace(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
        n = int(devices.split()[0])
        mesh = abstract_mesh(mesh_config, n)
        shards = mesh_config.axis_sizes(n)[0] * mesh_config.axis_sizes(n)[1]
        r = per_device_memory(config, mesh, batch=args.rows_per_shard * shards, seq_len=args.seq_len,
                              attention=args.attention, remat="full" if remat else "none")
        state = (r["params"] + r["grads"] + r["optimizer_state"]) / GIB
        total = r["total"] / GIB
        print(f"| {name} | {num_params(config) / 1e9:.2f}B | {hardware} | {devices} "
              f"| {mesh_config.axis_sizes(n)} | {state:.2f} | {'yes' if remat else 'no'} "
              f"| {r['activations'] / GIB:.2f} | {total:.2f} "
              f"| {HBM_GIB[hardware]:.0f} | {'yes' if total < 0.9 * HBM_GIB[hardware] else 'no'} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
