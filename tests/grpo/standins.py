"""Small in-process stand-ins of an engine and a rollout server, for orchestration tests only.

The "model" is a trainable logit vector over a small vocabulary (every position has the same
next-token distribution). Its adapter is exported as a real PEFT directory with one module, and
the stand-in server reads it back from disk, so the loop's export -> load -> agreement path runs
on real files. Real engines and servers are tested in their own plugin folders.
"""

from __future__ import annotations

import os
import threading
import time

import torch
from safetensors.torch import load_file

from areal_core import hookimpl
from areal_core.adapter_format import peft_key, write_peft_adapter
from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport
from areal_core.interfaces import Sample
from areal_core.lr_schedule import learning_rate, total_optimizer_steps

VOCAB = 8
MODULE = "model.head"


class StandInEngine:
    name = "standin"
    rank = 0
    world_size = 1

    def __init__(self, lr=20.0, train_delay=0.0):
        """``lr``: the SGD rate; the loop's config must say it (``actor.optimizer.lr``) and sets
        ``config``, whose schedule the stand-in follows as a real engine does."""
        self.theta = None
        self.lr = lr
        self.config = None
        self.step = 0
        self.optimizer = None
        self.calls = []
        self.train_delay = train_delay

    def load_base_model(self):
        self.calls.append("load")

    def _logprobs(self, seq, theta):
        table = torch.log_softmax(theta, dim=-1)
        return table[torch.tensor(seq[1:], dtype=torch.long)]

    def compute_logprobs(self, sequences, *, disable_adapter=False):
        theta = torch.zeros(VOCAB) if disable_adapter else self.theta.detach()
        return [self._logprobs(s, theta) for s in sequences]

    def train_step(self, sequences, loss_fn):
        self.calls.append(("train", len(sequences)))
        time.sleep(self.train_delay)
        self.optimizer.zero_grad()
        rate = self.lr
        if self.config is not None:
            rate = learning_rate(self.config.actor.optimizer, self.step, total_optimizer_steps(self.config))
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        metrics = {}
        if sequences:
            loss, metrics = loss_fn([self._logprobs(s, self.theta) for s in sequences], list(range(len(sequences))))
            loss.backward()
            self.optimizer.step()
        self.step += 1
        return {"grad_norm": 0.0, "lr": rate, **metrics}

    def save_checkpoint(self, directory):
        os.makedirs(directory)
        torch.save({"theta": self.theta.detach(), "optimizer": self.optimizer.state_dict(), "step": self.step},
                   os.path.join(directory, "state.pt"))

    def load_checkpoint(self, directory):
        state = torch.load(os.path.join(directory, "state.pt"))
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]

    def close(self):
        self.calls.append("close")


class StandInServer:
    name = "standin-server"

    def __init__(self, corrupt_from_version=None, generate_delay=0.0, corrupt_versions=None):
        """``corrupt_from_version``: from that version on, every load silently serves the base
        model; ``corrupt_versions``: only the loads of these versions do."""
        self.generate_delay = generate_delay
        self.adapters = {}
        self.seen_names = []
        self.requests = []
        self.unloaded = []
        self.started = self.stopped = False
        self.corrupt_from_version = corrupt_from_version
        self.corrupt_versions = set(corrupt_versions or ())
        self.lock = threading.Lock()
        self.generator = torch.Generator().manual_seed(0)

    def start(self):
        self.started = True

    def load_adapter(self, adapter, lora_name):
        assert lora_name not in self.seen_names, f"{lora_name} loaded twice"
        self.seen_names.append(lora_name)
        tensors = load_file(f"{adapter.path}/adapter_model.safetensors")
        theta = (tensors[peft_key(MODULE, "B")] @ tensors[peft_key(MODULE, "A")])[:, 0]
        if (self.corrupt_from_version is not None and adapter.version >= self.corrupt_from_version) or (
                adapter.version in self.corrupt_versions):
            theta = torch.zeros_like(theta)  # a server silently serving the base model
        self.adapters[lora_name] = theta

    def unload_adapter(self, lora_name):
        del self.adapters[lora_name]
        self.unloaded.append(lora_name)

    def loaded_adapters(self):
        return list(self.adapters)

    def generate(self, prompts, *, lora_name, version, n, sampling):
        self.requests.append((lora_name, version, len(prompts), n))
        time.sleep(self.generate_delay)
        theta = self.adapters[lora_name]
        probs = torch.softmax(theta, -1)
        out = []
        for i, prompt in enumerate(prompts):
            generator = self.generator
            if sampling.seed is not None:
                generator = torch.Generator().manual_seed(sampling.seed + i)
            group = []
            for _ in range(n):
                if sampling.temperature == 0:
                    tokens = [int(torch.argmax(probs))] * sampling.max_new_tokens
                else:
                    tokens = torch.multinomial(probs, sampling.max_new_tokens, replacement=True,
                                               generator=generator).tolist()
                logprobs = torch.log(probs[tokens]).tolist()
                group.append(Sample(tuple(prompt), tuple(tokens), tuple(logprobs), version, "length"))
            out.append(group)
        return out

    def prompt_logprobs(self, token_ids, *, lora_name):
        table = torch.log_softmax(self.adapters[lora_name], -1)
        return table[torch.tensor(token_ids[1:])].tolist()

    def stop(self):
        self.stopped = True


class StandInPlugin:
    """Hook implementations routing to the stand-ins (backends "standin" and "standin-server")."""

    def __init__(self, engine, server):
        self.engine, self.server = engine, server

    @hookimpl
    def areal_declare_backends(self):
        return [BackendDeclaration("standin", "engine", lora=LoraSupport(status=LoraStatus.READY)),
                BackendDeclaration("standin-server", "server", lora=LoraSupport(status=LoraStatus.READY))]

    @hookimpl
    def areal_inject_adapter(self, backend, engine, actor):
        if backend != "standin":
            return None
        engine.theta = torch.zeros(VOCAB, requires_grad=True)
        return engine

    @hookimpl
    def areal_shard_model(self, backend, engine, actor):
        if backend != "standin":
            return None
        engine.optimizer = torch.optim.SGD([engine.theta], lr=engine.lr)
        return engine

    @hookimpl
    def areal_export_adapter(self, backend, engine, directory, version):
        if backend != "standin":
            return None
        tensors = {peft_key(MODULE, "A"): torch.ones(1, 1), peft_key(MODULE, "B"): engine.theta.detach().reshape(-1, 1)}
        return write_peft_adapter(directory, tensors, rank=1, alpha=1, version=version)

    @hookimpl
    def areal_load_rollout_adapter(self, backend, server, adapter, lora_name):
        if backend != "standin-server":
            return None
        server.load_adapter(adapter, lora_name)
        return lora_name


class CountingDataset:
    """Prompts [1, 2]; reward 1 when the first generated token is 5."""

    def train_batch(self, position, size):
        return [{"prompt_ids": [1, 2, position % 3], "index": position + i} for i in range(size)]

    def eval_records(self, limit=0):
        return [{"prompt_ids": [1, 2, i % 3]} for i in range(limit or 100)]  # the probe takes 256 tokens


def first_token_is_five(record, completion_ids):
    return 1.0 if completion_ids and completion_ids[0] == 5 else 0.0
