"""Synchronous GRPO with LoRA over the core's interfaces.

Per step: rollouts from the live version (every request names it) -> rewards -> group-normalised
advantages -> PPO-clip loss over the adapter (behaviour log-probabilities from the server, ratio
against the trainer's, optional KL to the base with the adapter disabled) -> optimizer step ->
export -> load as the next version -> agreement check. Every rank runs this function; rank 0 alone
talks to the servers and broadcasts the batch.

The agreement check (``areal_core.agreement``) runs beside the next batch's generation: the new
version goes live at once, the trainer scores the probe while the server generates, and rank 0's
``AgreementMonitor`` asks the server for its scores in a thread. Its verdict is collected before
the next batch is trained on (or an evaluation or the end of the run), so a batch from wrong
weights is never trained on. ``train.agreement`` says what an alarm does: ``stop`` loads the same
adapter again under the next version name and checks once more (a race or a failed load), and on
a second alarm writes a checkpoint of the last completed step and stops with the command that
resumes; ``warn`` records it and goes on; ``off`` runs no check.

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

from areal_core.agreement import PROBE_TOKENS, AgreementResult, compute_dtype, flatten, probe_sequences
from areal_core.config import RunConfig
from areal_core.errors import AdapterError, AgreementError, ArealError, ServerUnreachableError
from areal_core.grpo.agreement_monitor import AgreementMonitor
from areal_core.grpo.batch import shard_for_rank
from areal_core.grpo.checkpointing import Checkpoints
from areal_core.grpo.comm import Comm, LeaderFailed, is_peer_failure, stops_with_checkpoint
from areal_core.grpo.loss import STAT_KEYS, Objective, make_grpo_loss, objective_metrics, sequence_scales
from areal_core.grpo.mismatch import MismatchMeter, mismatch_metrics
from areal_core.grpo.publisher import AdapterPublisher
from areal_core.grpo.rollout_producer import RolloutProducer
from areal_core.grpo.run_dir import RunDirectory
from areal_core.grpo.stop_request import STOP
from areal_core.grpo.server_recovery import ServerLostError, ServerRecovery, copy_adapter_as_version, say_on_stderr
from areal_core.interfaces import Engine, SamplingParams
from areal_core.lr_schedule import learning_rate, total_optimizer_steps
from areal_core.registry import Registry


PLOT_EVERY = 5  # steps between redraws of plot.png (also redrawn on evaluation steps and at the end)


class ExportFailed(ArealError):
    """The engine could not write an adapter version (disk full, permissions, ...)."""


class AgreementStopped(AgreementError):
    """Twice in a row the server's scores did not match the trainer's adapter; the run stopped."""


class RunInterrupted(ArealError):
    """Ctrl-C during the steps: every rank stopped before the next step, with a checkpoint."""

    checkpoint_on_stop = True


def raise_again_saying(error: BaseException, what_next: str) -> None:
    """Raise ``error`` again (its own class where it can be rebuilt from a message), its message
    followed by ``what_next`` (what was kept and how to continue)."""
    message = f"{error}; {what_next}"
    if isinstance(error, LeaderFailed):
        raise LeaderFailed(message) from error
    try:
        again = type(error)(message)
    except TypeError:  # an error class that takes other arguments
        again = ArealError(message)
    raise again from error


class GRPOLoop:
    def __init__(self, config: RunConfig, registry: Registry, engine: Engine, comm: Comm,
                 run_dir: RunDirectory, dataset, reward_fn: Callable,
                 publisher: AdapterPublisher | None = None, progress: bool = True,
                 on_server_restarted: Callable[[], object] | None = None,
                 resume_command: str = "areal train CONFIG [overrides] resume=true",
                 adapter_name: str | None = None):
        """``on_server_restarted`` is called on rank 0 after a launched server was started again;
        ``resume_command`` is what a stop on an agreement alarm tells the user to run;
        ``adapter_name`` names the engine's adapter this loop trains when the engine holds several
        (``areal_core.grpo.multi_adapter_loop``; None: the engine's only adapter)."""
        self.config = config
        self.adapter_name = adapter_name
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
        self.resume_command = resume_command
        self.agreement = config.train.agreement
        self.objective = Objective.from_actor(config.actor)
        # The server scores a sequence of at most max_model_len tokens (one left for generation).
        self.probe = probe_sequences(dataset.eval_records(), PROBE_TOKENS, config.rollout.max_model_len - 1)
        self.monitor: AgreementMonitor | None = None
        self.agreement_dtype = compute_dtype(config.actor.param_dtype or config.actor.dtype, config.rollout.dtype)
        self.version = -1
        self.position = 0
        self.rollout_restarts = 0  # producers replaced (after a server loss or a reload)
        self.unwritten: dict | None = None  # the last step's record, waiting for its version's check
        self.warned_short = False  # dynamic sampling fell short of a full batch (said once)
        self.in_flight: dict | None = None  # the record of a step trained but not yet published
        self.bar = None  # rank 0's progress bar
        self.producer: RolloutProducer | None = None
        self.checkpoints = Checkpoints(run_dir.checkpoints, comm)
        self.completed_step = 0  # the last step whose update the engine holds
        self.checkpointed_step = 0  # the step of the newest checkpoint written or restored
        self.last_checkpoint_at = time.monotonic()
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
        """Export ``version`` on every rank, load it on the servers (rank 0), start its check.

        ``step`` is the step whose update this is. The version live afterwards may be newer than
        ``version`` when the server had to be recovered meanwhile; ``self.version`` says which.
        The check's verdict is collected later (``resolve_agreement``), before any batch from
        this version is trained on.
        """
        actor = self.config.actor
        start = time.perf_counter()
        try:
            adapter = self.registry.call("areal_export_adapter", actor.backend, engine=self.engine,
                                         directory=str(self.run_dir.adapter_dir(version)), version=version,
                                         adapter_name=self.adapter_name)
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
        published = self.comm.leader_result(lambda: self._publish_on_leader(adapter, step))
        self.version = published["version"]
        self._prune_adapters()
        record = {
            "export_seconds": export_seconds,
            "load_seconds": published["load_seconds"],
            "sync_seconds": export_seconds + published["load_seconds"],
            "adapter_bytes": adapter.num_bytes,
        }
        if self.agreement != "off":
            # The trainer's side of the check, while the server generates.
            start = time.perf_counter()
            trainer = self._probe_scores()
            record["agreement_trainer_seconds"] = time.perf_counter() - start
            if self.comm.is_leader:
                self.monitor.new_trainer_scores(trainer)
                self.monitor.start(self.version)
        return record

    def _probe_scores(self, disable_adapter: bool = False) -> list[float] | None:
        """The trainer's flat scores of the probe on rank 0 (None elsewhere): a collective forward
        in which each rank scores its share of the probe's sequences."""
        rank, world = self.comm.rank, self.comm.world_size
        mine = self._logprobs(self.probe[rank::world], disable_adapter=disable_adapter)
        shares = self.comm.gather([t.tolist() for t in mine])
        if shares is None:
            return None
        rows = [None] * len(self.probe)
        for r, share in enumerate(shares):
            rows[r::world] = share
        return flatten(rows)

    def _publish_on_leader(self, adapter, step: int) -> dict:
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
            self._recover(exc, adapter.version, next_step=step + 1, check=False)
        load_seconds = time.perf_counter() - start
        self.run_dir.append_events(self.publisher.drain_log())
        if self.producer is not None:
            self.producer.version_live(self.version, step)
        return {"version": self.version, "load_seconds": load_seconds}

    # --- the agreement verdict (rank 0) -------------------------------------------------------

    def resolve_agreement(self, next_step: int) -> dict:
        """Every rank: collect the pending check's verdict; ``{"metrics": ...}`` for the record,
        or ``{"stop": message, ...}`` when the run must stop (see ``stop_on_agreement``)."""
        if self.agreement == "off":
            return {"metrics": {}}
        return self.comm.leader_result(lambda: self._resolve_on_leader(next_step))

    def stop_on_agreement(self, outcome: dict, completed_step: int) -> None:
        """Every rank: after a second alarm, checkpoint ``completed_step`` and stop the run."""
        self._save_checkpoint(completed_step, outcome["checkpoint_version"])
        if self.comm.is_leader:
            raise AgreementStopped(outcome["stop"])
        raise LeaderFailed(f"rank 0 stopped the run: {outcome['stop']}")

    def _wait_for_verdict(self, next_step: int) -> tuple[AgreementResult, float] | None:
        while True:
            try:
                return self.monitor.wait()
            except Exception as exc:
                if not self._server_lost(exc):
                    raise
                self._recover(exc, self.version, next_step)  # starts a check of the new version

    def _resolve_on_leader(self, next_step: int) -> dict:
        """Every pending check's verdict; under ``stop``, a first alarm reloads and checks again."""
        if self.monitor is None:
            return {"metrics": {}}
        started = time.perf_counter()
        metrics: dict = {}
        attempt = 0
        while (verdict := self._wait_for_verdict(next_step)) is not None:
            result, server_seconds = verdict
            self.publisher.record("agreement", self.publisher.versions.name(result.version),
                                  **result.event())
            metrics = {**result.metrics(), "agreement_version": result.version,
                       "agreement_alarm": result.alarm, "agreement_server_seconds": server_seconds}
            if not result.alarm:
                attempt = 0
                continue
            attempt += 1
            self._record_alarm(result, attempt)
            if self.agreement == "warn":
                continue
            if attempt == 2:
                return {"stop": self._stop_message(result), "checkpoint_version": result.version,
                        "metrics": metrics}
            self._reload(result.version, next_step)  # starts the check of the reloaded copy
        self.run_dir.append_events(self.publisher.drain_log())
        if metrics:
            metrics["agreement_wait_seconds"] = time.perf_counter() - started
        return {"metrics": metrics}

    def _record_alarm(self, result: AgreementResult, attempt: int) -> None:
        action = {"warn": "going on (train.agreement=warn)",
                  "stop": "loading the same adapter again under the next version name" if attempt == 1
                  else "writing a checkpoint and stopping"}[self.agreement]
        self.publisher.record("agreement_alarm", self.publisher.versions.name(result.version),
                              attempt=attempt, policy=self.agreement, **result.event())
        self.run_dir.append_events(self.publisher.drain_log())
        say_on_stderr(f"areal train: agreement alarm: {result.describe()}; {action}")

    def _reload(self, version: int, next_step: int) -> None:
        """Load ``version``'s adapter again under the next version name; its rollouts start over."""
        if self.producer is not None:
            self.producer.stop(timeout=self.config.rollout.request_timeout + 30.0)
        new_version = self._next_version()
        adapter = copy_adapter_as_version(self.run_dir.adapter_dir(version),
                                          self.run_dir.adapter_dir(new_version), new_version)
        self._on_server(lambda: self.publisher.publish(adapter), next_step)
        self.version = new_version
        self.publisher.record("agreement_reload", self.publisher.versions.name(new_version),
                              version=new_version, source_version=version)
        self.run_dir.append_events(self.publisher.drain_log())
        self.monitor.start(new_version)
        if self.producer is not None:
            self._restart_rollouts(next_step)

    def _stop_message(self, result: AgreementResult) -> str:
        return (f"{result.describe()}, again after loading the same adapter under a new name: the "
                f"server is not serving the trainer's weights (the base model, another version, a "
                f"wrong scale or missing modules). Stopped before training on any of its rollouts; "
                f"a checkpoint of the last completed step is written. Fix the server (or set "
                f"train.agreement=warn to go on regardless) and resume with: {self.resume_command}")

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

    def _recover(self, error: BaseException, source_version: int, next_step: int, check: bool = True) -> None:
        """Bring the server back with ``source_version``'s adapter live under a new version; the
        rollouts then start over at ``next_step`` (the batches made before are dropped whole).
        With ``check``, the new version's agreement check is started (it is the same adapter)."""
        producer = self.producer
        if producer is not None:
            producer.stop(timeout=self.config.rollout.request_timeout + 30.0)
        self.version = self.recovery.recover(error, source_version, self._next_version())
        self.run_dir.append_events(self.publisher.drain_log())
        if check and self.monitor is not None and self.monitor.trainer is not None:
            self.monitor.start(self.version)
        if producer is not None:
            self._restart_rollouts(next_step)

    def _restart_rollouts(self, next_step: int) -> None:
        self.rollout_restarts += 1
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
                              top_p=g.top_p, top_k=g.top_k, ignore_eos=g.ignore_eos)

    def evaluate(self) -> float:
        """Greedy held-out accuracy of the live version (mean reward over the eval split)."""
        records = self.dataset.eval_records(self.config.train.eval_size)
        greedy = SamplingParams(max_new_tokens=self.config.gconfig.max_new_tokens, temperature=0.0)
        groups = self.publisher.generate([r["prompt_ids"] for r in records], self.version, 1, greedy)
        return sum(self.reward_fn(r, g[0].output_ids) for r, g in zip(records, groups)) / len(records)

    # --- the engine, for this loop's adapter -------------------------------------------------------

    def _logprobs(self, sequences, disable_adapter: bool = False):
        keywords = {"disable_adapter": True} if disable_adapter else {}
        if self.adapter_name is not None:  # an engine written for one adapter takes no adapter=
            keywords["adapter"] = self.adapter_name
        return self.engine.compute_logprobs(sequences, **keywords)

    def _train_step(self, sequences, loss_fn):
        if self.adapter_name is None:
            return self.engine.train_step(sequences, loss_fn)
        return self.engine.train_step(sequences, loss_fn, adapter=self.adapter_name)

    # --- one step ---------------------------------------------------------------------------------

    def train_on(self, items, step: int) -> dict:
        """``actor.ppo_n_minibatches`` optimizer steps on the batch ``items`` (every rank's list).

        Minibatch m is items m, m + n, ...; each rank trains on its share of each. When the
        objective needs them, the trainer's pre-update log-probabilities of all of this rank's
        items are computed first, in one forward (the proximal policy), and the base model's
        for the KL term.
        """
        actor = self.config.actor
        n = actor.ppo_n_minibatches
        minibatches = [items[m::n] for m in range(n)]
        mine = [shard_for_rank(mb, self.comm.rank, self.comm.world_size) for mb in minibatches]
        every = [list(item.tokens) for share in mine for item in share]
        proximal = reference = None
        timer = time.perf_counter()
        if actor.uses_recomputed_logprobs:
            proximal = self._logprobs(every)
        if actor.kl_ctl > 0:
            reference = self._logprobs(every, disable_adapter=True)
        recompute_seconds = time.perf_counter() - timer
        meter = MismatchMeter()
        sums = {key: 0.0 for key in ("loss", *STAT_KEYS)}
        grad_norms, rates, start, skipped = [], [], 0, 0
        for minibatch, share in zip(minibatches, mine):
            scales = sequence_scales([item.num_completion_tokens for item in minibatch], actor.loss_agg_mode,
                                     self.config.gconfig.max_new_tokens)
            mine_scales = shard_for_rank(scales, self.comm.rank, self.comm.world_size)
            end = start + len(share)
            loss_fn = make_grpo_loss(
                share, objective=self.objective, scales=mine_scales,
                proximal=proximal[start:end] if proximal is not None else None,
                reference=reference[start:end] if reference is not None else None,
                mismatch=meter if (proximal is not None or n == 1) else None, mismatch_version=self.version)
            start = end
            result = self._train_step([list(item.tokens) for item in share], loss_fn)
            for key in sums:
                sums[key] += result.get(key, 0.0)
            grad_norms.append(result.get("grad_norm"))
            rates.append(result.get("lr"))
            skipped += int(result.get("update_skipped", 0))
        summed = self.comm.sum({**sums, **meter.sums()})
        largest = self.comm.max({"mismatch_max_abs": meter.max_abs})["mismatch_max_abs"]
        metrics = {"loss": summed["loss"] / n, **objective_metrics(summed, actor.use_decoupled_loss)}
        metrics.update(mismatch_metrics(summed, largest))
        norms = [g for g in grad_norms if g is not None]
        metrics["grad_norm"] = sum(norms) / len(norms) if norms else None  # mean over the minibatches
        metrics["lr"] = rates[0]  # the rate of the step's first optimizer step
        metrics["updates_skipped"] = skipped  # optimizer steps left out for a non-finite gradient norm
        if proximal is not None or reference is not None:
            metrics["recompute_seconds"] = recompute_seconds
        self._check_learning_rates(rates, step)
        return metrics

    def _check_learning_rates(self, rates: list, step: int) -> None:
        """An engine that does not follow ``actor.optimizer``'s schedule is refused at once."""
        opt = self.config.actor.optimizer
        total = total_optimizer_steps(self.config)
        first = (step - 1) * self.config.actor.ppo_n_minibatches
        for k, rate in enumerate(rates):
            expected = learning_rate(opt, first + k, total)
            if rate is None or abs(rate - expected) > 1e-6 * expected:
                raise ArealError(
                    f"engine {self.config.actor.backend!r} stepped at lr {rate} where actor.optimizer's "
                    f"schedule ({opt.lr_scheduler_type}, warm-up {opt.warmup_steps_proportion}) gives "
                    f"{expected:.6g} for optimizer step {first + k}; the engine must set the rate of each "
                    f"step from areal_core.lr_schedule (Engine.train_step's contract)")

    def _next_payload(self, step: int) -> dict:
        """Rank 0: the batch of ``step``, once every version that could have made it passed its
        agreement check; generated again in full after a server loss or a reload."""
        timer = time.perf_counter()
        agreement: dict = {}
        payload, made_by = None, None
        while True:
            outcome = self._resolve_on_leader(step)
            if "stop" in outcome:
                return {"agreement_stop": outcome, "agreement": outcome["metrics"]}
            agreement = outcome["metrics"] or agreement
            if STOP.requested:
                return {"interrupted": True, "agreement": agreement}
            if payload is None or made_by != self.rollout_restarts:  # none yet, or from a dropped producer
                # a recovery replaces the producer; a Ctrl-C ends the wait
                payload = self._on_server(lambda: self.producer.next_batch(give_up=lambda: STOP.requested), step)
                if payload is None:
                    return {"interrupted": True, "agreement": agreement}
                made_by = self.rollout_restarts
            if self.monitor is None or self.monitor.pending_version is None:
                break  # a version loaded while the batch was made (a recovery) is checked first
        return {**payload, "live_version": self.version, "agreement": agreement,
                "rollout_wait_seconds": time.perf_counter() - timer}

    def _eval_due(self, step: int) -> bool:
        eval_every = self.config.train.eval_every
        return step == self.config.train.steps or bool(eval_every and step % eval_every == 0)

    def _evaluate(self, step: int) -> dict:
        timer = time.perf_counter()
        self.last_eval = self._on_server(self.evaluate, step + 1)
        return {"eval_accuracy": self.last_eval, "eval_seconds": time.perf_counter() - timer}

    def step(self, step: int) -> bool:
        """One step; its metrics record is written once the check of the version it made is in:
        at once on evaluation and checkpoint steps (which wait for it), else at the start of the
        next step (the check runs while the next batch is generated). Returns whether the step
        is to be checkpointed."""
        started = time.time()
        payload = self.comm.leader_result(lambda: self._next_payload(step))
        self._write_record({**self.unwritten, **payload["agreement"]} if self.unwritten else None)
        if "agreement_stop" in payload:
            self.stop_on_agreement(payload["agreement_stop"], completed_step=step - 1)
        if "interrupted" in payload:
            raise RunInterrupted(f"interrupted (Ctrl-C) before step {step}")
        assert payload["step"] == step, f"batch of step {payload['step']} arrived at step {step}"
        self.version = payload["live_version"]  # newer than this rank knew after a server recovery
        self.position = payload["position"]
        train_started = time.time()
        timer = time.perf_counter()
        # Rank 0: from its batch in hand to the start of training (pickling, broadcast, the other
        # ranks' lag in joining it).
        handoff_seconds = max(0.0, train_started - started - payload["rollout_wait_seconds"])
        train_metrics = self.train_on(payload["items"], step)
        self.completed_step = step
        train_seconds = time.perf_counter() - timer
        train_finished = time.time()
        record = {
            "step": step,
            "version": self.version + 1,  # the version this update is exported as
            "rollout_versions": payload["rollout_versions"],
            "reward_mean": payload["reward_mean"],
            "accuracy": payload["accuracy"],
            **payload.get("reward_metrics", {}),  # the reward's own counts (areal_core.tasks.reward_metrics)
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
        }
        # A stop while this version is exported or loaded checkpoints this step: its record goes first.
        self.in_flight = record
        record.update(self.export_and_publish(self.version + 1, step))
        record["version"] = self.version  # newer than exported after a server recovery
        # Until it is written: a stop while this version's check or an evaluation is awaited
        # checkpoints this step, and writes this record first.
        self.in_flight, self.unwritten = None, record
        if self.recovery is not None:
            record["server_recoveries"] = self.recovery.recoveries
        if "dropped_groups" in payload:
            record.update({k: payload[k] for k in ("dropped_groups", "refill_rounds", "dynamic_sampling_short")})
            if payload["dynamic_sampling_short"] and not self.warned_short and self.comm.is_leader:
                self.warned_short = True
                say_on_stderr(
                    f"areal train: dynamic sampling: step {step} trains on "
                    f"{self.config.train.batch_size - payload['dynamic_sampling_short']} of "
                    f"{self.config.train.batch_size} groups: the others had equal rewards in every one of "
                    f"{self.config.actor.dynamic_sampling_max_rounds} refill rounds (raise "
                    f"actor.dynamic_sampling_max_rounds; metrics.jsonl's dynamic_sampling_short counts "
                    f"them at every step; said once)")
        # decided once, the same on every rank (one broadcast only with checkpoint_every_seconds)
        checkpoint = self._checkpoint_due(step)
        if not (self._eval_due(step) or checkpoint):
            record["step_seconds"] = time.time() - started
            record["finished_at"] = time.time()
            return False  # written at the start of the next step, with this version's verdict
        # An evaluation, a checkpoint and the end of the run need the verdict of this version.
        outcome = self.resolve_agreement(step + 1)
        record.update(outcome["metrics"])
        if "stop" not in outcome and self._eval_due(step):
            record.update(self.comm.leader_result(lambda: self._evaluate(step)))
        record["step_seconds"] = time.time() - started
        record["finished_at"] = time.time()
        self._write_record(record)
        if "stop" in outcome:
            self.stop_on_agreement(outcome, completed_step=step)
        return checkpoint

    def _write_record(self, record: dict | None) -> None:
        """Rank 0: metrics.jsonl, events.jsonl, the plot and the progress bar."""
        self.unwritten = None
        if record is None or not self.comm.is_leader:
            return
        # Before the checkpoint: a resume drops the records of steps after its checkpoint.
        self.run_dir.append_metrics(record)
        self.run_dir.append_events(self.publisher.drain_log())
        step = record["step"]
        if "eval_accuracy" in record or step % PLOT_EVERY == 0 or step == self.config.train.steps:
            self.run_dir.plot()  # a redraw costs ~0.07 s: not on every step
        if self.bar is not None:
            self.bar.set_postfix(self._progress(record))
            self.bar.update(1)

    def _first_version_after_resume(self, checkpoint_version: int) -> int:
        """Versions never go back, also past versions published after the checkpoint."""
        on_disk = [int(p.name[1:]) for p in self.run_dir.adapters.glob("v*") if p.name[1:].isdigit()]
        return max([checkpoint_version, *on_disk]) + 1

    def _start_agreement(self) -> None:
        """The base model's probe scores (collective, once: the base never changes)."""
        if self.agreement == "off":
            return
        base = self._probe_scores(disable_adapter=True)
        if self.comm.is_leader:
            self.monitor = AgreementMonitor(self.publisher, self.probe, base, self.agreement_dtype)

    def _restored_state(self) -> dict | None:
        """The newest checkpoint loaded into the engine: its loop state (step, version, data
        position), or None when there is none."""
        return self.checkpoints.restore(self.engine)

    def _start(self) -> int:
        """Publish the first version (v0, or the restored adapter); return the first step to run."""
        first_step, version = 1, 0
        if self.config.resume:
            state = self._restored_state()
            if state is not None:
                first_step = state["step"] + 1
                self.completed_step = self.checkpointed_step = state["step"]
                self.position = state["position"]
                version = self.comm.broadcast(
                    self._first_version_after_resume(state["version"]) if self.comm.is_leader else None)
                if self.comm.is_leader:
                    self.run_dir.truncate_metrics(after_step=state["step"])
        self._start_agreement()
        sync = self.export_and_publish(version, first_step - 1)
        outcome = self.resolve_agreement(first_step)
        if "stop" in outcome:
            self.stop_on_agreement(outcome, completed_step=first_step - 1)
        timer = time.perf_counter()
        self.first_eval = self.last_eval = self.comm.leader_result(
            lambda: self._on_server(self.evaluate, first_step))
        eval_seconds = time.perf_counter() - timer
        if self.comm.is_leader:
            if first_step == 1:
                self.run_dir.append_metrics({"step": 0, "version": self.version, "eval_accuracy": self.first_eval,
                                             "eval_seconds": eval_seconds, "sync_seconds": sync["sync_seconds"],
                                             "finished_at": time.time(), **outcome["metrics"]})
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
            seed=self.config.train.seed, actor=self.config.actor)

    def _checkpoint_due(self, step: int) -> bool:
        """At the end, every ``checkpoint_every`` steps, and once ``checkpoint_every_seconds``
        passed since the last (rank 0's clock decides; every rank knows the other rules)."""
        t = self.config.train
        if step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
            return True
        if not t.checkpoint_every_seconds:
            return False
        return bool(self.comm.broadcast(time.monotonic() - self.last_checkpoint_at >= t.checkpoint_every_seconds))

    def _save_checkpoint(self, step: int, version: int | None = None) -> None:
        """Collective: the checkpoint of completed ``step`` (its record is written first)."""
        self._write_records_before_checkpoint(step)
        self.checkpoints.save(self.engine, step, self.version if version is None else version, self.position,
                              keep=self.config.train.keep_checkpoints)
        self.checkpointed_step = step
        self.last_checkpoint_at = time.monotonic()

    def _write_records_before_checkpoint(self, step: int) -> None:
        """A resume keeps the records up to its checkpoint's step: each is written first (the
        record of a step whose version was not published yet says ``published: false``)."""
        if self.comm.is_leader:
            if self.unwritten is not None and self.unwritten["step"] <= step:
                self.run_dir.append_metrics(self.unwritten)
            if self.in_flight is not None and self.in_flight["step"] == step:
                self.run_dir.append_metrics({**self.in_flight, "published": False})
        self.unwritten = self.in_flight = None

    def _checkpoint_before_stop(self, error: BaseException) -> None:
        """Every rank, on a stop the loop controls: the checkpoint of the last completed step
        (unless there is one already), then the error again with where to continue from."""
        step = self.completed_step
        if step > self.checkpointed_step:
            self._save_checkpoint(step)
            kept = f"a checkpoint of step {step} (the last completed) is written"
        elif step > 0:
            kept = f"the checkpoint of step {step} (the last completed) is intact"
        else:
            kept = "no step was completed, so there is nothing to checkpoint"
        raise_again_saying(error, f"{kept}; continue with: {self.resume_command}")

    def _progress(self, record: dict) -> dict:
        postfix = {"reward": f"{record['reward_mean']:.3f}", "acc": f"{record['accuracy']:.3f}",
                   "step_s": f"{record['step_seconds']:.1f}"}
        if record.get("mismatch_kl") is not None:
            postfix["mis_kl"] = f"{record['mismatch_kl']:.1e}"
        if "eval_accuracy" in record:
            postfix["eval"] = f"{record['eval_accuracy']:.3f}"
        return postfix

    def run(self) -> dict:
        steps = self.config.train.steps
        try:
            first_step = self._start()
            if self.comm.is_leader:
                self.producer = self._new_producer(first_step, self.position)
                self.producer.version_live(self.version, first_step - 1)
                self.producer.start()
            if self.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=steps, initial=first_step - 1, desc="GRPO", unit="step", dynamic_ncols=True)
            if self.comm.is_leader:
                # While the first batch is generated; it also pays the one-off import of
                # matplotlib (~0.6 s) here rather than in a step.
                self.run_dir.plot()
            STOP.accepting = True
            for step in range(first_step, steps + 1):
                if self.step(step):
                    self._save_checkpoint(step)
        except BaseException as exc:
            STOP.accepting = False
            if stops_with_checkpoint(exc):
                self._checkpoint_before_stop(exc)
            raise
        finally:
            STOP.accepting = False
            if self.producer is not None:
                self.producer.stop()
            if self.monitor is not None:
                self.monitor.close()
            if self.comm.is_leader:
                if self.unwritten is not None:  # the run failed before its version's check came
                    self.run_dir.append_metrics(self.unwritten)
                self.run_dir.append_events(self.publisher.drain_log())
            if self.bar is not None:
                self.bar.close()
        return {"first_eval": self.first_eval, "last_eval": self.last_eval, "version": self.version}
