"""The stand-in engine of ``standins.py`` with several adapters (one logit vector each), for the
orchestration tests of runs with ``adapters:``. Real engines are tested in their plugin folders."""

from __future__ import annotations

import os

import torch

from areal_core import hookimpl
from areal_core.adapter_format import peft_key, write_peft_adapter
from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport
from areal_core.lr_schedule import learning_rate, total_optimizer_steps

from .standins import MODULE, VOCAB, StandInEngine


class MultiStandInEngine(StandInEngine):
    def __init__(self, lr=20.0):
        super().__init__(lr=lr)
        self.thetas: dict[str, torch.Tensor] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.actors: dict = {}
        self.steps: dict[str, int] = {}

    def compute_logprobs(self, sequences, *, disable_adapter=False, adapter=None):
        theta = torch.zeros(VOCAB) if disable_adapter else self.thetas[adapter].detach()
        return [self._logprobs(s, theta) for s in sequences]

    def train_step(self, sequences, loss_fn, adapter=None):
        self.calls.append(("train", adapter, len(sequences)))
        optimizer, theta = self.optimizers[adapter], self.thetas[adapter]
        optimizer.zero_grad()
        rate = learning_rate(self.actors[adapter].optimizer, self.steps[adapter], total_optimizer_steps(self.config))
        for group in optimizer.param_groups:
            group["lr"] = rate
        metrics = {}
        if sequences:
            loss, metrics = loss_fn([self._logprobs(s, theta) for s in sequences], list(range(len(sequences))))
            loss.backward()
            optimizer.step()
        self.steps[adapter] += 1
        return {"grad_norm": 0.0, "lr": rate, **metrics}

    def save_checkpoint(self, directory):
        os.makedirs(directory)
        torch.save({"thetas": {k: v.detach() for k, v in self.thetas.items()}, "steps": dict(self.steps),
                    "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}},
                   os.path.join(directory, "state.pt"))

    def load_checkpoint(self, directory):
        state = torch.load(os.path.join(directory, "state.pt"))
        with torch.no_grad():
            for name, theta in state["thetas"].items():
                self.thetas[name].copy_(theta)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.steps = dict(state["steps"])


class MultiStandInPlugin:
    """Hooks for backend "standin-multi" (engine); the server is the one-adapter stand-in's."""

    def __init__(self, engine, server, multi_adapter=True):
        self.engine, self.server, self.multi_adapter = engine, server, multi_adapter

    @hookimpl
    def areal_declare_backends(self):
        support = LoraSupport(status=LoraStatus.READY, multi_adapter=self.multi_adapter)
        return [BackendDeclaration("standin-multi", "engine", lora=support),
                BackendDeclaration("standin-server", "server", lora=support)]

    @hookimpl
    def areal_inject_adapter(self, backend, engine, actor, adapter_name):
        if backend != "standin-multi":
            return None
        engine.thetas[adapter_name] = torch.zeros(VOCAB, requires_grad=True)
        engine.actors[adapter_name] = actor
        engine.steps[adapter_name] = 0
        return engine

    @hookimpl
    def areal_shard_model(self, backend, engine, actor):
        if backend != "standin-multi":
            return None
        engine.optimizers = {name: torch.optim.SGD([theta], lr=engine.actors[name].optimizer.lr)
                             for name, theta in engine.thetas.items()}
        return engine

    @hookimpl
    def areal_export_adapter(self, backend, engine, directory, version, adapter_name):
        if backend != "standin-multi":
            return None
        theta = engine.thetas[adapter_name].detach().reshape(-1, 1)
        tensors = {peft_key(MODULE, "A"): torch.ones(1, 1), peft_key(MODULE, "B"): theta}
        return write_peft_adapter(directory, tensors, rank=1, alpha=1, version=version)

    @hookimpl
    def areal_load_rollout_adapter(self, backend, server, adapter, lora_name):
        if backend != "standin-server":
            return None
        server.load_adapter(adapter, lora_name)
        return lora_name


def first_token_is(token: int):
    def reward(record, completion_ids):
        return 1.0 if completion_ids and completion_ids[0] == token else 0.0
    return reward
