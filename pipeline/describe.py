"""`t2i describe`: a training stage's size and per-GPU memory, from its config, without allocating it.

The model is built on PyTorch's meta device. Memory per GPU is the usual mixed-precision AdamW
account (Rajbhandari et al. 2020, ZeRO): weights and gradients at 2 bytes a parameter in bf16/fp16
(4 in fp32), optimizer state 12 bytes (fp32 master copy, two moments) or 8 in fp32; ZeRO stage 1
shards the optimizer state over the ranks, stage 2 the gradients too, stage 3 the weights too.
Activations are estimated for transformers as in Korthikanti et al. 2022 (34·s·b·h bytes a layer
without recomputation, 2·s·b·h with it); other models report them as unknown.
"""
from __future__ import annotations

import torch

GiB = 2**30


def describe(module, cfg) -> dict:
    """Parameters, memory per GPU in GiB by kind, and, where the stage module defines
    `flops_per_sample(cfg)` and `activation_shape(cfg)` (tokens, width, depth), FLOPs and activations."""
    with torch.device("meta"):
        model = module.build_model(cfg)
    params = sum(parameter.numel() for parameter in model.parameters())
    engine, launch = cfg.engine, cfg.launch
    world = launch.nnodes * launch.nproc_per_node
    half = engine.precision in ("bf16", "fp16")
    weights, grads, optimizer = params * (2 if half else 4), params * (2 if half else 4), params * (12 if half else 8)
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
        report["activations_gib"] = per_layer * depth / GiB
    report["total_gib"] = sum(value for key, value in report.items() if key.endswith("_gib"))
    return report


def format_report(name: str, report: dict) -> str:
    lines = [f"stage {name}: {report['parameters'] / 1e6:,.1f}M parameters"]
    if "flops_per_sample" in report:
        lines.append(f"  training FLOPs per sample   {report['flops_per_sample']:.3e}")
    lines.append(f"  memory per GPU (ZeRO {report['zero_stage']}, {report['precision']}, {report['world_size']} ranks):")
    for key in ("weights", "gradients", "optimizer", "activations"):
        if f"{key}_gib" in report:
            lines.append(f"    {key:<12}{report[f'{key}_gib']:10.2f} GiB")
    if "activations_gib" not in report:
        lines.append("    activations      unknown for this model")
    lines.append(f"    {'total':<12}{report['total_gib']:10.2f} GiB")
    return "\n".join(lines)
