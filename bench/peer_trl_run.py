"""One TRL GRPO run for bench/peer_trl.py (a process of its own, so that its start-up is timed).

Hugging Face TRL's ``GRPOTrainer`` with a peft ``LoraConfig`` and plain ``model.generate``, one
process, on the work ``areal train`` does, with the settings mapped one to one (bench/peer_trl.py
says how). Prints one JSON object per line on stdout: ``{"event": "started", "at": ...}`` once
the imports are done, ``{"event": "eval", "step": N, "accuracy": ..., "seconds": ...}`` for the
evaluation before the first step and every ``--eval-every`` steps, ``{"event": "step", "step": N,
"started_at": ..., "finished_at": ..., "completion_tokens": [...]}`` for every step (evaluation
excluded; the token counts of the step's completions, as the reward saw them). ``--eval-every 0``
evaluates never, not even before the first step.

``--ignore-eos``: every completion has exactly ``--new-tokens`` tokens. TRL's generate call takes
its own GenerationConfig, built from the tokenizer's eos and ``GRPOConfig.generation_kwargs``, and
TRL masks a completion after its first eos; so eos is suppressed where it is sampled
(``generation_kwargs={"min_new_tokens": --new-tokens}``: transformers' MinNewTokensLength
processor) and each step's completion lengths are printed to prove it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--ignore-eos", action="store_true", help="generate --new-tokens always")
    parser.add_argument("--work", required=True)
    parser.add_argument("--accumulate", type=int, default=1,
                        help="split each batch's training into this many gradient-accumulation steps "
                             "(TRL's micro-batches; one generation and one optimizer step a batch still)")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from areal_core.tasks.arithmetic import make_dataset, reward

    emit(event="started", at=time.time())
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.ignore_eos:
        model.generation_config.eos_token_id = None
        tokenizer_eos = None
    else:
        tokenizer_eos = tokenizer.eos_token_id

    # The demo's train stream in its own order (dataset seed 1, as areal train's default) and its
    # held-out split, as text that the tokenizer turns back into exactly areal's prompt ids.
    task = make_dataset()
    records = task.train_batch(0, args.steps * args.prompts)
    rows = []
    for index, record in enumerate(records):
        text = tokenizer.decode(record["prompt_ids"], skip_special_tokens=False)
        assert tokenizer(text)["input_ids"] == list(record["prompt_ids"]), (text, record["prompt_ids"])
        rows.append({"prompt": text, "index": index})
    held_out = task.eval_records(args.eval_size)
    lengths: list[int] = []  # the completion lengths of the step in progress

    def task_reward(prompts, completions, completion_ids, index, **_) -> list[float]:
        lengths.extend(len(ids) for ids in completion_ids)
        return [float(reward(records[i], ids)) for i, ids in zip(index, completion_ids)]

    def evaluate(policy) -> float:
        was_training = policy.training
        policy.eval()
        width = max(len(r["prompt_ids"]) for r in held_out)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r["prompt_ids"])) + list(r["prompt_ids"])
                            for r in held_out])
        mask = (ids != tokenizer.pad_token_id).long()
        with torch.no_grad():
            out = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer_eos)
        if was_training:
            policy.train()
        completions = out[:, width:].tolist()
        return sum(float(reward(r, c)) for r, c in zip(held_out, completions)) / len(held_out)

    class Clock(TrainerCallback):
        def _eval(self, step, model):
            if not args.eval_every:
                return
            started = time.perf_counter()
            accuracy = evaluate(model)
            emit(event="eval", step=step, accuracy=accuracy, seconds=time.perf_counter() - started)

        def on_train_begin(self, args_, state, control, model=None, **kwargs):
            self._eval(0, model)

        def on_step_begin(self, args_, state, control, **kwargs):
            self.started = time.time()

        def on_step_end(self, args_, state, control, model=None, **kwargs):
            emit(event="step", step=state.global_step, started_at=self.started, finished_at=time.time(),
                 completion_tokens=list(lengths))
            lengths.clear()
            if args.eval_every and (state.global_step % args.eval_every == 0 or state.global_step == args.steps):
                self._eval(state.global_step, model)

    if args.accumulate < 1 or (args.prompts * args.samples) % args.accumulate:
        raise SystemExit(f"--accumulate {args.accumulate} must divide the batch's "
                         f"{args.prompts * args.samples} completions")
    config = GRPOConfig(
        output_dir=args.work,
        # TRL counts completions; a generation is per_device_train_batch_size x steps_per_generation
        per_device_train_batch_size=args.prompts * args.samples // args.accumulate,
        gradient_accumulation_steps=args.accumulate,
        steps_per_generation=args.accumulate,
        num_generations=args.samples,
        num_iterations=1,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        learning_rate=args.lr,
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=args.steps,
        shuffle_dataset=False,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=10_000,
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
        generation_kwargs={"min_new_tokens": args.new_tokens} if args.ignore_eos else None,
    )
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=task_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
