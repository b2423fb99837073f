"""Sweeps on Ray: the same points, keys and files as the single-process sweep, computed by many workers.

:class:`RayExecutor` is an ``executor`` for :func:`layerlens.sweep.sweep`. It starts a local Ray sized to
the machine (no address) or joins a cluster (``address``, e.g. ``ray://head:10001`` or ``auto``), and starts
one actor per GPU (or per CPU slot). Each actor loads the model once from a :class:`ModelSpec` (a folder,
hub id or ``default`` that every worker can reach, and the driver's dtype), checks that it holds the same
weights as the driver's model (:func:`layerlens.runs.model_fingerprint`), keeps it, and evaluates the work
items it is sent:

* **Prefix groups.** A task's unfinished points are put in the prefix-reuse order
  (:func:`layerlens.prefix_reuse.schedule_reuse`, a depth-first walk of the tree of shared prefixes) and
  cut into contiguous groups of about equal cost (:func:`prefix_groups`); a group runs on one actor with
  :func:`layerlens.sweep._run_task`, the very code of the single-process sweep, so points sharing a pruned
  prefix share its work and the numbers are those of the single process (bit for bit when both run
  the same kernels: same device type and, on CPU, the same number of threads).
* **Healing.** Each pruned plan to heal is one work item (heal, then evaluate on every task), run by
  :func:`layerlens.sweep.heal_and_evaluate` on an actor.
* **One store.** Actors send every finished point back at once; the driver persists it under the same key
  as the single-process sweep and reports progress, so a sweep stopped on Ray resumes in one process and
  the other way round. Points are keyed by the workers' device type (``cpu``/``cuda``), as they would be
  by a single process on that device.
* **Faults.** An actor that dies (killed, out of memory, node lost) or raises is replaced; the points of
  its item that had not come back go to another actor. The point it was computing (the whole item for a
  healing) is charged one attempt; after ``max_retries`` retries it is given up: no result, its reason in
  the frame's ``error`` column, nothing persisted (the next run computes it). A finished point is never
  computed again. Ctrl-C (or a progress callback that raises, the dashboard's Stop) kills the actors
  and keeps every finished point.

Ray is an optional extra (``pip install 'layerlens[ray]'`` or ``requirements-ray.txt``); without it the
executor says how to install it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .defaults import DEFAULT_MODEL_ID
from .errors import LayerLensError
from .prefix_reuse import schedule_reuse
from .runs import model_fingerprint

log = logging.getLogger("layerlens.distributed")

INSTALL_HINT = "pip install 'layerlens[ray]' (or pip install -r requirements-ray.txt)"
LOCAL = "local"  # the address that starts a local Ray sized to this machine


def require_ray() -> Any:
    """The ``ray`` module, or one clear sentence saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise LayerLensError(f"Running a sweep on Ray needs the ray package, which is not installed: "
                             f"{INSTALL_HINT}.") from exc
    return ray


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model: ``source`` (a folder every worker can read, a hub id its cache holds,
    or ``default``), the driver's ``dtype`` (the weights must be the same), revision, remote code."""

    source: str
    dtype: str
    revision: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def of(cls, info: Any, *, trust_remote_code: bool = False) -> ModelSpec:
        """The spec of a loaded model (:class:`layerlens.loading.ModelInfo`): a folder as an absolute path,
        the bundled default and hub ids as they were given."""
        source = info.model
        if source != DEFAULT_MODEL_ID and Path(info.source_path).is_dir():
            source = str(Path(info.source_path).resolve())
        return cls(source, info.dtype, info.revision, trust_remote_code)


def prefix_groups(plans: Sequence[Any], n: int) -> list[list[int]]:
    """Indices of ``plans`` in the prefix-reuse order, cut into at most ``n`` contiguous groups of about
    equal cost (layer passes with reuse): plans sharing a pruned prefix stay together except at a cut,
    where the next group recomputes the prefix once."""
    steps = schedule_reuse(list(plans), None)
    if not steps:
        return []
    n = max(1, min(n, len(steps)))
    total = sum(s.layer_passes for s in steps)
    groups: list[list[int]] = [[]]
    acc = 0
    for step in steps:
        if groups[-1] and len(groups) < n and acc >= total * len(groups) / n:
            groups.append([])
        groups[-1].append(step.plan_index)
        acc += step.layer_passes
    return groups


def _portable(task: Any) -> Any:
    """The task as sent to the workers: a KL reference (:meth:`layerlens.evaluation.PerplexityTask.keep_reference`)
    travels without the driver's output head (the vocabulary matrix, often 100+ MB); each worker puts its own
    back, the same weights (checked by fingerprint) on its own device."""
    ref = getattr(task, "reference", None)
    if ref is None or not dataclasses.is_dataclass(ref) or getattr(ref, "head", None) is None:
        return task
    out = copy.copy(task)
    out.reference = dataclasses.replace(ref, head=None)
    return out


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), "")
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


class SweepWorker:
    """A Ray actor (made remote by :class:`RayExecutor`): the model loaded once, work items run in a thread
    so that every finished point can be collected (:meth:`next`) while the next one computes."""

    def __init__(self, spec: ModelSpec, device: str, threads: int, point_delay: float = 0.0) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.spec: ModelSpec | None = None
        self.point_delay = point_delay
        self.tasks: dict[str, Any] = {}
        self.out: queue.Queue = queue.Queue()
        self._use(spec)

    def _use(self, spec: ModelSpec) -> None:
        """Hold the model of ``spec`` (a study's items name theirs): kept while items of that model come,
        replaced (one model in memory at a time) when an item names another."""
        if spec == self.spec:
            return
        from .loading import load_model
        from .surgery import private_view

        self.model = self.tokenizer = self.spec = None  # free the previous model before loading the next
        self.tasks.clear()  # tasks hold references to the previous model's output head
        if self.device == "cuda":
            torch.cuda.empty_cache()
        loaded = load_model(spec.source, revision=spec.revision, dtype=spec.dtype, device=self.device,
                            trust_remote_code=spec.trust_remote_code)
        self.model = private_view(loaded.model).eval()
        self.tokenizer = loaded.tokenizer
        self.fingerprint = model_fingerprint(self.model)
        self.spec = spec

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "fingerprint": self.fingerprint,
                "threads": torch.get_num_threads()}

    def submit(self, item: dict[str, Any]) -> None:
        self.out = queue.Queue()
        threading.Thread(target=self._run, args=(item, self.out), daemon=True).start()

    def next(self) -> list[tuple]:
        """Block until something finished; everything that has (points, then "done" or "error")."""
        items = [self.out.get()]
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self.out.get_nowait())
        return items

    def _task(self, ref: Any) -> Any:
        import ray

        key = ref.hex()
        if key not in self.tasks:
            if len(self.tasks) >= 8:
                self.tasks.clear()
            task = ray.get(ref)
            ref_ = getattr(task, "reference", None)
            if ref_ is not None and dataclasses.is_dataclass(ref_) and getattr(ref_, "head", 1) is None:
                from .evaluation import output_head

                task.reference = dataclasses.replace(ref_, head=output_head(self.model)[0])
            self.tasks[key] = task
        return self.tasks[key]

    def _run(self, item: dict[str, Any], out: queue.Queue) -> None:
        from .sweep import _run_task, _Unit, heal_and_evaluate

        try:
            if self.threads:
                torch.set_num_threads(self.threads)
            if item.get("spec") is not None and item["spec"] != self.spec:  # a study's next model
                self._use(item["spec"])
                mine = {k: v for k, v in self.fingerprint.items() if k != "device"}
                if mine != item["expected"]:
                    out.put(("refused", f"The Ray worker on {socket.gethostname()} loaded '{self.spec.source}' "
                             "with other weights, config or dtype than the model this sweep started with; give "
                             "every worker the same model files."))
                    return
            tasks = [self._task(r[0]) for r in item["tasks"]]
            triples = zip(item["task_of"], item["plans"], item["keys"], strict=True)
            units = [_Unit(tasks[ti], plan, key) for ti, plan, key in triples]
            index = {id(u): i for i, u in enumerate(units)}

            def persist(unit: Any) -> None:
                out.put(("point", index[id(unit)], unit.result, unit.seconds))
                if self.point_delay:
                    time.sleep(self.point_delay)

            if item["kind"] == "task":
                config = item["config"]
                hidden = getattr(self.model.config, "hidden_size", None) or getattr(self.model.config, "n_embd",
                                                                                    None) or 0
                peak, passes, scratch = _run_task(self.model, tasks[0], units, config, hidden, persist)
                out.put(("done", {"kind": tasks[0].kind, "peak": peak, "passes": passes, "scratch": scratch}))
            else:
                import ray

                heal_texts, eval_texts = ray.get(item["texts"][0])
                heal_and_evaluate(self.model, self.tokenizer, item["plans"][0], heal_texts, eval_texts, item["heal"],
                                  None, units, persist)
                out.put(("done", None))
        except BaseException as exc:  # noqa: BLE001 - reported to the driver, which retries or gives up
            out.put(("error", _reason(exc)))


@dataclass
class _Item:
    """Units sent to one actor together: a prefix group of one task, or one plan to heal."""

    kind: str  # "task" or "heal"
    units: list[Any]
    heal: tuple | None = None  # (plan, heal_texts, eval_texts, HealConfig)
    done: set[int] = field(default_factory=set)

    def rest(self) -> list[Any]:
        return [u for i, u in enumerate(self.units) if i not in self.done]


@dataclass
class _Actor:
    handle: Any
    info: dict[str, Any] | None = None
    spec: ModelSpec | None = None  # the model it was started with (it switches when an item names another)


class RayExecutor:
    """Computes a sweep's points on Ray actors (see the module docstring). Use it as a context manager, or
    call :meth:`close`; it is kept open across sweeps of the same model (the actors keep it loaded).

    ``address``: None or ``"local"`` starts a local Ray sized to the machine (or uses the one this process
    already started); otherwise the cluster to join. ``workers``: how many actors (default: one per GPU,
    else one per ``cpus_per_worker`` CPUs). ``gpus``: None uses GPUs when the cluster has some; False never.
    ``max_retries``: attempts after the first before a point is given up. ``chunks_per_worker``: prefix
    groups per task and actor (more balances better, fewer shares more prefixes). ``point_delay``:
    seconds each actor waits after a point (for tests and demonstrations of fault tolerance).
    ``init_kwargs`` go to ``ray.init`` (e.g. ``runtime_env``).
    """

    def __init__(self, spec: ModelSpec, address: str | None = None, *, workers: int | None = None,
                 gpus: bool | None = None, cpus_per_worker: int = 1, max_retries: int = 2,
                 chunks_per_worker: int = 1, point_delay: float = 0.0, start_timeout: float = 600.0,
                 init_kwargs: dict[str, Any] | None = None, shutdown: bool = True) -> None:
        if workers is not None and workers < 1:
            raise LayerLensError(f"`workers` must be at least 1 (got {workers}).")
        if cpus_per_worker < 1:
            raise LayerLensError(f"`cpus_per_worker` must be at least 1 (got {cpus_per_worker}).")
        self.spec, self.address, self.workers, self.gpus = spec, address, workers, gpus
        self.cpus_per_worker, self.max_retries, self.chunks_per_worker = cpus_per_worker, max_retries, chunks_per_worker
        self.point_delay, self.start_timeout = point_delay, start_timeout
        self.init_kwargs, self.shutdown = dict(init_kwargs or {}), shutdown
        self.device_type: str | None = None
        self.actors: dict[int, _Actor] = {}  # live (started or starting) actors by a serial number
        self.retried = 0  # points sent again after their actor died or raised (for tests and logs)
        self.replaced = 0
        self._serial = 0
        self._started_ray = False
        self._ray: Any = None
        self._remote: Any = None

    # -------------------------------------------------------------------------------------- connection

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _connect(self) -> Any:
        if self._ray is not None:
            return self._ray
        ray = require_ray()
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                          configure_logging=True) | self.init_kwargs
            address = None if self.address in (None, LOCAL) else self.address
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as exc:
                raise LayerLensError(f"Could not join the Ray cluster at {address} ({_reason(exc)}); "
                                     "start the cluster with `ray start` on its head node and give the address it prints.") from exc
            self._started_ray = True
        self._ray = ray
        gpus = float(ray.cluster_resources().get("GPU", 0))
        self.device_type = "cuda" if gpus >= 1 and self.gpus is not False else "cpu"
        return ray

    def use(self, spec: ModelSpec) -> None:
        """Compute the next sweeps' points with the model of ``spec`` (a study: several models, one after
        another). Running actors are kept; each loads the new model at its first item of it, and keeps it."""
        self.spec = spec

    def key_identity(self, identity: dict[str, Any]) -> dict[str, Any]:
        """The model identity the sweep keys points by: the driver's, on the workers' device type."""
        self._connect()
        return identity | {"device": self.device_type}

    def _slots(self, ray: Any) -> int:
        if self.workers is not None:
            return self.workers
        res = ray.cluster_resources()
        if self.device_type == "cuda":
            return max(int(res.get("GPU", 0)), 1)
        return max(int(res.get("CPU", 1) // self.cpus_per_worker), 1)

    def _new_actor(self, ray: Any) -> tuple[int, Any]:
        options: dict[str, Any] = {"num_cpus": self.cpus_per_worker, "max_restarts": 0, "max_task_retries": 0}
        if self.device_type == "cuda":
            options["num_gpus"] = 1
        if self._remote is None:
            self._remote = ray.remote(SweepWorker)
        remote = self._remote.options(**options)
        handle = remote.remote(self.spec, self.device_type, self.cpus_per_worker, self.point_delay)
        self._serial += 1
        self.actors[self._serial] = _Actor(handle, spec=self.spec)
        return self._serial, handle.ready.remote()

    def _kill(self, serial: int) -> None:
        actor = self.actors.pop(serial, None)
        if actor is not None and self._ray is not None:
            with contextlib.suppress(Exception):
                self._ray.kill(actor.handle, no_restart=True)

    def close(self) -> None:
        """Kill the actors (their work in progress is lost; finished points are persisted) and shut down a
        Ray this executor started."""
        for serial in list(self.actors):
            self._kill(serial)
        if self._started_ray and self.shutdown and self._ray is not None:
            with contextlib.suppress(Exception):
                self._ray.shutdown()
            self._ray, self._started_ray, self._remote = None, False, None

    def worker_pids(self) -> list[int]:
        """Process ids of the actors that are ready (for tests that kill one)."""
        return [a.info["pid"] for a in self.actors.values() if a.info is not None]

    # -------------------------------------------------------------------------------------------- work

    def run(self, model: torch.nn.Module, tasks: Sequence[Any], todo: Sequence[Sequence[Any]],
            heals: Sequence[tuple], config: Any, persist: Any) -> tuple[dict[str, int], int, int]:
        """Compute ``todo[ti]`` (units of ``tasks[ti]``) and the healings ``(plan, units, heal_texts,
        eval_texts, HealConfig)``, calling ``persist(unit)`` on the driver for each finished unit; a unit
        given up gets ``error``. Returns the sweep's stats: most states held per task kind, layer passes
        run, layer passes from scratch. Any exception (Ctrl-C included) closes the executor first."""
        try:
            return self._run(model, tasks, todo, heals, config, persist)
        except BaseException:
            self.close()
            raise

    def _run(self, model: torch.nn.Module, tasks: Sequence[Any], todo: Sequence[Sequence[Any]],
             heals: Sequence[tuple], config: Any, persist: Any) -> tuple[dict[str, int], int, int]:
        ray = self._connect()
        items: deque[_Item] = deque(_Item("heal", list(units), (plan, ht, et, hc)) for plan, units, ht, et, hc in heals)
        slots = self._slots(ray)
        groups = []
        for units in todo:
            for idx in prefix_groups([u.plan for u in units], slots * max(self.chunks_per_worker, 1)):
                groups.append(_Item("task", [units[i] for i in idx]))
        items.extend(sorted(groups, key=lambda it: -sum(u.plan.num_layers_after for u in it.units)))
        held: dict[str, int] = {}
        passes = scratch = 0
        if not items:
            return held, passes, scratch
        task_of = {id(t): i for i, t in enumerate(tasks)}
        refs = [ray.put(_portable(t)) for t in tasks]
        texts_refs: dict[int, Any] = {}
        expected = {k: v for k, v in model_fingerprint(model).items() if k != "device"}

        starting: dict[Any, int] = {a.handle.ready.remote(): s for s, a in self.actors.items() if a.info is None}
        for _ in range(max(slots - len(self.actors), 0)):
            serial, ready = self._new_actor(ray)
            starting[ready] = serial
        idle = [s for s, a in self.actors.items() if a.info is not None]
        inflight: dict[Any, tuple[int, _Item]] = {}
        attempts: Counter[str] = Counter()
        budget = 2 * slots  # actors that may be replaced
        last_death = ""
        waited_since = time.monotonic()

        def payload(item: _Item) -> dict[str, Any]:
            units = item.units
            out = {"kind": item.kind, "plans": [u.plan for u in units], "keys": [u.key for u in units],
                   "spec": self.spec, "expected": expected}
            if item.kind == "task":
                ti = task_of[id(units[0].task)]
                return out | {"tasks": [[refs[ti]]], "task_of": [0] * len(units), "config": config}
            plan, heal_texts, eval_texts, heal = item.heal
            if id(heal_texts) not in texts_refs:
                texts_refs[id(heal_texts)] = ray.put((heal_texts, eval_texts))
            return out | {"tasks": [[refs[task_of[id(u.task)]]] for u in units], "task_of": list(range(len(units))),
                          "texts": [texts_refs[id(heal_texts)]], "heal": heal}

        def give_back(item: _Item, reason: str) -> None:
            rest = item.rest()
            if not rest:
                return
            blamed = rest if item.kind == "heal" else rest[:1]
            attempts[blamed[0].key] += 1
            if attempts[blamed[0].key] > self.max_retries:
                for u in blamed:
                    u.error = f"failed {attempts[blamed[0].key]} times: {reason}"
                log.warning("giving up on %d point(s): %s", len(blamed), reason)
                rest = [u for u in rest if all(u is not b for b in blamed)]
            if rest:
                self.retried += len(rest)
                items.appendleft(_Item(item.kind, rest, item.heal))

        def lost(serial: int, exc: BaseException) -> None:
            nonlocal budget, last_death
            last_death = _reason(exc)
            log.warning("Ray worker %s lost: %s", serial, last_death)
            self._kill(serial)
            if budget > 0:
                budget -= 1
                self.replaced += 1
                new, ready = self._new_actor(ray)
                starting[ready] = new

        while items or inflight:
            while items and idle:
                serial = idle.pop()
                item = items.popleft()
                handle = self.actors[serial].handle
                handle.submit.remote(payload(item))
                inflight[handle.next.remote()] = (serial, item)
            stuck = None  # why the remaining items cannot run: they are given up with this reason
            if not inflight and not starting:
                stuck = f"no Ray worker left ({last_death or 'none could start'})"
            elif not inflight and time.monotonic() - waited_since > self.start_timeout:
                stuck = f"no Ray worker started within {self.start_timeout:g} s"
            if stuck is not None:
                for item in items:
                    for u in item.rest():
                        u.error = stuck
                items.clear()
                break
            ready, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=5.0)
            for ref in ready:
                if ref in starting:
                    serial = starting.pop(ref)
                    try:
                        info = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        self.actors.pop(serial, None)
                        if not self.actors and not starting and not self.replaced:
                            raise LayerLensError(
                                f"The Ray workers could not load the model '{self.spec.source}' "
                                f"({_reason(getattr(exc, 'cause', None) or exc)}); every worker needs it "
                                "at that path (or the hub id in its cache) and layerlens installed.") from exc
                        last_death = _reason(exc)
                        continue
                    mine = {k: v for k, v in info["fingerprint"].items() if k != "device"}
                    if mine != expected and self.actors[serial].spec == self.spec:  # else checked at its first item
                        raise LayerLensError(
                            f"The Ray worker on {info['host']} loaded '{self.spec.source}' with other weights, "
                            "config or dtype than the model this sweep started with; give every worker the "
                            "same model files.")
                    self.actors[serial].info = info
                    idle.append(serial)
                    waited_since = time.monotonic()
                    continue
                serial, item = inflight.pop(ref)
                try:
                    got = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    lost(serial, exc)
                    give_back(item, f"worker died ({_reason(exc)})")
                    continue
                finished = False
                for entry in got:
                    if entry[0] == "point":
                        _, i, result, seconds = entry
                        unit = item.units[i]
                        unit.result, unit.seconds = result, seconds
                        item.done.add(i)
                        persist(unit)
                    elif entry[0] == "refused":
                        raise LayerLensError(entry[1])
                    elif entry[0] == "done":
                        finished = True
                        if entry[1] is not None:
                            kind = entry[1]["kind"]
                            held[kind] = max(held.get(kind, 0), entry[1]["peak"])
                            passes += entry[1]["passes"]
                            scratch += entry[1]["scratch"]
                    else:
                        finished = True
                        give_back(item, entry[1])
                if finished:
                    idle.append(serial)
                    waited_since = time.monotonic()
                else:
                    inflight[self.actors[serial].handle.next.remote()] = (serial, item)
        return held, passes, scratch


def executor_for(address: str | None, spec: ModelSpec, **kwargs: Any) -> RayExecutor | None:
    """The executor a face asks for: None (no address: this process) or a :class:`RayExecutor`
    (``"local"``: a local Ray; anything else: a cluster address). Fails at once when Ray is missing."""
    if address is None:
        return None
    require_ray()
    return RayExecutor(spec, address or LOCAL, **kwargs)


__all__ = ["INSTALL_HINT", "LOCAL", "ModelSpec", "RayExecutor", "SweepWorker", "executor_for", "prefix_groups",
           "require_ray"]
