"""``autopar.parallelize`` and ``Engine.step``: compose the parallel axes around one model.

The order of one step, and why:
1. slice the rank's batch into microbatches (gradient accumulation inside one call);
2. forward + backward each, with each microbatch's loss weighted by its share of the global
   batch's items (``runtime.loss_weights``: labels counted over every rank before any forward),
   so every gradient sync afterwards is a plain sum (see ``runtime.params``);
3. sum gradients over the axes each parameter is replicated on (``data_parallel``: buckets
   reduced from backward hooks, so most of it overlaps step 2);
4. clip against the global norm of the serial model;
5. optimizer step, zero gradients;
6. return the global mean loss, the same float on every rank.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import remember_aliases
from .data_parallel import GradBuckets, check_options
from .intra_layer.autochain import layout_pending
from .intra_layer.comm import gather_last
from .intra_layer.vocab_loss import causal_lm_loss as vocab_causal_lm_loss
from .intra_layer.vocab_loss import vocab_parallel_head
from .offload import ActivationMeter, RecomputePolicy, apply_recompute, build_stepper
from .pipeline import Pipeline
from .runtime.batch import BatchCheck, map_tensors, split_batch
from .runtime.loss_weights import ItemCounter, LossWeights, Scale, label_counter
from .runtime.params import clip_coefficient
from .runtime.precision import Precision, check_precision, drop_grads
from .runtime.state import current_grid

log = logging.getLogger("autopar")

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zerobubble")
OFFLOAD_MODES = (None, "optimizer", "optimizer+step", "params")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]


def _call_model(model: nn.Module, batch: Any) -> Any:
    """The batch conventions: a dict is keyword arguments (Hugging Face, labels included); a
    tuple/list is ``(inputs, target)`` where ``inputs`` may itself be a tuple of positional
    arguments; a bare tensor is the only input."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        inputs = batch[0]
        return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    return model(batch)


def _call_model_without_labels(model: nn.Module, batch: Any) -> Any:
    """``_call_model`` for a model whose loss the engine computes on vocabulary shards: HF's own
    loss would need the full logits."""
    return _call_model(model, {k: v for k, v in batch.items() if k != "labels"})


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule``), else ``model``."""
    from torch._dynamo.eval_frame import OptimizedModule

    return model._orig_mod if isinstance(model, OptimizedModule) else model


class Engine:
    """Owns the (parallelised) model and its optimizer; ``step`` is one full training step."""

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory, *, num_microbatches: int,
                 schedule: str, offload: str | None, loss_fn: LossFn | None,
                 clip_grad_norm: float | None, virtual_stages: int = 1,
                 split_points: Sequence[str] | None = None,
                 recompute: RecomputePolicy | Sequence[int] = False, bucket_mb: float = 25.0,
                 zero: int = 0, precision: str = "fp32", sample_batch: Any = None,
                 loss_items: ItemCounter | None = None, vocab_parallel_loss: bool | None = None) -> None:
        self.grid = current_grid()
        pipelined = self.grid.sizes["pp"] > 1
        # A torch.compile'd model: state, names and checkpoints are the module's own (no
        # "_orig_mod." prefix); calls go through the compiled wrapper.
        self._callee, model = model, _uncompiled(model)
        if pipelined and self._callee is not model:
            raise ValueError("torch.compile(model) with pp > 1: the pipeline splits the module itself; "
                             "pass the uncompiled model (compiling each stage is not supported yet)")
        remember_aliases(model)  # checkpoints name tied weights as the serial model does
        self.model = model
        # One switch, two mechanisms: with pp > 1 the pipeline recomputes whole stages (it owns
        # the block boundaries); with pp = 1 the chosen modules are wrapped in place.
        if pipelined and (callable(recompute) or isinstance(recompute, nn.Module)):
            raise ValueError("with pp > 1, recompute takes True or the list of pipeline stages to "
                             "recompute; per-module policies apply with pp = 1")
        if not pipelined and isinstance(recompute, (list, tuple)):
            raise ValueError(f"recompute={recompute!r}: a list of stages needs pp > 1; with pp = 1 "
                             "use True or a callable policy(name, module) -> bool")
        self.recomputed = [] if pipelined else apply_recompute(self.model, recompute)
        self.num_microbatches = num_microbatches
        self.schedule = schedule
        self.offload = offload
        self.loss_fn = loss_fn
        self.clip_grad_norm = clip_grad_norm
        self.step_count = 0
        self.check_batch = BatchCheck(self.grid)
        # Called once the optimizer exists and its parameters' layout is final (after the first
        # forward when that still splits the pipeline or chains layers), e.g. to load its state.
        self.on_optimizer: list[Callable[[], None]] = []
        # Each microbatch's mean loss enters weighted by its share of the global batch's items.
        if loss_items is None and loss_fn is None:
            loss_items = label_counter(model)
        self.loss_weights = LossWeights(loss_items, self.grid)
        # An HF causal LM whose head cuts the vocabulary over y: loss on the shards, logits
        # never gathered (``intra_layer.vocab_loss``).
        self.vocab_head = vocab_parallel_head(model, vocab_parallel_loss, custom_loss=loss_fn is not None)
        if self.vocab_head is not None:
            self.vocab_head.out_sharded = True
            if self.grid.rank == 0:
                log.info("loss: vocabulary-parallel cross-entropy on %s's shards (y=%d)",
                         type(model).__name__, self.grid.size("y"))
        # Forward (model call + loss) under autocast; fp16 also scales the loss's gradient.
        self.precision = Precision(precision, self.grid)
        self.loss_scaler = self.precision.scaler  # fp16 only: .scale, .skipped_steps
        self._call = self.precision.wrap_call(_call_model if self.vocab_head is None else _call_model_without_labels)
        self._forward_loss = self.precision.wrap_loss(self._loss)
        self.pipeline: Pipeline | None = None
        self._optimizer_factory = optimizer
        self.bucket_mb = bucket_mb
        self.zero = zero
        self.dp: GradBuckets | None = None
        self._accumulated = 0  # step calls made inside no_sync() since the last optimizer step
        self._no_sync_depth = 0
        self._layout_pending = True
        if pipelined:
            # Split first, on the host: other stages' weights are dropped before anything moves
            # to the device, so the device only ever holds this rank's stage.
            self.pipeline = Pipeline(self.model, self.grid, schedule=schedule, num_microbatches=num_microbatches,
                                     virtual_stages=virtual_stages, split_points=split_points,
                                     recompute=recompute, call=self._call, loss=self._forward_loss,
                                     sample_batch=sample_batch)
            self.pipeline.on_weight_grads = self._set_sync
            if self.pipeline.chunk_of is not None:  # split already (sample_batch)
                self.params: list[nn.Parameter] = self.pipeline.params
                self.optimizer: torch.optim.Optimizer = self._make_optimizer(self.params)
                self._layout_pending = False
            else:
                # The user's own optimizer object exists now (LR schedulers attach to it) over
                # every parameter; optimizers create state at their first step, so this costs
                # nothing. The split (first forward) rebuilds it over the stage's parameters.
                self.params = []
                self.optimizer = optimizer([p for p in self.model.parameters() if p.requires_grad])
                self.pipeline.on_split = self._after_split
        else:
            if sample_batch is not None:
                raise ValueError("sample_batch is used to split a pipeline; it needs pp > 1")
            self.model.to(self.grid.device)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = self._make_optimizer(self.params)
            self._layout_pending = layout_pending(self.model)
        self.activation_meter = ActivationMeter(self.model)

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Gradient buckets over ``params``, then the user's optimizer, built by the stepper that
        owns the step for ``offload``, over what the buckets leave this rank to step (its ZeRO
        shards, or the parameters themselves)."""
        tied = [p for _, ps in self.pipeline.tied for p in ps] if self.pipeline is not None else []
        self.dp = GradBuckets(params, self.grid, bucket_mb=self.bucket_mb, zero=self.zero, reduce_last=tied)
        self.stepper = build_stepper(self._optimizer_factory, self.dp.optimizer_params, self.offload, self.grid)
        self.dp.check_optimizer(self.stepper.optimizer)
        return self.stepper.optimizer

    def _after_split(self) -> None:
        """The first forward split the pipeline: build buckets and stepper over this stage's
        parameters, and let the user's optimizer object take over the real one's insides, so
        schedulers attached to it keep working (their per-group settings are carried over)."""
        placeholder = self.optimizer
        self.params = self.pipeline.params
        real = self._make_optimizer(self.params)
        if len(placeholder.param_groups) == len(real.param_groups):
            # Only what a scheduler or the user changed since construction: the stepper's own
            # choices (offload's fused AdamW) must survive.
            unset = object()
            for old, new in zip(placeholder.param_groups, real.param_groups):
                new.update({k: v for k, v in old.items()
                            if k != "params" and placeholder.defaults.get(k, unset) is not v})
        placeholder.__dict__.update(real.__dict__)
        self.stepper.optimizer = placeholder

    def _loss(self, output: Any, batch: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, batch)
        if self.vocab_head is not None:
            return vocab_causal_lm_loss(output, batch, self.vocab_head)
        loss = getattr(output, "loss", None)
        if loss is None:
            raise ValueError("the model output has no .loss; pass loss_fn=lambda output, batch: ... "
                             "to autopar.parallelize, or include labels in the batch")
        return loss

    def _micros(self, batch: Any) -> tuple[list[Any], Scale]:
        self.check_batch(batch)
        batch = map_tensors(batch, lambda t: t.to(self.grid.device, non_blocking=True))
        micros = split_batch(batch, self.num_microbatches, "microbatches")
        return micros, self.loss_weights.for_step(micros)

    def forward_backward(self, batch: Any) -> torch.Tensor:
        """Forward and backward over all microbatches of this rank's batch; returns the sum of
        the weighted microbatch losses (detached, on device) without syncing gradients."""
        micros, scale = self._micros(batch)
        if self.pipeline is not None:
            self.pipeline.prepare(micros[0])
            with self.dp.no_sync() if self._no_sync_depth else contextlib.nullcontext():
                return self.pipeline.run(micros, scale)
        total = torch.zeros((), dtype=torch.float64, device=self.grid.device)
        with self.dp.no_sync() if self._no_sync_depth else contextlib.nullcontext():
            for i, micro in enumerate(micros):
                loss = scale(self._forward_loss(self._run_model(micro), micro), i)
                self._set_sync(i == len(micros) - 1)  # only the last backward reduces
                loss.backward()
                total += loss.detach().double()
        return total

    def _run_model(self, batch: Any) -> Any:
        """One model call (pp = 1). While the first forward may still re-lay out layers
        (``intra_layer.autochain``), it runs eagerly even under ``torch.compile``: the detection
        observes it through global hooks and a ``TorchFunctionMode`` that Dynamo cannot trace.
        Later calls are compiled, in the final layout."""
        if self._layout_pending and layout_pending(self.model):
            # Every compile directive ignored for this call (torch.compiler.disable does not
            # reach into a compiled module's own call, nor into compiled submodules), without
            # marking any frame as never to compile; the module itself is observed.
            with torch.compiler.set_stance("force_eager"):
                return self._call(self.model, batch)
        return self._call(self._callee, batch)

    @torch.no_grad()
    def eval_step(self, batch: Any) -> float:
        """The global mean loss of this rank's share of a global batch, as ``step`` computes it,
        without gradients, optimizer step or any change of state (``model.eval()`` meanwhile:
        no dropout, no running-statistics updates). The same float on every rank."""
        was_training = self.model.training
        self.model.eval()
        try:
            micros, scale = self._micros(batch)
            if self.pipeline is not None:
                total = self.pipeline.run(micros, scale, mode="eval")
            else:
                total = torch.zeros((), dtype=torch.float64, device=self.grid.device)
                for i, micro in enumerate(micros):
                    total += scale(self._forward_loss(self._run_model(micro), micro), i).double()
        finally:
            self.model.train(was_training)
        return self._global_loss(total)

    @torch.no_grad()
    def forward(self, batch: Any, broadcast: bool = False) -> Any:
        """The model's output on this rank's batch (in eval mode, no gradients). With pp > 1 it
        exists on the last stage; the other stages get None, or with ``broadcast=True`` a copy
        from the last stage of their pipeline (a pickled object exchange, for metrics)."""
        was_training = self.model.training
        self.model.eval()
        try:
            self.check_batch(batch)
            batch = map_tensors(batch, lambda t: t.to(self.grid.device, non_blocking=True))
            if self.pipeline is None:
                return self._full_logits(self._run_model(batch), batch)
            outputs = self.pipeline.run([batch], lambda loss, i: loss, mode="output")
        finally:
            self.model.train(was_training)
        output = self._full_logits(outputs[0], batch) if outputs else None
        if broadcast:
            box = [map_tensors(output, lambda t: t.cpu()) if output is not None else None]
            dist.broadcast_object_list(box, src=self.grid.ranks("pp")[-1], group=self.grid.group("pp"))
            output = map_tensors(box[0], lambda t: t.to(self.grid.device))
        return output

    def _full_logits(self, output: Any, batch: Any) -> Any:
        """What the serial model returns, where the head returned vocabulary shards: the loss
        (when the batch has labels) and the logits gathered over y."""
        if self.vocab_head is None:
            return output
        if self.loss_fn is None and isinstance(batch, dict) and "labels" in batch:
            output.loss = vocab_causal_lm_loss(output, batch, self.vocab_head)
        output.logits = gather_last(output.logits, self.grid, "y")
        return output

    @property
    def layout_final(self) -> bool:
        """False until the first forward has fixed what this rank holds: the pipeline split
        (pp > 1), or the layers ``auto_parallelize`` chains (``intra_layer.autochain``), whose
        re-layout rewrites weight values in place. Anything that copies weights or loads state
        per parameter waits for it (``on_optimizer``)."""
        return self.optimizer is not None and not self._layout_pending

    def _finish_layout(self) -> None:
        self._layout_pending = False
        self.stepper.pull_params()  # host master weights (offload="optimizer+step") were copied before
        for callback in self.on_optimizer:
            callback()
        self.on_optimizer.clear()

    def _set_sync(self, final: bool) -> None:
        """Before a backward: whether it is the last to add to its parameters' gradients in
        this step, so that complete gradient buckets may start their reduction."""
        self.dp.sync = final

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation across ``step`` calls: inside, ``step`` runs forward and backward
        only, keeps the gradients and returns its batch's global mean loss. The first ``step``
        after the block reduces and applies the mean gradient of all k calls: one serial step on
        their batches put together (equal batch sizes)."""
        # The engine keeps the depth itself: with pp > 1 the gradient buckets only exist after
        # the first step, which may well run inside this block.
        self._no_sync_depth += 1
        try:
            yield
        finally:
            self._no_sync_depth -= 1

    def step(self, batch: Any) -> float:
        """One training step on this rank's share of the global batch (``autopar.shard_batch``).
        Returns the global mean loss, identical on every rank."""
        self.model.train()
        with self.activation_meter:  # measures the first step only (memory_report)
            total = self.forward_backward(batch)
        if not self.layout_final:
            self._finish_layout()
        if self._no_sync_depth:
            self._accumulated += 1
            return self._global_loss(total)
        if self.pipeline is not None:  # before the dp reduction, which may scatter ZeRO shards
            self.pipeline.sync_tied_grads()
        # A host step takes each bucket's gradients as its reduction ends, unless fp16's
        # unscaling still has to change them on the device.
        early = self.stepper.takes_grads_early and self.loss_scaler is None
        self.dp.finish(mean_of=self._accumulated + 1, on_reduced=self.stepper.grads_ready if early else None)
        self._accumulated = 0
        # fp16: unscale before clipping; an overflow anywhere skips the step on every rank.
        if self.loss_scaler is not None and self.loss_scaler.unscale_and_update(self.dp.optimizer_params):
            drop_grads(self.dp.optimizer_params)
        else:
            coef = None if self.clip_grad_norm is None else \
                clip_coefficient(self.dp.optimizer_params, self.clip_grad_norm, self.grid)
            self.stepper.step(grad_scale=coef)  # also clears the gradients
        self.dp.after_step()
        self.step_count += 1
        self.activation_meter.enabled = False
        return self._global_loss(total)

    def _global_loss(self, total: torch.Tensor) -> float:
        """The global mean loss from this rank's sum of weighted microbatch losses, the same on
        every rank."""
        if self.grid.size("pp", "dp", "z") > 1:  # only the last stage's total is non-zero
            dist.all_reduce(total, group=self.grid.group("pp", "dp", "z"))
        loss = float(total)
        items = self.loss_weights.global_items
        if items is not None and not int(items):  # read after the loss's own sync: free
            log.warning("a global batch without a single item to average over (every label is -100): its "
                        "loss is 0 and its gradients are zero, where serial training would get NaN")
        return loss


def parallelize(model: nn.Module, optimizer: OptimizerFactory, num_microbatches: int = 1,
                schedule: str = "1f1b", offload: str | None = None, *,
                loss_fn: LossFn | None = None, clip_grad_norm: float | None = None,
                virtual_stages: int = 1, split_points: Sequence[str] | None = None,
                recompute: RecomputePolicy | Sequence[int] = False, bucket_mb: float = 25.0,
                zero: int = 0, precision: str = "fp32", sample_batch: Any = None,
                loss_items: ItemCounter | None = None, vocab_parallel_loss: bool | None = None) -> Engine:
    """Wrap ``model`` for training on the current grid.

    ``optimizer`` is a factory called with this rank's parameters (they may be shards).
    ``loss_fn(output, batch)`` is needed unless the output carries ``.loss`` (Hugging Face).
    Pipeline options (pp > 1): ``virtual_stages`` chunks per rank for ``schedule="interleaved"``;
    ``split_points``, module names that start stages 1.., where automatic splitting fails;
    ``offload``: None, "optimizer" (optimizer state in host memory between steps) or
    "optimizer+step" (fp32 master weights, state and the step on the CPU); see ``autopar.offload``.
    ``recompute``: True recomputes the repeated blocks (transformer layers) in backward; a callable
    ``policy(qualified_name, module) -> bool`` chooses the modules (pp = 1); with pp > 1, True or
    the list of pipeline stages that recompute their activations.
    ``bucket_mb``: size of the gradient buckets whose reduction overlaps backward.
    ``zero``: 1 shards the optimizer state over the data-parallel replicas, 2 the reduced
    gradients as well; needs an elementwise optimizer (see ``autopar.data_parallel.zero``).
    ``precision``: "fp32"; "bf16" (forward under bf16 autocast); "fp16" (fp16 autocast and dynamic
    loss scaling, ``engine.loss_scaler``: overflowing steps are skipped on every rank). Weights,
    gradients, their reduction and the optimizer stay fp32 (``autopar.runtime.precision``).
    ``sample_batch`` (pp > 1): a batch like the ones ``step`` will get; the model is traced on it
    (units on the meta device) so the split balances forward FLOPs in call order, instead of
    parameters in registration order. Either way the split happens here, each rank moves only
    its own stage to the device, and ``engine.optimizer`` exists when this returns.
    ``loss_items(batch) -> Tensor``: with a custom ``loss_fn`` that averages over items (tokens),
    how many this batch holds, so the loss is normalised over the global batch exactly as the
    serial loss is (``autopar.runtime.loss_weights``; HF labels are counted without it).
    ``vocab_parallel_loss``: None takes an HF causal LM's loss on the vocabulary shards of an LM
    head cut over y (no logits all-gather) unless the head is float64 or a ``loss_fn`` is given;
    True insists (the ``loss_fn`` then gets shards and calls ``autopar.vocab_parallel_cross_entropy``);
    False keeps the gathered logits (``autopar.intra_layer.vocab_loss``).
    """
    current_grid()  # before any other check: without init() that is the error to report
    if not callable(optimizer) or isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("optimizer must be a factory, e.g. lambda params: torch.optim.AdamW(params, lr=3e-4); "
                        "the parameters are only known after parallelisation")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be a positive integer, got {num_microbatches!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload {offload!r}; choose one of {OFFLOAD_MODES}")
    if offload == "params":
        raise NotImplementedError("offload='params' (z-shards on the host until their all-gather) is not implemented yet")
    if clip_grad_norm is not None and clip_grad_norm <= 0:
        raise ValueError(f"clip_grad_norm must be positive, got {clip_grad_norm}")
    check_options(bucket_mb, zero)
    check_precision(precision)
    return Engine(model, optimizer, num_microbatches=num_microbatches, schedule=schedule,
                  offload=offload, loss_fn=loss_fn, clip_grad_norm=clip_grad_norm,
                  virtual_stages=virtual_stages, split_points=split_points,
                  recompute=recompute, bucket_mb=bucket_mb, zero=zero, precision=precision,
                  sample_batch=sample_batch, loss_items=loss_items, vocab_parallel_loss=vocab_parallel_loss)
