"""Several LoRA adapters trained side by side on one frozen base (a run with ``adapters:``).

One engine holds the base once and every adapter (``areal_inject_adapter`` per adapter); one
rollout server holds every adapter's live versions (``<name>-v<N>``). Each adapter has a loop of
its own (an ``AdapterTrack``: the one-adapter ``GRPOLoop`` over its view of the configuration,
``areal_core.adapters``): its dataset, reward, producer of rollouts, versions, agreement check,
evaluation and learning-rate schedule. One step clock drives them all: step N trains every
adapter on a batch of its own, one after the other; each adapter's producer keeps generating
on the shared server meanwhile, so the server batches requests of several adapters together while
the ranks train another one.

The run's checkpoints hold every adapter (the engine's state) with each adapter's own step,
version and data position: a stop between two adapters' parts of a step (Ctrl-C, an agreement
stop) resumes each adapter where it was. A rollout server lost during such a run stops it with a
checkpoint (automatic restarts reload one adapter only and are not offered here yet).
"""

from __future__ import annotations

import time
from typing import Callable

from areal_core.adapters import adapter_views
from areal_core.config import RunConfig
from areal_core.grpo.adapter_records import AdapterRunDirectory, StepRecords
from areal_core.grpo.checkpointing import Checkpoints
from areal_core.grpo.comm import Comm, stops_with_checkpoint
from areal_core.grpo.loop import PLOT_EVERY, GRPOLoop, raise_again_saying
from areal_core.grpo.run_dir import RunDirectory
from areal_core.grpo.stop_request import STOP
from areal_core.errors import ArealError
from areal_core.interfaces import Engine
from areal_core.registry import Registry

NO_RECOVERY = ("a run of several adapters does not restart its server yet; bring the server back and "
               "continue with resume=true")


class AdapterTrack(GRPOLoop):
    """One adapter's loop inside a ``MultiAdapterLoop``: checkpoints and restores go through it."""

    def __init__(self, *args, name: str, driver: "MultiAdapterLoop", **kwargs):
        super().__init__(*args, **kwargs)
        self.name = name  # the adapter's (adapter_name, which addresses the engine's, may be None)
        self.driver = driver
        if self.recovery is not None:
            self.recovery.no_recovery = NO_RECOVERY

    def _save_checkpoint(self, step: int, version: int | None = None) -> None:
        self.driver.save_checkpoint(self, step, version)

    def _restored_state(self) -> dict | None:
        return self.driver.restored_state(self.name)


class MultiAdapterLoop:
    """Every rank: the adapters' loops on one step clock (see the module docstring).

    ``publishers`` (rank 0) and ``tasks`` map each adapter's name to its ``AdapterPublisher`` and
    to its ``(dataset, reward_fn)``.
    """

    def __init__(self, config: RunConfig, registry: Registry, engine: Engine, comm: Comm,
                 run_dir: RunDirectory, tasks: dict[str, tuple], publishers: dict | None = None,
                 progress: bool = True, on_server_restarted: Callable[[], object] | None = None,
                 resume_command: str = "areal train CONFIG [overrides] resume=true"):
        self.config = config
        self.engine = engine
        self.comm = comm
        self.run_dir = run_dir
        self.resume_command = resume_command
        self.progress = progress and comm.is_leader
        views = adapter_views(config)
        self.names = [adapter.name for adapter, _ in views]
        self.records = StepRecords(run_dir, self.names, self._on_record) if comm.is_leader else None
        self.registry = registry
        if comm.is_leader:
            run_dir.adapter_names = self.names
        self.checkpoints = Checkpoints(run_dir.checkpoints, comm)
        self.restored: dict | None = None
        self.bar = None
        # An engine written for one adapter (no multi_adapter declared) may run a list of one; it
        # is never given adapter= then.
        declaration = registry.declaration(config.actor.backend)
        addressed = declaration is not None and declaration.lora.multi_adapter
        self.tracks: list[AdapterTrack] = []
        for adapter, view in views:
            dataset, reward_fn = tasks[adapter.name]
            self.tracks.append(AdapterTrack(
                view, registry, engine, comm, AdapterRunDirectory(run_dir, adapter.name, self.records),
                dataset, reward_fn, (publishers or {}).get(adapter.name), progress=False,
                on_server_restarted=on_server_restarted, resume_command=resume_command,
                adapter_name=adapter.name if addressed else None, name=adapter.name, driver=self))

    # --- checkpoints ----------------------------------------------------------------------------

    def restored_state(self, name: str) -> dict | None:
        """The adapter's own step, version and data position in the restored checkpoint."""
        if self.restored is None:
            return None
        return self.restored["adapters"][name]

    def _restore(self) -> None:
        """Collective: the newest checkpoint into the engine (every adapter, once)."""
        found = self.checkpoints.latest()
        if found is None:
            return
        saved = found[1].get("adapters")
        if not isinstance(saved, dict) or sorted(saved) != sorted(self.names):
            had = sorted(saved) if isinstance(saved, dict) else "one adapter (no adapters: list)"
            raise ArealError(
                f"the checkpoint {found[0]} holds the adapters {had}, not this run's "
                f"{sorted(self.names)}; resume with the adapters it was trained with, or start a new "
                f"output_dir")
        self.restored = self.checkpoints.restore(self.engine)
        if self.comm.is_leader:
            self.records.resume({name: part["step"] for name, part in saved.items()})

    def save_checkpoint(self, trigger: AdapterTrack | None = None, step: int = 0, version: int | None = None) -> None:
        """Collective: every adapter at its last completed step (``trigger``, the adapter whose
        loop asked, at ``step`` and ``version``); its records are written first."""
        states = {}
        for track in self.tracks:
            own = track is trigger
            at = step if own else track.completed_step
            track._write_records_before_checkpoint(at)
            states[track.name] = {
                "step": at, "position": track.position,
                "version": (version if version is not None else track.version) if own else track.version}
        if self.records is not None:
            self.records.flush()
        first = self.tracks[0]
        self.checkpoints.save(self.engine, min(s["step"] for s in states.values()),
                              states[first.name]["version"], first.position,
                              keep=self.config.train.keep_checkpoints, adapters=states)
        for track in self.tracks:
            track.checkpointed_step = states[track.name]["step"]
            track.last_checkpoint_at = time.monotonic()

    def _checkpoint_before_stop(self, error: BaseException) -> None:
        """Every rank: the checkpoint of each adapter's last completed step (unless written), then
        the error again with where to continue from."""
        behind = [t for t in self.tracks if t.completed_step > t.checkpointed_step]
        steps = ", ".join(f"{t.name} {t.completed_step}" for t in self.tracks)
        if behind:
            self.save_checkpoint()
            kept = f"a checkpoint of the last completed steps ({steps}) is written"
        elif any(t.completed_step for t in self.tracks):
            kept = f"the checkpoint of the last completed steps ({steps}) is intact"
        else:
            kept = "no step was completed, so there is nothing to checkpoint"
        raise_again_saying(error, f"{kept}; continue with: {self.resume_command}")

    # --- progress -------------------------------------------------------------------------------

    def _on_record(self, record: dict) -> None:
        """Rank 0, after each merged record: the plot now and then, the progress bar."""
        step = record["step"]
        evaluated = any("eval_accuracy" in record.get(name, {}) for name in self.names)
        if step and (evaluated or step % PLOT_EVERY == 0 or step == self.config.train.steps):
            self.run_dir.plot()
        if self.bar is None or not step:
            return
        postfix = {}
        for name in self.names:
            part = record.get(name, {})
            if "reward_mean" in part:
                postfix[name] = f"{part['reward_mean']:.2f}"
            if "eval_accuracy" in part:
                postfix[f"{name}_eval"] = f"{part['eval_accuracy']:.3f}"
        if "step_seconds" in record:
            postfix["step_s"] = f"{record['step_seconds']:.1f}"
        self.bar.set_postfix(postfix)
        self.bar.update(step - self.bar.n)

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> dict:
        steps = self.config.train.steps
        try:
            if self.config.resume:
                self._restore()
            firsts = [track._start() for track in self.tracks]
            if self.comm.is_leader:
                for track, first in zip(self.tracks, firsts):
                    track.producer = track._new_producer(first, track.position)
                    track.producer.version_live(track.version, first - 1)
                    track.producer.start()
            if self.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=steps, initial=min(firsts) - 1, desc="GRPO", unit="step", dynamic_ncols=True)
            if self.comm.is_leader:
                self.run_dir.plot()
            STOP.accepting = True
            for step in range(min(firsts), steps + 1):
                due = False
                for track, first in zip(self.tracks, firsts):
                    if step >= first:
                        due = track.step(step) or due
                if due:
                    self.save_checkpoint(None, step)
        except BaseException as exc:
            STOP.accepting = False
            if stops_with_checkpoint(exc):
                self._checkpoint_before_stop(exc)
            raise
        finally:
            STOP.accepting = False
            for track in self.tracks:
                if track.producer is not None:
                    track.producer.stop()
                if track.monitor is not None:
                    track.monitor.close()
                if self.comm.is_leader:
                    if track.unwritten is not None:
                        track.run_dir.append_metrics(track.unwritten)
                        track.unwritten = None
                    track.run_dir.append_events(track.publisher.drain_log())
            if self.comm.is_leader:
                self.records.flush()
                self.run_dir.plot()
            if self.bar is not None:
                self.bar.close()
        return {"adapters": {t.name: {"first_eval": t.first_eval, "last_eval": t.last_eval,
                                              "version": t.version} for t in self.tracks}}
