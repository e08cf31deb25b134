"""The distributed engine: one torch.distributed rank per stage and replica.

Ranks are placed as stages x replicas (placement.py): rank r*K + k is stage
k of replica r, and each replica is a pipeline of K consecutive ranks that
exchanges messages within itself only (its stages' replica groups average
gradients at UPDATE, inside the workers). Below, "rank k" is stage k of one
replica. Rank k runs stage k's action list from the same schedule the sequential
engine runs, iteration after iteration. Sends are non-blocking (``isend``),
so a latency-1 message never holds its sender back; every receive of an
iteration is posted (``irecv``) when the iteration starts and waited for at
its action, so a message sent early lands while the stage computes. Each
boundary has two process groups, one per direction: activations and
gradients never share a stream (on NCCL, a receive queued behind a send on
one stream can deadlock against the neighbour's mirror image).

Every process group is created and used once up front, in one fixed order
on every rank (``_warm_up_groups``). A group whose NCCL communicator is
created or connected at its first use blocks until both ranks reach it; a
first use in mid-training (iteration 1 or 2, the first evaluation) while
other groups' kernels run can deadlock. With the rank's device bound at
``init_process_group`` torch creates the communicators when the groups are
made; the warm-up makes the first use (and gloo's connections) happen here
too, whatever the version does.

Messages travel in one wire layout on both ends (``_to_wire``/``_from_wire``):
default-contiguous, so gloo accepts them, and for ``--channels-last`` the
NHWC tensor's own bytes viewed as an (N, H, W, C) array, so no copy is made
and NCCL cannot deliver NHWC bytes into an NCHW buffer.

Receives are waited with the run's timeout (``FDGBENCH_DIST_TIMEOUT``) on gloo,
whose waits are otherwise unbounded: a rank that stops (SIGSTOP, a hang)
makes its neighbours fail instead of waiting forever. On NCCL the watchdog
enforces the same timeout (the process group's) and tears the group down.

Message shapes are exchanged once up front: rank k receives its input's
(shape, dtype) from rank k-1, runs its stage once on zeros (eval mode, no
gradient) to learn its output's, and passes that on. Gradients have the
shape of the activation they belong to.

Rank 0 owns the run directory; training totals are summed over ranks
(all_reduce), replica 0's per-stage meters gathered, and the test set is
scored by pipelining it through replica 0's stages.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..data import EVAL_BATCH, BatchStream, Normalizer, eval_batches
from ..errors import UserError
from ..evaluation import EvalScore, eval_forward, eval_mode
from ..method import Method
from ..placement import Placement
from ..schedule import COMPUTE, RECVS, SENDS, Action, Op, message_key
from ..stage import StageWorker
from .compute import run_compute
from .launch import check_ranks_fit, dist_timeout, under_torchrun
from .registry import EngineInfo, register_engine
from .trace import Tracer

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class DistributedEngine:
    def __init__(self, method: Method, worker: StageWorker, stage: nn.Module, stream: BatchStream,
                 placement: Placement, input_shape: tuple[int, ...],
                 memory_format: torch.memory_format = torch.preserve_format, tracer: Tracer | None = None):
        self.method, self.worker, self.stage, self.stream = method, worker, stage, stream
        self.workers = [worker]
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if placement.ranks != self.world_size:
            raise ValueError(f"{placement.describe()} on {self.world_size} ranks")
        self.num_stages = placement.stages
        self.k, self.replica = placement.stage_of(self.rank), placement.replica_of(self.rank)
        self.is_primary = self.rank == 0
        self.device, self.amp_dtype, self.memory_format = worker.device, worker.ctx.amp_dtype, memory_format
        self.tracer = tracer
        # One group per boundary and direction in each replica; every rank creates all of them, in one order,
        # and keeps its replica's.
        groups = {}
        for r in range(placement.replicas):
            pairs = [[placement.rank_of(b, r), placement.rank_of(b + 1, r)] for b in range(self.num_stages - 1)]
            # Evaluation has its own groups: training activations may still be in flight when it starts.
            groups[r] = [[dist.new_group(pair) for pair in pairs] for _ in ("act", "grad", "eval")]
        self._act_groups, self._grad_groups, self._eval_groups = groups[self.replica]
        self._scorer = placement.rank_of(self.num_stages - 1, 0)  # replica 0's last stage scores the test set
        self._warm_up_groups()
        # gloo's waits are unbounded unless given a timeout; NCCL's watchdog has the group's (see above).
        self._wait_timeout = dist_timeout() if dist.get_backend() == "gloo" else None
        self._in_spec, self._out_spec = self._exchange_specs(stream.batch_size, input_shape)
        self._inbox: dict[tuple[Op, int], torch.Tensor] = {}
        self._outbox: dict[tuple[Op, int], torch.Tensor] = {}
        self._sends: list[tuple[int, Any, torch.Tensor]] = []  # (iteration, work, tensor kept alive)
        self._in_flight: list[dict[str, Any]] = []  # this iteration's latency-1 sends, for a checkpoint

    # -- set-up ----------------------------------------------------------------------------------

    def _warm_up_groups(self) -> None:
        """Use every group this rank belongs to once, boundary by boundary in
        the same order on every rank (no cycle: rank k waits for boundary k-1
        before it reaches boundary k), so every communicator exists before
        training starts."""
        one = torch.ones(1, device=self.device)
        for b in range(self.num_stages - 1):
            if self.k in (b, b + 1):
                for groups in (self._act_groups, self._grad_groups, self._eval_groups):
                    dist.all_reduce(one, group=groups[b])

    def _wait(self, work) -> None:
        if self._wait_timeout is None:
            work.wait()
        else:
            work.wait(self._wait_timeout)

    def _recv(self, buf: torch.Tensor, src: int, group) -> None:
        self._wait(dist.irecv(buf, src, group=group))

    def _wire_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised receive buffer in the wire layout of ``shape``."""
        if len(shape) == 4 and self.memory_format == torch.channels_last:
            n, c, h, w = shape
            return torch.empty((n, h, w, c), dtype=dtype, device=self.device)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _from_wire(self, buf: torch.Tensor) -> torch.Tensor:
        """The received tensor in the stage's layout (a view, no copy)."""
        if buf.dim() == 4 and self.memory_format == torch.channels_last:
            return buf.permute(0, 3, 1, 2)  # NHWC bytes as an NCHW-shaped channels-last tensor
        return buf

    def _to_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as default-contiguous bytes in the wire layout (no copy
        when it is already in the stage's layout)."""
        if tensor.dim() == 4 and self.memory_format == torch.channels_last:
            return tensor.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return tensor.contiguous()

    def _exchange_specs(self, batch_size: int, input_shape: tuple[int, ...]):
        k, last = self.k, self.num_stages - 1
        in_spec = ((batch_size, *input_shape), torch.float32)
        if k > 0:
            buf = torch.zeros(8, dtype=torch.int64, device=self.device)
            self._recv(buf, self.rank - 1, self._act_groups[k - 1])
            in_spec = _decode_spec(buf)
        out_spec = None
        if k < last:
            with eval_mode([self.stage]):
                out = eval_forward(self.stage, self._zeros(in_spec), self.device, self.amp_dtype)
            out_spec = (tuple(out.shape), out.dtype)
            dist.send(_encode_spec(out_spec, self.device), self.rank + 1, group=self._act_groups[k])
        return in_spec, out_spec

    def _zeros(self, spec) -> torch.Tensor:
        shape, dtype = spec
        x = torch.zeros(shape, dtype=dtype, device=self.device)
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    # -- training --------------------------------------------------------------------------------

    def run_iteration(self, t: int) -> None:
        self._in_flight = []
        plan = self.method.schedule(self.num_stages, t)[self.k]
        posted = {(a.op, a.batch): self._post_recv(a) for a in plan if a.op in RECVS}
        for action in plan:
            start = self.tracer.mark(self.device) if self.tracer is not None else None
            self._run(t, action, posted)
            if self.tracer is not None:
                self.tracer.record(self.k, t, action, start, self.tracer.mark(self.device))
        self._reap_sends(t)

    def _post_recv(self, action: Action):
        if action.op is Op.RECV_ACT:
            spec, src, group = self._in_spec, self.rank - 1, self._act_groups[self.k - 1]
        else:  # a gradient has the shape of the activation it belongs to (times the parts its message joins)
            (shape, dtype), src, group = self._out_spec, self.rank + 1, self._grad_groups[self.k]
            spec = ((shape[0] * self.method.gradient_parts, *shape[1:]), dtype)
        buf = self._wire_buffer(*spec)
        return buf, dist.irecv(buf, src, group=group, tag=_tag(action.op, action.batch))

    def _run(self, t: int, action: Action, posted: dict) -> None:
        b, op = action.batch, action.op
        if op in COMPUTE:
            kinds = {"act": Op.RECV_ACT, "grad": Op.RECV_GRAD}
            produced = run_compute(self.worker, self.k, action, self.stream,
                                   lambda kind: self._inbox.pop((kinds[kind], b), None))
            if produced is not None:
                self._outbox[(produced[0], b)] = produced[1]
        elif op in SENDS:
            tensor = self._outbox.pop((op, b))
            self._send(t, op, b, self._to_wire(tensor))
            if action.latency:  # kept in the stage's layout: a checkpoint restores it through _to_wire again
                self._in_flight.append({"key": message_key(self.k, action), "sent_at": t,
                                        "latency": action.latency, "tensor": tensor})
        else:  # a receive: wait for the buffer posted at the start of the iteration
            buf, work = posted[(op, b)]
            self._wait(work)
            if op is Op.RECV_ACT and self.worker.buffers_inputs:  # into the stage's input buffer
                self.worker.keep_input(b, self._from_wire(buf))
            else:
                self._inbox[(op, b)] = self._from_wire(buf)

    def _send(self, t: int, op: Op, b: int, tensor: torch.Tensor) -> None:
        if op is Op.SEND_ACT:
            dst, group = self.rank + 1, self._act_groups[self.k]
        else:
            dst, group = self.rank - 1, self._grad_groups[self.k - 1]
        self._sends.append((t, dist.isend(tensor, dst, group=group, tag=_tag(op, b)), tensor))

    def _reap_sends(self, t: int) -> None:
        """Forget finished sends; wait for any older than one iteration, which
        bounds how far a stage runs ahead of a slow neighbour."""
        kept = []
        for sent_at, work, tensor in self._sends:
            if sent_at < t:
                self._wait(work)
            elif not work.is_completed():
                kept.append((sent_at, work, tensor))
        self._sends = kept

    # -- read-outs (collective: every rank calls them at the same point) -------------------------

    def train_totals(self) -> torch.Tensor:
        totals = self.worker.metrics.totals()
        dist.all_reduce(totals)
        return totals

    def reset_train_metrics(self) -> None:
        self.worker.metrics.reset()

    def take_meters(self) -> dict[str, float]:
        taken = {f"stage{self.k}_{name}": meter.take() for name, meter in self.worker.meters.items()}
        mine = taken if self.replica == 0 else {}  # replicas' meters measure shards of the same batches
        gathered: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, mine)
        return {key: value for part in gathered for key, value in part.items()}

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer) -> dict[str, float]:
        """Score the test set by pipelining it through replica 0's stages (eval
        mode); the replicas' weights are equal."""
        result: list[Any] = [None]
        if self.replica == 0:
            result[0] = self._evaluate_stage(images, labels, normalizer)
        dist.broadcast_object_list(result, src=self._scorer)
        return result[0]

    def _evaluate_stage(self, images, labels, normalizer) -> dict[str, float] | None:
        last = self.k == self.num_stages - 1
        score, sends = EvalScore(), []
        with eval_mode([self.stage]):
            batches = eval_batches(images, labels, normalizer, EVAL_BATCH) if self.k == 0 else None
            for start in range(0, len(labels), EVAL_BATCH):
                n = min(EVAL_BATCH, len(labels) - start)
                if batches is not None:
                    x, _ = next(batches)
                else:
                    buf = self._wire_buffer((n, *self._in_spec[0][1:]), self._in_spec[1])
                    self._recv(buf, self.rank - 1, self._eval_groups[self.k - 1])
                    x = self._from_wire(buf)
                y = eval_forward(self.stage, x, self.device, self.amp_dtype)
                if last:
                    score.add(y, labels[start:start + n])
                else:
                    y = self._to_wire(y)
                    sends.append((dist.isend(y, self.rank + 1, group=self._eval_groups[self.k]), y))
        for work, _ in sends:
            self._wait(work)
        return score.result() if last else None

    def finish(self, next_t: int) -> None:
        """Stop after iteration ``next_t - 1``: receive (and drop) the messages
        still in flight, those iteration ``next_t`` would have consumed, so
        every send completes; then wait for all ranks."""
        plan = self.method.schedule(self.num_stages, next_t)[self.k]
        for action in plan:
            if action.op in RECVS and action.latency:
                self._wait(self._post_recv(action)[1])
        for _, work, _ in self._sends:
            self._wait(work)
        self._sends.clear()
        dist.barrier()


    # -- checkpoints (between iterations; checkpoint.py) ----------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """This rank's stage and the messages it sent that are still in flight
        (the sender keeps them: the receiver has not taken them yet)."""
        return {"stages": [self.worker.checkpoint_state()], "messages": self._in_flight}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Restore the stage and send the in-flight messages again; the
        receivers post their receives for them in the next iteration, as in
        the interrupted run."""
        (stage_state,) = state["stages"]
        self.worker.restore_state(stage_state)
        self._in_flight = []
        for m in state["messages"]:
            kind, _, _, batch = m["key"]
            tensor = m["tensor"].to(self.device)
            self._send(m["sent_at"], Op.SEND_ACT if kind == "act" else Op.SEND_GRAD, batch, self._to_wire(tensor))
            self._in_flight.append({**m, "tensor": tensor})


def _tag(op: Op, batch: int) -> int:
    return 2 * batch + (op in (Op.SEND_GRAD, Op.RECV_GRAD))


def _encode_spec(spec, device: torch.device) -> torch.Tensor:
    shape, dtype = spec
    if len(shape) > 6:
        raise ValueError(f"activations of rank {len(shape)} are not supported")
    return torch.tensor([len(shape), *shape, *[0] * (6 - len(shape)), DTYPES.index(dtype)], dtype=torch.int64,
                        device=device)


def _decode_spec(buf: torch.Tensor):
    values = buf.tolist()
    return tuple(values[1:1 + values[0]]), DTYPES[values[7]]


def _check(plan, name) -> None:
    """A distributed run's plan: a usable FDGBENCH_DIST_TIMEOUT and (spawned here) enough GPUs on this
    node for its ranks."""
    dist_timeout()  # a bad FDGBENCH_DIST_TIMEOUT is refused here, before any rank starts
    if not under_torchrun():  # spawned here: one GPU per rank, on this node
        device = plan.devices[0]
        try:
            check_ranks_fit(device, plan.placement.ranks, torch.cuda.device_count() if device.type == "cuda" else 0)
        except UserError as exc:  # --device auto picks the GPU wherever there is one, even one too few
            raise UserError(f"{exc}; or {name('device')} cpu") from None


def _describe(run) -> str:
    return (f"distributed engine ({dist.get_backend()}), {run.processes} ranks ({run.placement.describe()}), "
            f"{torch.get_num_threads()} thread(s) each")


register_engine(EngineInfo(
    "distributed", "one torch.distributed rank per stage and replica (gloo on CPU, NCCL on GPU)",
    per_rank=True, check=_check, describe=_describe,
    build=lambda run: DistributedEngine(run.method, run.workers[0], run.stages[0], run.stream, run.placement,
                                        tuple(run.dataset.train_images.shape[1:]), run.memory_format, run.tracer)))
