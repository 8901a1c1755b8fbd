"""`t2i describe`: a training stage's size and per-GPU memory, from its config, without allocating it.

The model is built on PyTorch's meta device. Memory per GPU is the usual mixed-precision AdamW
account (Rajbhandari et al. 2020, ZeRO). DeepSpeed in bf16/fp16 keeps weights and gradients at 2
bytes a parameter and 12 bytes of optimizer state (fp32 master copy, two moments); in fp32, and
with accelerate's autocast at any precision, weights and gradients take 4 bytes and the moments 8.
ZeRO stage 1 shards the optimizer state over the ranks, stage 2 the gradients too, stage 3 the
weights too. Activations are estimated for transformers as in Korthikanti et al. 2022 (34·s·b·h
bytes a layer in 16 bits without recomputation, 2·s·b·h with it; twice that in fp32); other models
report them as unknown. Where a stage counts its logits (`logits_per_sample`), they are added at
10 bytes an element in 16 bits (the head's output, its fp32 copy, the log-softmax kept for the
backward pass), 8 in fp32: with large vocabularies they can outweigh the activations.
"""
from __future__ import annotations

import torch

GiB = 2**30


def describe(module, cfg) -> dict:
    """Parameters, memory per GPU in GiB by kind, and, where the stage module defines
    `flops_per_sample(cfg)`, `activation_shape(cfg)` (tokens, width, depth) and
    `logits_per_sample(cfg)`, FLOPs, activations and logits."""
    with torch.device("meta"):
        model = module.build_model(cfg)
    params = sum(parameter.numel() for parameter in model.parameters())
    engine, launch = cfg.engine, cfg.launch
    world = launch.nnodes * launch.nproc_per_node
    half = engine.precision in ("bf16", "fp16")
    sixteen_bit_weights = half and engine.backend == "deepspeed"
    weights = grads = params * (2 if sixteen_bit_weights else 4)
    optimizer = params * (12 if sixteen_bit_weights else 8)
    if engine.zero_stage >= 1:
        optimizer /= world
    if engine.zero_stage >= 2:
        grads /= world
    if engine.zero_stage >= 3:
        weights /= world
    report = {"parameters": params, "world_size": world, "zero_stage": engine.zero_stage, "precision": engine.precision,
              "weights_gib": weights / GiB, "gradients_gib": grads / GiB, "optimizer_gib": optimizer / GiB}
    if hasattr(module, "flops_per_sample"):
        report["flops_per_sample"] = module.flops_per_sample(cfg)
    if hasattr(module, "activation_shape"):
        tokens, width, depth = module.activation_shape(cfg)
        per_layer = (2 if engine.activation_checkpointing else 34) * tokens * cfg.data.batch_size * width
        report["activations_gib"] = per_layer * depth * (1 if half else 2) / GiB
    if hasattr(module, "logits_per_sample"):
        report["logits_gib"] = module.logits_per_sample(cfg) * cfg.data.batch_size * (10 if half else 8) / GiB
    report["total_gib"] = sum(value for key, value in report.items() if key.endswith("_gib"))
    return report


def format_report(name: str, report: dict) -> str:
    lines = [f"stage {name}: {report['parameters'] / 1e6:,.1f}M parameters"]
    if "flops_per_sample" in report:
        lines.append(f"  training FLOPs per sample   {report['flops_per_sample']:.3e}")
    lines.append(f"  memory per GPU (ZeRO {report['zero_stage']}, {report['precision']}, {report['world_size']} ranks):")
    for key in ("weights", "gradients", "optimizer", "activations", "logits"):
        if f"{key}_gib" in report:
            lines.append(f"    {key:<12}{report[f'{key}_gib']:10.2f} GiB")
    if "activations_gib" not in report:
        lines.append("    activations      unknown for this model")
    lines.append(f"    {'total':<12}{report['total_gib']:10.2f} GiB")
    return "\n".join(lines)
