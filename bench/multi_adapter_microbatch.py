"""Two LoRA adapters on one base: rows of both mixed in one micro-batch, or one adapter per micro-batch.

Method: a Qwen2 shape (random init) with two peft LoRA adapters (rank 8, all-linear), both
trainable. One timed unit is forward + backward of ROWS rows of each adapter (SEQ_LEN tokens
each, loss = sum of the next-token log-probabilities):

- ``mixed``: ONE forward of all 2 x ROWS rows, each row naming its adapter (peft's
  ``adapter_names=``, which runs every LoRA layer once per adapter on that adapter's rows);
- ``separate``: two forwards of ROWS rows, one per adapter (the tuner layers' active adapter set
  directly, as the fsdp2 engine routes a train_step), each with its own backward.

One process, one thread (as a training rank runs), no FSDP: this measures the computation only.
Under FSDP2 a separate micro-batch also costs one more all-gather of the frozen layers and one
more reduce-scatter per step. The two are timed in turns (order swapped every repeat) after
WARMUP untimed rounds; reported: the median of REPEATS per shape, and the median ratio.

    .venv/bin/python bench/multi_adapter_microbatch.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

SHAPES = {
    # the demo's base (areal_core.demo.base_model) and a GRPO step's rows per rank (64 of ~16 tokens)
    "demo": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
                 vocab_size=32, rows=32, seq_len=16),
    "bigger": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408,
                   vocab_size=4096, rows=4, seq_len=128),
}
ADAPTERS = ("a", "b")
WARMUP = 2


def build(shape: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from areal_core.testing.tiny_models import model_config

    config = model_config(arch="qwen2", **{k: v for k, v in shape.items() if k not in ("rows", "seq_len")})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, LoraConfig(**lora), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, LoraConfig(**lora))
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    # Give lora_B non-zero values so every adapter's branch is really computed and differs.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.02)
    model.eval()  # peft accepts adapter_names= only in eval mode; dropout is 0, so no difference
    return model


def route(model, adapter: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module._active_adapter = [adapter]


def loss_of(model, ids, **kwargs):
    logits = model(input_ids=ids, **kwargs).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).sum()


def mixed(model, ids) -> None:
    names = [name for name in ADAPTERS for _ in range(ids[name].shape[0])]
    loss_of(model, torch.cat([ids[n] for n in ADAPTERS]), adapter_names=names).backward()
    model.zero_grad(set_to_none=True)


def separate(model, ids) -> None:
    for name in ADAPTERS:
        route(model, name)
        loss_of(model, ids[name]).backward()
    model.zero_grad(set_to_none=True)


def check_same_gradients(model, ids) -> float:
    """Largest |difference| between the two routes' gradients (they compute the same thing)."""
    grads = []
    for run in (mixed, separate):
        model.zero_grad(set_to_none=True)
        if run is mixed:
            names = [name for name in ADAPTERS for _ in range(ids[name].shape[0])]
            loss_of(model, torch.cat([ids[n] for n in ADAPTERS]), adapter_names=names).backward()
        else:
            for name in ADAPTERS:
                route(model, name)
                loss_of(model, ids[name]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys()
    return max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0])


def bench(shape_name: str, repeats: int) -> dict:
    shape = SHAPES[shape_name]
    model = build(shape)
    generator = torch.Generator().manual_seed(1)
    ids = {name: torch.randint(4, shape["vocab_size"], (shape["rows"], shape["seq_len"]), generator=generator)
           for name in ADAPTERS}
    difference = check_same_gradients(model, ids)
    times = {"mixed": [], "separate": []}
    runs = {"mixed": mixed, "separate": separate}
    for repeat in range(WARMUP + repeats):
        order = ["mixed", "separate"] if repeat % 2 == 0 else ["separate", "mixed"]
        for name in order:
            start = time.perf_counter()
            runs[name](model, ids)
            elapsed = time.perf_counter() - start
            if repeat >= WARMUP:
                times[name].append(elapsed)
    ratios = [m / s for m, s in zip(times["mixed"], times["separate"])]
    return {
        "shape": shape_name, **shape, "repeats": repeats,
        "mixed_s": statistics.median(times["mixed"]), "separate_s": statistics.median(times["separate"]),
        "mixed_over_separate": statistics.median(ratios), "max_grad_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for shape_name in args.shapes.split(","):
        result = bench(shape_name, args.repeats)
        print(json.dumps(result))
        print(f"{shape_name}: mixed {result['mixed_s'] * 1e3:.1f} ms, separate {result['separate_s'] * 1e3:.1f} ms, "
              f"mixed/separate {result['mixed_over_separate']:.3f} (median of {args.repeats})", flush=True)


if __name__ == "__main__":
    main()
