"""Stage memory: measured during a run, estimated before one.

What a stage keeps (device-independent, counted in bytes of tensor storage):

- state: its weights and buffers, a gradient per trainable weight (they all
  exist at the end of a backward), and its optimizers' state (momentum, Adam
  moments), for the stage and any extra nets a method gives it (DGL's
  auxiliary classifier, DNI's synthetic-gradient net);
- per batch in flight: every storage autograd saved for the backward
  (counted once, however many saved tensors share it: a ReLU's output saved
  by the next conv too), its input and output, and what the staleness mode
  keeps besides (``stash``: a copy of the weights; ``replay``: only the
  input, no graph). Storages of the live weights are not counted again.

The peak of a stage is state + the most it holds at once: graphs x bytes per
graph (+ outputs x bytes per output, for DNI, which keeps a batch's output
until its true gradient arrives), with the counts derived from the method's
schedule (schedule.batches_held). Runs measure it with saved-tensor hooks
during their first iterations (StageProbe, MemoryMonitor); the start-of-run
guard estimates it from one small forward of each stage at two batch sizes,
scaled linearly to the run's batch (estimate, check_fits).
"""
from __future__ import annotations

import contextlib
import copy
import math

import weakref
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .config import RunConfig
from .errors import UserError
from .models import build_model
from .partition import block_output_shapes, build_stages, make_partition
from .plan import Plan, as_plan, check_config
from .schedule import Op, batches_held, held_together, hold_span, release_ops

MiB = 2**20
GiB = 2**30
PROFILE_BATCHES = (2, 4)  # two batch sizes give bytes per image and fixed bytes (>1: BN1d refuses batch 1)
# A process's growth in resident memory over its memory window (peak RSS less RSS before training) over the
# estimate, measured by `bench memory --rss` (paper_tables/results/memory-rss-*.txt): on an Intel Xeon 1.26
# ResNet-1202 batch 16 FDG, 1.30 ResNet-110 batch 128 BP, 1.35 ResNet-110 batch 128 FDG legacy (an AMD EPYC
# gave 1.16, 1.28, 1.34). The rest is autograd's gradient buffers during a backward and pages the allocator
# keeps after frees. The guard budgets the largest of these with a margin.
OVERHEAD = 1.4
RUNTIME_BYTES = int(0.7 * 2**30)  # a new process: torch's libraries and buffers (0.7 GiB RSS measured here)


def _storage_of(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, some subclasses)
        return None


def _storage_keys(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """key -> nbytes of the distinct storages behind ``tensors``. A storage's
    key is the id of its Python object, which torch keeps one of per storage
    while the storage lives (so views share it); unlike data_ptr it also
    tells storages apart on devices without data pointers (meta)."""
    out: dict[int, int] = {}
    for t in tensors:
        s = _storage_of(t)
        if s is not None and s.nbytes():
            out[id(s)] = s.nbytes()
    return out


def _held(worker: Any) -> list[Any]:
    """What a worker keeps: its attributes and its local modules and optimizers
    (StageWorker.add_local), each once."""
    found = [*vars(worker).values()]
    for local in getattr(worker, "locals", {}).values():
        found += [local.module, local.optimizer]
    return list({id(v): v for v in found}.values())


def _modules(worker: Any) -> list[nn.Module]:
    """The stage's module and any extra nets the method's worker keeps."""
    return [v for v in _held(worker) if isinstance(v, nn.Module)]


def _optimizer_tensors(worker: Any) -> list[torch.Tensor]:
    out = []
    for v in _held(worker):
        opt = getattr(v, "sgd", v)  # StageOptimizer wraps a torch SGD (None for a stage without weights)
        if isinstance(opt, torch.optim.Optimizer):
            out += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    return out


def state_bytes(worker: Any) -> dict[str, int]:
    """Weights + buffers, gradients (one per trainable weight) and optimizer
    state of a stage worker and its extra nets."""
    modules = _modules(worker)
    weights = _storage_keys(t for m in modules for t in [*m.parameters(), *m.buffers()])
    trainable = _storage_keys(p for m in modules for p in m.parameters() if p.requires_grad)
    optimizer = _storage_keys(_optimizer_tensors(worker))
    out = {"weights": sum(weights.values()), "grads": sum(trainable.values()), "optimizer": sum(optimizer.values())}
    if getattr(worker, "buffers_inputs", False):  # the activations a replay buffer holds now (dgl-async)
        out["input_buffer"] = sum(_storage_keys(worker.kept.values()).values())
    return out


class StageProbe:
    """Stands in for a stage worker's compute calls (engines call it in the
    worker's place). While ``armed`` it records, per batch, every storage the
    forward saves for the backward (saved_tensors_hooks) plus the forward's
    input and output, as weak references, until the batch's last backward
    (``releases`` per batch: the schedule's BACKWARD/LOCAL count). A storage
    counts as held while the stage still holds a batch that recorded it and
    something (a graph, the staleness store, a method's own dict) keeps it
    alive; a storage the previous stage also keeps (the input, on the
    sequential engine) stops counting here when this stage is done with it.
    After each forward it samples the bytes held, so ``peak_held`` is the
    most the stage held at once (forwards are where the count peaks)."""

    def __init__(self, worker: Any, releases: int = 1):
        self.worker = worker
        self.releases = max(1, releases)
        self.armed = False
        self.peak_held = 0
        self._batches: dict[int, dict[int, tuple[weakref.ref, int]]] = {}
        self._released: dict[int, int] = {}
        self._recording: dict[int, tuple[weakref.ref, int]] | None = None

    def forward(self, batch: int, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        if not self.armed:
            return self.worker.forward(batch, x, labels)
        self._recording = self._batches.setdefault(batch, {})
        self._add(x)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                out = self.worker.forward(batch, x, labels)
            if out is not None:
                self._add(out)
        finally:
            self._recording = None
        self.peak_held = max(self.peak_held, self.held_bytes())
        return out

    def backward(self, batch: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        out = self.worker.backward(batch, grad)
        self._release(batch)
        return out

    def local_backward(self, batch: int) -> torch.Tensor | None:
        out = self.worker.local_backward(batch)
        self._release(batch)
        return out

    def update(self) -> None:
        self.worker.update()

    def _release(self, batch: int) -> None:
        if batch not in self._batches:
            return
        self._released[batch] = self._released.get(batch, 0) + 1
        if self._released[batch] >= self.releases:
            del self._batches[batch], self._released[batch]

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._add(t)
        return t

    def _add(self, t: torch.Tensor) -> None:
        s = _storage_of(t)
        if s is not None and s.nbytes() and self._recording is not None:
            self._recording[id(s)] = (weakref.ref(s), s.nbytes())

    def held_bytes(self) -> int:
        """Bytes of the held batches' storages still alive, less the live weights'."""
        own = _storage_keys(t for m in _modules(self.worker) for t in [*m.parameters(), *m.buffers()])
        alive: dict[int, int] = {}
        for entries in self._batches.values():
            for key, (ref, nbytes) in entries.items():
                # Alive means the same object (a dead storage's id can be reused by another).
                if ref() is not None and key not in own:
                    alive[key] = nbytes
        return sum(alive.values())

    def disarm(self) -> None:
        self.armed = False
        self._batches.clear()
        self._released.clear()


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def buffer_fill(workers: list[Any], stage_indices: list[int]) -> int:
    """Iterations until every input buffer (dgl-async) is full: stage k's
    first activation arrives at iteration k, then one per iteration at most."""
    return max((k + w.kept_size for k, w in zip(stage_indices, workers) if w.buffers_inputs), default=0)


class MemoryMonitor:
    """Measures each stage's memory in a run: hooks armed during the first
    ``window`` iterations this process runs (the steady state's peak is
    reached once the pipeline has filled: hold_span iterations, twice that
    after a resume, whose rebuilt batches were not recorded); the hooks cost
    a little on every forward, so they are off afterwards. On CUDA also
    torch.cuda.max_memory_allocated per device since the first iteration."""

    def __init__(self, workers: list[Any], stage_indices: list[int], devices: list[torch.device], schedule,
                 num_stages: int):
        self.stages = list(stage_indices)
        releases = release_ops(schedule, num_stages)
        self.probes = [StageProbe(w, len(releases[k])) for k, w in zip(stage_indices, workers)]
        for w, probe in zip(workers, self.probes):
            w.memory_probe = probe
        self.devices = [devices[k] for k in stage_indices]
        self.window = 2 * hold_span(schedule, num_stages) + 2 + buffer_fill(workers, stage_indices)
        self._first: int | None = None

    def watch(self, t: int) -> None:
        """Called before iteration t."""
        if self._first is None:
            self._first = t
            for d in dict.fromkeys(self.devices):
                if d.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(d)
        armed = t < self._first + self.window
        for probe in self.probes:
            if probe.armed and not armed:
                probe.disarm()
            probe.armed = armed

    def record(self) -> dict[str, Any]:
        """Per stage: ``stage<k>_memory_bytes`` (state + peak held, measured)
        and its breakdown; on CUDA ``stage<k>_cuda_peak_bytes``, the peak of
        the stage's device (shared by the stages on one device)."""
        out: dict[str, Any] = {}
        for k, probe, device in zip(self.stages, self.probes, self.devices):
            state = state_bytes(probe.worker)
            parts = {**state, "held_peak": probe.peak_held}
            out[f"stage{k}_memory_bytes"] = sum(parts.values())
            out[f"stage{k}_memory"] = parts
            if device.type == "cuda":
                out[f"stage{k}_cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        return out


# -- the estimate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """bytes = fixed + per_image x batch, fitted on two batch sizes."""

    fixed: float
    per_image: float

    @classmethod
    def fit(cls, measured: dict[int, int]) -> "Linear":
        (b1, y1), (b2, y2) = sorted(measured.items())
        per_image = (y2 - y1) / (b2 - b1)
        return cls(y1 - per_image * b1, per_image)

    def at(self, batch: int) -> float:
        return max(0.0, self.fixed + self.per_image * batch)


@dataclass(frozen=True)
class StageEstimate:
    index: int
    state: dict[str, int]
    graph: Linear  # what one batch in flight keeps (graph, input, output, stash copy or replay input)
    output: Linear  # what remains of it after its first backward, until its last (DNI's output)
    holdings: tuple[tuple[int, int], ...]  # maximal (graphs, outputs) held at once (schedule.batches_held)
    kept: Linear = Linear(0.0, 0.0)  # a full input buffer (dgl-async: M received activations)

    def held_bytes(self, batch: int) -> float:
        return (max(g * self.graph.at(batch) + o * self.output.at(batch) for g, o in self.holdings)
                + self.kept.at(batch))

    def peak_bytes(self, batch: int) -> float:
        return sum(self.state.values()) + self.held_bytes(batch)

    def batches(self) -> int:
        """The most graphs held at once."""
        return max(g for g, _ in self.holdings)


def one_process_peak(stages: list[StageEstimate], schedule, batch: int) -> float:
    """Bytes one process running every stage needs at its peak (the
    sequential engine): every stage's state and full input buffer, plus the
    most the stages hold at one moment of the schedule (held_together), which
    for local learning is one stage's graph, not the sum of all stages' peaks."""
    snapshots = held_together(schedule, len(stages))
    held = max((sum(g * s.graph.at(batch) + o * s.output.at(batch) for (g, o), s in zip(snap, stages))
                for snap in snapshots), default=0.0)
    return sum(sum(s.state.values()) + s.kept.at(batch) for s in stages) + held


def estimate(run: Plan | RunConfig, image_shape: tuple[int, ...], num_classes: int, steps: int | None = None
             ) -> list[StageEstimate]:
    """Each stage's memory for ``run`` (a plan, or a config checked into one), without training: the
    stages built on the CPU (a cheap partition in place of a measured one),
    one forward of each at two small batches recording what it keeps, then that batch's backward(s) and a step (the
    optimizer's state); bytes per batch scaled linearly to the run's batch,
    batches held from the schedule (in a run of ``steps`` iterations, if
    given: a short run never fills a deep pipeline). In fp32: under --amp bf16 autocast keeps
    some activations in half the bytes, so the estimate errs high."""

    plan = as_plan(run)
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    # On the CPU, one thread: fastest at these batches (the meta device's Python shape functions are slower
    # still: 30 s for ResNet-1202 against 5). The caller's random stream is left alone.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            return _estimate(plan, image_shape, num_classes, cpu, steps)
    finally:
        torch.set_num_threads(threads)


def _estimate(plan: Plan, image_shape, num_classes: int, cpu: torch.device, steps: int | None
              ) -> list[StageEstimate]:
    cfg, method, num_stages = plan.cfg, plan.method, plan.num_stages
    model = build_model(cfg.model, num_classes)
    cheap = "uniform" if cfg.partition in ("time", "balanced") else cfg.partition
    partition = make_partition(model, num_stages, cheap, list(cfg.split_at) if cfg.split_at else None,
                               sample=torch.zeros(2, *image_shape))
    block_shapes = block_output_shapes(model, tuple(image_shape))
    stages = build_stages(model, partition)
    shapes = [block_shapes[r.stop - 1] for r in partition.ranges()]
    holdings = batches_held(method.schedule, num_stages, steps)
    releases = release_ops(method.schedule, num_stages)
    out = []
    for k, stage in enumerate(stages):
        worker = method.make_worker(plan.stage_context(k, stage, partition, block_shapes, num_classes, cpu))
        out.append(_measure_stage(k, worker, tuple(image_shape) if k == 0 else shapes[k - 1], shapes[k],
                                  num_classes, releases[k], holdings[k], method.gradient_parts))
    return out


def estimate_built(run) -> list[StageEstimate]:
    """Each stage's memory for a run built on the sequential engine
    (train.Run, before it trains), measured on the run's own workers where
    they are (its devices, precision and partition): each runs the profile
    batches as ``estimate``'s copies do, its state is read, and it is put
    back as it was built (_put_back), so the run trains exactly as if it had
    not been measured. Nothing is built again for the measurement."""
    plan = run.plan
    holdings = batches_held(plan.method.schedule, plan.num_stages, run.total_steps)
    releases = release_ops(plan.method.schedule, plan.num_stages)
    image_shape = tuple(run.dataset.train_images.shape[1:])
    shapes = run.output_shapes
    cuda = [d for d in dict.fromkeys(run.devices) if d.type == "cuda"]
    out = []
    with torch.random.fork_rng(devices=cuda):  # the run's random streams are left alone
        for k, worker in zip(run.stage_indices, run.workers):
            with _put_back(worker):
                out.append(_measure_stage(k, worker, image_shape if k == 0 else shapes[k - 1], shapes[k],
                                          run.dataset.num_classes, releases[k], holdings[k],
                                          plan.method.gradient_parts))
    return out


@contextlib.contextmanager
def _put_back(worker: Any) -> Iterator[None]:
    """Leave a freshly built ``worker`` as it was: its checkpoint state
    (weights, BatchNorm statistics, optimizers, whatever it carries from one
    iteration to the next), no gradients, empty training metrics and meters."""
    saved = copy.deepcopy(worker.checkpoint_state())
    try:
        yield
    finally:
        worker.restore_state(saved)
        for module in _modules(worker):
            for p in module.parameters():
                p.grad = None
        worker.metrics.reset()
        for meter in worker.meters.values():
            meter.take()


def _measure_stage(k: int, worker, in_shape: tuple[int, ...], out_shape: tuple[int, ...], num_classes: int,
                   releases: list[Op], holdings, gradient_parts: int) -> StageEstimate:
    """Stage ``k``'s estimate from its worker: what one batch keeps at two
    small batches (times the micro-batches or replicas a batch is split
    into, so each part is a batch of at least two), fitted linearly, and
    the state after a step. ``gradient_parts``: the method's (Method.gradient_parts)."""
    graph, output = {}, {}
    split = worker.probe_batch_multiple * getattr(worker, "replicas", 1)
    for batch in (b * split for b in PROFILE_BATCHES):
        graph[batch], output[batch] = _profile_batch(worker, batch, in_shape, out_shape, num_classes, releases,
                                                     gradient_parts)
    # A full replay buffer: M activations of the stage's input, counted at float32 (bf16 ones take half).
    kept = Linear(0.0, worker.kept_size * math.prod(in_shape) * 4.0) if worker.buffers_inputs else Linear(0, 0)
    return StageEstimate(k, state_bytes(worker), Linear.fit(graph), Linear.fit(output), holdings, kept)


def _profile_batch(worker, batch: int, in_shape, out_shape, num_classes: int, releases: list[Op],
                   gradient_parts: int = 1) -> tuple[int, int]:
    """(bytes one batch keeps after its forward, bytes left after its first
    release), then finish the batch and step (creating optimizer state); a
    backward's message joins ``gradient_parts`` tensors of the output's shape."""
    probe = StageProbe(worker, len(releases))
    probe.armed = True
    x = torch.randn(batch, *in_shape, device=worker.device)
    labels = torch.arange(batch, device=worker.device) % num_classes
    out = probe.forward(0, x, labels)
    del x
    # The output counts while it is the message in flight: for most stages it is their graph's own output
    # (counted once), for a micro-batched one the joined copy it sends.
    graph, left = probe.held_bytes(), 0
    del out
    for i, op in enumerate(releases):
        if op is Op.LOCAL:
            probe.local_backward(0)
        else:
            message = None if worker.ctx.is_last else torch.zeros(batch * gradient_parts, *out_shape,
                                                                  device=worker.device)
            probe.backward(0, message)
        if i == 0:
            left = probe.held_bytes()
    probe.update()
    probe.disarm()
    return graph, left


# -- the start-of-run guard -----------------------------------------------------------------------


def available_bytes(device: torch.device) -> int:
    """Memory free for a new run on ``device``: MemAvailable (psutil if
    installed, else /proc/meminfo) on a CPU, free memory on a GPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: do not refuse


def memory_pools(plan: Plan, num_stages: int) -> list[str]:
    """Which memory each stage draws on: its device on the sequential engine;
    on the distributed engine this machine's RAM for every CPU rank (spawned
    here), or the rank's own GPU."""

    if plan.engine.per_rank:  # rank k's device, as engines.launch.rank_device picks it (check_ranks_fit came first)
        base = plan.devices[0]
        devices = [torch.device("cuda", k) if base.type == "cuda" else base for k in range(num_stages)]
    else:
        devices = list(plan.devices[:num_stages])
    return [str(torch.device(d.type, d.index if d.index is not None else 0)) if d.type == "cuda" else d.type
            for d in devices]


@dataclass(frozen=True)
class Need:
    pool: str
    needed: float
    available: int
    stages: tuple[int, ...]

    @property
    def fits(self) -> bool:
        return self.needed <= self.available


def needs(plan: Plan, stages: list[StageEstimate], data_bytes: int, available=None, batch: int | None = None,
          data_placed: bool = False) -> list[Need]:
    """Per memory pool: OVERHEAD x the stages' summed peaks, plus the data's
    uint8 copy and a process's runtime wherever a process still to start
    puts them (this process, already running, is counted in what is free,
    and so is its data once ``data_placed``: a built run's)."""

    available = available or available_bytes
    batch = batch or plan.cfg.batch_size  # (another batch size: what would fit)
    replicas = plan.placement.replicas
    per_rank = plan.engine.per_rank
    if per_rank and replicas > 1:
        # A rank per stage and replica, each on its own shard of the batch. (The sequential engine replays the
        # shards through one copy of each stage, holding what the whole batch would.)
        batch = max(1, batch // replicas)
        stages = stages * replicas
    pools = memory_pools(plan, len(stages))
    if per_rank:  # one new process per stage (rank), each with the data on its device
        extra = [data_bytes + RUNTIME_BYTES] * len(stages)
    else:  # this process; the data goes to stage 0's device (already here on a CPU)
        extra = [data_bytes if k == 0 and pools[0] != "cpu" and not data_placed else 0 for k in range(len(stages))]
    out = []
    for pool in dict.fromkeys(pools):
        mine = tuple(k for k, p in enumerate(pools) if p == pool)
        needed = OVERHEAD * sum(stages[k].peak_bytes(batch) for k in mine) + sum(extra[k] for k in mine)
        out.append(Need(pool, needed, available(torch.device(pool)), mine))
    return out


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f} GiB"


def check_fits(run: Plan | RunConfig, image_shape: tuple[int, ...], num_classes: int, data_bytes: int = 0,
               steps: int | None = None, available=None, built: list[StageEstimate] | None = None) -> None:
    """Refuse, in one line, a run (of ``steps`` iterations) whose estimated
    stage peaks exceed the memory free where they go; name the changes that
    would fit. ``available(device)`` defaults to available_bytes. ``built``:
    the stages of the run built in this process, measured (estimate_built),
    its data in place already; else the stages are estimated here."""
    available = available or available_bytes
    plan = as_plan(run)
    cfg = plan.cfg
    placed = built is not None
    stages = built if placed else estimate(plan, image_shape, num_classes, steps)
    short = [n for n in needs(plan, stages, data_bytes, available, data_placed=placed) if not n.fits]
    if not short:
        return
    worst = max(short, key=lambda n: n.needed - n.available)
    per_stage = " + ".join(f"{stages[k % len(stages)].peak_bytes(cfg.batch_size) / GiB:.1f}" for k in worst.stages)

    staleness = plan.method.option_values().get("staleness")
    mode = f"staleness {staleness}, " if staleness else ""
    suggestions = _what_fits(plan, stages, image_shape, num_classes, data_bytes, steps, available, placed)
    raise UserError(
        f"{cfg.method} {cfg.model} K={cfg.splits} batch {cfg.batch_size} ({mode}{cfg.engine} engine) needs about "
        f"{gib(worst.needed)} on {worst.pool} (stages {per_stage} GiB held and state, x{OVERHEAD} for backward "
        f"buffers and the allocator) but {gib(worst.available)} is available; would fit: {'; '.join(suggestions)}; "
        f"--ignore-memory-check runs it anyway")


def _fits(plan: Plan, stages, data_bytes, available, batch: int | None = None, data_placed: bool = False
          ) -> tuple[bool, float]:
    found = needs(plan, stages, data_bytes, available, batch, data_placed)
    return all(n.fits for n in found), max(n.needed for n in found)


def _alternative(cfg: RunConfig) -> Plan | None:
    """The plan of a change _what_fits would suggest, or None where the change is not a valid run."""
    try:
        return check_config(cfg)
    except UserError:
        return None


def _what_fits(plan: Plan, stages, image_shape, num_classes, data_bytes, steps, available, placed: bool
               ) -> list[str]:
    """The single changes that make the estimate fit: --staleness replay, a
    larger K (where stages go to separate GPUs), a smaller batch, one device
    per stage, and always: a device with enough free. ``placed``: the run is
    built here, its data in place (needs)."""

    cfg = plan.cfg
    out = []
    staleness = next((o for o in plan.method.options if o.name == "staleness"), None)
    if staleness and "replay" in (staleness.choices or ()) and cfg.method_options.get("staleness") != "replay":
        alt = _alternative(replace(cfg, method_options={**cfg.method_options, "staleness": "replay"}))
        ok, need = (_fits(alt, estimate(alt, image_shape, num_classes, steps), data_bytes, available, None, placed)
                    if alt else (False, 0))
        if ok:
            out.append(f"--staleness replay ({gib(need)})")
    with torch.device("meta"):
        blocks = len(build_model(cfg.model, num_classes))
    pools = memory_pools(plan, len(stages))
    # More stages help only where they spread over more memory: on one pool the sum over stages only
    # grows with K (as many activations, more batches in flight), so it is not tried there.
    spread = plan.engine.per_rank and pools[0] != "cpu"
    if spread and plan.num_stages == cfg.splits:  # (dp's K counts replicas: more hold no less each)
        for k in sorted({cfg.splits + 1, 2 * cfg.splits}):
            if k > blocks:
                continue
            alt = _alternative(replace(cfg, splits=k, split_at=None))
            ok, need = (_fits(alt, estimate(alt, image_shape, num_classes, steps), data_bytes, available) if alt
                        else (False, 0))
            if ok:
                out.append(f"--splits {k} ({gib(need)} per GPU)")
                break
    batch = cfg.batch_size // 2
    while batch >= 1:
        ok, need = _fits(plan, stages, data_bytes, available, batch, placed)
        if ok:
            out.append(f"--batch-size {batch} ({gib(need)}; changes the protocol)")
            break
        batch //= 2
    largest = OVERHEAD * max(s.peak_bytes(cfg.batch_size) for s in stages) + data_bytes + RUNTIME_BYTES
    if len(set(pools)) == 1 and len(stages) > 1:
        pool = torch.device(pools[0])
        if largest <= available(pool):
            kind = "GPUs (--engine distributed)" if pool.type == "cuda" else "machines (torchrun)"
            out.append(f"{len(stages)} {kind} like this one, one stage each ({gib(largest)} for the largest)")
    worst = max(needs(plan, stages, data_bytes, available, data_placed=placed), key=lambda n: n.needed - n.available)
    out.append(f"a device with {gib(worst.needed)} free")
    return out
