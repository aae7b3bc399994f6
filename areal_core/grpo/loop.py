"""Synchronous GRPO with LoRA over the core's interfaces.

Per step: rollouts from the live version (every request names it) -> rewards -> group-normalised
advantages -> PPO-clip loss over the adapter (behaviour log-probabilities from the server, ratio
against the trainer's, optional KL to the base with the adapter disabled) -> optimizer step ->
export -> load as the next version -> agreement check. Every rank runs this function; rank 0 alone
talks to the servers and broadcasts the batch.

Faults: rank 0's work with the servers goes through ``Comm.leader_result``, so when it fails every
rank stops with its message instead of waiting. A call that fails because the rollout server died
or went away is retried after ``ServerRecovery`` brought the server back with the newest adapter
live under a new version; the batch being generated is then generated again in full (a batch is
never cut short, so no step trains on part of one). A failed export or checkpoint stops the run
with what failed and what is intact.
"""

from __future__ import annotations

import shutil
import time
from typing import Callable

from areal_core.agreement import check_agreement, probe_sequence
from areal_core.config import RunConfig
from areal_core.errors import AdapterError, ArealError, ServerUnreachableError
from areal_core.grpo.batch import shard_for_rank
from areal_core.grpo.checkpointing import Checkpoints
from areal_core.grpo.comm import Comm, is_peer_failure
from areal_core.grpo.loss import make_grpo_loss
from areal_core.grpo.publisher import AdapterPublisher
from areal_core.grpo.rollout_producer import RolloutProducer
from areal_core.grpo.run_dir import RunDirectory
from areal_core.grpo.server_recovery import ServerLostError, ServerRecovery
from areal_core.interfaces import Engine, SamplingParams
from areal_core.registry import Registry


PROBE_TOKENS = 64
PLOT_EVERY = 5  # steps between redraws of plot.png (also redrawn on evaluation steps and at the end)


class ExportFailed(ArealError):
    """The engine could not write an adapter version (disk full, permissions, ...)."""


class GRPOLoop:
    def __init__(self, config: RunConfig, registry: Registry, engine: Engine, comm: Comm,
                 run_dir: RunDirectory, dataset, reward_fn: Callable,
                 publisher: AdapterPublisher | None = None, progress: bool = True,
                 on_server_restarted: Callable[[], object] | None = None):
        """``on_server_restarted`` is called on rank 0 after a launched server was started again."""
        self.config = config
        self.registry = registry
        self.engine = engine
        self.comm = comm
        self.run_dir = run_dir
        self.dataset = dataset
        self.reward_fn = reward_fn
        self.publisher = publisher
        self.progress = progress and comm.is_leader
        if comm.is_leader and publisher is None:
            raise ValueError("rank 0 needs the rollout publisher")
        probe_len = min(PROBE_TOKENS, config.rollout.max_model_len - 2)
        self.probe = probe_sequence(dataset.eval_records(), probe_len)
        self.version = -1
        self.position = 0
        self.producer: RolloutProducer | None = None
        self.checkpoints = Checkpoints(run_dir.checkpoints, comm)
        self.first_eval: float | None = None
        self.last_eval: float | None = None
        self.recovery: ServerRecovery | None = None
        if comm.is_leader:
            self.recovery = ServerRecovery(
                publisher, managed=not config.rollout.servers, max_restarts=config.rollout.max_restarts,
                startup_timeout=config.rollout.startup_timeout, adapter_dir=run_dir.adapter_dir,
                on_started=on_server_restarted,
                on_event=lambda: run_dir.append_events(publisher.drain_log()))

    # --- the LoRA steps, through the hooks ----------------------------------------------------

    def export_and_publish(self, version: int, step: int) -> dict:
        """Export ``version`` on every rank, load it on the servers (rank 0), check agreement.

        ``step`` is the step whose update this is. The version live afterwards may be newer than
        ``version`` when the server had to be recovered meanwhile; ``self.version`` says which.
        """
        actor = self.config.actor
        start = time.perf_counter()
        try:
            adapter = self.registry.call("areal_export_adapter", actor.backend, engine=self.engine,
                                         directory=str(self.run_dir.adapter_dir(version)), version=version)
        except Exception as exc:
            if is_peer_failure(exc):  # another rank is gone: not an export problem
                raise
            live = f"version {self.version} stays live on the servers" if self.version >= 0 else "nothing was loaded"
            raise ExportFailed(
                f"exporting adapter version {version} failed: {exc}. Nothing of it was handed to a "
                f"server ({live}) and the last checkpoint is untouched; fix the cause (e.g. free "
                f"space under {self.run_dir.adapters}) and continue with resume=true"
            ) from exc
        export_seconds = time.perf_counter() - start
        # The trainer's side of the agreement check first: a collective, before rank 0's server work.
        start = time.perf_counter()
        trainer = self.engine.compute_logprobs([self.probe])[0].tolist()
        trainer_seconds = time.perf_counter() - start
        published = self.comm.leader_result(lambda: self._publish_on_leader(adapter, trainer, step))
        self.version = published["version"]
        self._prune_adapters()
        return {
            "export_seconds": export_seconds,
            "load_seconds": published["load_seconds"],
            "sync_seconds": export_seconds + published["load_seconds"],
            "agreement_seconds": trainer_seconds + published["agreement_seconds"],
            "agreement_max_abs": published["agreement_max_abs"],
            "adapter_bytes": adapter.num_bytes,
        }

    def _publish_on_leader(self, adapter, trainer: list[float], step: int) -> dict:
        start = time.perf_counter()
        try:
            self.publisher.publish(adapter)
            self.version = adapter.version
        except Exception as exc:
            if not self._server_lost(exc):
                if isinstance(exc, AdapterError):
                    live = f"version {self.version} stays live" if self.version >= 0 else "nothing is live"
                    raise AdapterError(f"adapter version {adapter.version} was refused before reaching "
                                       f"the server ({live}): {exc}") from exc
                raise
            # The load is what the recovery does: the new adapter under the next version's name.
            self._recover(exc, adapter.version, next_step=step + 1)
        load_seconds = time.perf_counter() - start
        self.run_dir.append_events(self.publisher.drain_log())
        start = time.perf_counter()
        server = self._on_server(lambda: self.publisher.prompt_logprobs(self.probe, self.version), step + 1)
        difference = check_agreement(server, trainer, self.config.train.agreement_tolerance,
                                     f"adapter version {self.version}")
        if self.producer is not None:
            self.producer.version_live(self.version, step)
        return {"version": self.version, "load_seconds": load_seconds, "agreement_max_abs": difference,
                "agreement_seconds": time.perf_counter() - start}

    # --- a rollout server that died or went away (rank 0) ---------------------------------------

    def _server_lost(self, error: BaseException) -> bool:
        if self.recovery is None or isinstance(error, ServerLostError):
            return False
        return isinstance(error, ServerUnreachableError) or self.recovery.server_is_down()

    def _on_server(self, call: Callable, next_step: int):
        """``call()``; after a server loss, recover and call again (it reads ``self.version``)."""
        while True:
            try:
                return call()
            except Exception as exc:
                if not self._server_lost(exc):
                    raise
                self._recover(exc, self.version, next_step)

    def _next_version(self) -> int:
        on_disk = [int(p.name[1:]) for p in self.run_dir.adapters.glob("v*") if p.name[1:].isdigit()]
        latest = self.publisher.versions.latest
        return max([self.version, -1 if latest is None else latest, *on_disk]) + 1

    def _recover(self, error: BaseException, source_version: int, next_step: int) -> None:
        """Bring the server back with ``source_version``'s adapter live under a new version; the
        rollouts then start over at ``next_step`` (the batches made before are dropped whole)."""
        producer = self.producer
        if producer is not None:
            producer.stop(timeout=self.config.rollout.request_timeout + 30.0)
        self.version = self.recovery.recover(error, source_version, self._next_version())
        self.run_dir.append_events(self.publisher.drain_log())
        if producer is not None:
            self.producer = self._new_producer(next_step, self.position)
            self.producer.version_live(self.version, next_step - 1)
            self.producer.start()

    def _prune_adapters(self) -> None:
        keep = self.config.train.keep_adapters
        if not keep or not self.comm.is_leader:
            return
        live = set(self.publisher.versions.loaded())
        for path in self.run_dir.adapters.glob("v*"):
            version = int(path.name[1:]) if path.name[1:].isdigit() else None
            if version is not None and version <= self.version - keep and version not in live:
                shutil.rmtree(path, ignore_errors=True)

    # --- rollouts and evaluation (rank 0) ---------------------------------------------------------

    def sampling(self) -> SamplingParams:
        g = self.config.gconfig
        return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                              top_p=g.top_p, top_k=g.top_k)

    def evaluate(self) -> float:
        """Greedy held-out accuracy of the live version (mean reward over the eval split)."""
        records = self.dataset.eval_records(self.config.train.eval_size)
        greedy = SamplingParams(max_new_tokens=self.config.gconfig.max_new_tokens, temperature=0.0)
        groups = self.publisher.generate([r["prompt_ids"] for r in records], self.version, 1, greedy)
        return sum(self.reward_fn(r, g[0].output_ids) for r, g in zip(records, groups)) / len(records)

    # --- one step ---------------------------------------------------------------------------------

    def train_on(self, items) -> dict:
        t = self.config.train
        mine = shard_for_rank(items, self.comm.rank, self.comm.world_size)
        total_tokens = sum(item.num_completion_tokens for item in items)
        sequences = [list(item.tokens) for item in mine]
        reference = None
        if t.kl_coef > 0:
            reference = self.engine.compute_logprobs(sequences, disable_adapter=True)
        loss_fn = make_grpo_loss(mine, total_tokens=max(total_tokens, 1), clip=t.ppo_clip,
                                 kl_coef=t.kl_coef, reference_logprobs=reference)
        result = self.engine.train_step(sequences, loss_fn)
        summed = self.comm.sum({k: result.get(k, 0.0) for k in ("loss", "clip_fraction", "kl")})
        summed["grad_norm"] = result.get("grad_norm")
        return summed

    def _next_payload(self, step: int) -> dict:
        """Rank 0: the batch of ``step``, generated again in full after a server loss."""
        timer = time.perf_counter()
        payload = self._on_server(lambda: self.producer.next_batch(), step)  # a recovery replaces it
        return {**payload, "live_version": self.version, "rollout_wait_seconds": time.perf_counter() - timer}

    def _eval_due(self, step: int) -> bool:
        eval_every = self.config.train.eval_every
        return step == self.config.train.steps or bool(eval_every and step % eval_every == 0)

    def _evaluate(self, step: int) -> dict:
        timer = time.perf_counter()
        self.last_eval = self._on_server(self.evaluate, step + 1)
        return {"eval_accuracy": self.last_eval, "eval_seconds": time.perf_counter() - timer}

    def step(self, step: int) -> dict:
        started = time.time()
        payload = self.comm.leader_result(lambda: self._next_payload(step))
        assert payload["step"] == step, f"batch of step {payload['step']} arrived at step {step}"
        self.version = payload["live_version"]  # newer than this rank knew after a server recovery
        self.position = payload["position"]
        train_started = time.time()
        timer = time.perf_counter()
        # Rank 0: from its batch in hand to the start of training (pickling, broadcast, the other
        # ranks' lag in joining it).
        handoff_seconds = max(0.0, train_started - started - payload["rollout_wait_seconds"])
        train_metrics = self.train_on(payload["items"])
        train_seconds = time.perf_counter() - timer
        train_finished = time.time()
        sync = self.export_and_publish(self.version + 1, step)
        record = {
            "step": step,
            "version": self.version,
            "rollout_versions": payload["rollout_versions"],
            "reward_mean": payload["reward_mean"],
            "accuracy": payload["accuracy"],
            "num_samples": len(payload["items"]),
            "generation_seconds": payload["generation_finished_at"] - payload["generation_started_at"],
            "generation_started_at": payload["generation_started_at"],
            "generation_finished_at": payload["generation_finished_at"],
            "rollout_wait_seconds": payload["rollout_wait_seconds"],
            "batch_handoff_seconds": handoff_seconds,
            "train_seconds": train_seconds,
            "train_started_at": train_started,
            "train_finished_at": train_finished,
            "data_position": self.position,
            "started_at": started,
            **train_metrics,
            **sync,
        }
        if self._eval_due(step):  # every rank knows: no broadcast on the other steps
            record.update(self.comm.leader_result(lambda: self._evaluate(step)))
        if self.recovery is not None:
            record["server_recoveries"] = self.recovery.recoveries
        record["step_seconds"] = time.time() - started
        record["finished_at"] = time.time()
        return record

    def _first_version_after_resume(self, checkpoint_version: int) -> int:
        """Versions never go back, also past versions published after the checkpoint."""
        on_disk = [int(p.name[1:]) for p in self.run_dir.adapters.glob("v*") if p.name[1:].isdigit()]
        return max([checkpoint_version, *on_disk]) + 1

    def _start(self) -> int:
        """Publish the first version (v0, or the restored adapter); return the first step to run."""
        first_step, version = 1, 0
        if self.config.resume:
            state = self.checkpoints.restore(self.engine)
            if state is not None:
                first_step = state["step"] + 1
                self.position = state["position"]
                version = self.comm.broadcast(
                    self._first_version_after_resume(state["version"]) if self.comm.is_leader else None)
                if self.comm.is_leader:
                    self.run_dir.truncate_metrics(after_step=state["step"])
        sync = self.export_and_publish(version, first_step - 1)
        self.first_eval = self.last_eval = self.comm.leader_result(
            lambda: self._on_server(self.evaluate, first_step))
        if self.comm.is_leader:
            if first_step == 1:
                self.run_dir.append_metrics({"step": 0, "version": self.version, "eval_accuracy": self.first_eval,
                                             "agreement_max_abs": sync["agreement_max_abs"],
                                             "sync_seconds": sync["sync_seconds"]})
            else:
                evals = [r["eval_accuracy"] for r in self.run_dir.read_metrics() if "eval_accuracy" in r]
                self.first_eval = evals[0] if evals else self.first_eval
        return first_step

    def _new_producer(self, first_step: int, position: int) -> RolloutProducer:
        return RolloutProducer(
            self.publisher, self.dataset, self.reward_fn, batch_size=self.config.train.batch_size,
            n_samples=self.config.gconfig.n_samples, sampling=self.sampling(),
            max_offpolicyness=self.config.rollout.max_head_offpolicyness,
            first_step=first_step, last_step=self.config.train.steps, position=position,
            seed=self.config.train.seed)

    def _checkpoint_due(self, step: int) -> bool:
        every = self.config.train.checkpoint_every
        return step == self.config.train.steps or bool(every and step % every == 0)

    def run(self) -> dict:
        steps = self.config.train.steps
        first_step = self._start()
        if self.comm.is_leader:
            self.producer = self._new_producer(first_step, self.position)
            self.producer.version_live(self.version, first_step - 1)
            self.producer.start()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=first_step - 1, desc="GRPO", unit="step", dynamic_ncols=True)
        try:
            if self.comm.is_leader:
                # While the first batch is generated; it also pays the one-off import of
                # matplotlib (~0.6 s) here rather than in a step.
                self.run_dir.plot()
            for step in range(first_step, steps + 1):
                record = self.step(step)
                if self.comm.is_leader:
                    # Before the checkpoint: a resume drops the records of steps after its checkpoint.
                    self.run_dir.append_metrics(record)
                    self.run_dir.append_events(self.publisher.drain_log())
                    if "eval_accuracy" in record or step % PLOT_EVERY == 0 or step == steps:
                        self.run_dir.plot()  # a redraw costs ~0.07 s: not on every step
                if self._checkpoint_due(step):
                    self.checkpoints.save(self.engine, step, self.version, self.position)
                if self.comm.is_leader:
                    if bar is not None:
                        postfix = {"reward": f"{record['reward_mean']:.3f}", "acc": f"{record['accuracy']:.3f}",
                                   "step_s": f"{record['step_seconds']:.1f}"}
                        if "eval_accuracy" in record:
                            postfix["eval"] = f"{record['eval_accuracy']:.3f}"
                        bar.set_postfix(postfix)
                        bar.update(1)
        finally:
            if self.producer is not None:
                self.producer.stop()
            if self.comm.is_leader:
                self.run_dir.append_events(self.publisher.drain_log())
            if bar is not None:
                bar.close()
        return {"first_eval": self.first_eval, "last_eval": self.last_eval, "version": self.version}
