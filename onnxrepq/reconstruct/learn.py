"""ReconstructBlocks: block-wise reconstruction of the simulation graph (UWC + RepAPQ).

The simulation graph (float weights behind Q/DQ, activations behind Q/DQ) is cut into blocks of a
few adjacent weight layers (``partition``). Block by block, in topological order:
1. the block's inputs are the values the already-learned quantized blocks before it produce
   (graph inputs come from the calibration data); with QDrop (arXiv 2203.05740) each element is
   taken from the float model instead with probability ``qdrop``;
2. its targets are the float model's values of the block outputs: a simulation tensor
   ``X_dequantized_k`` stands for the float tensor ``X``; an output that holds integers
   (``X_quantized``, or ``X_quantized_narrow`` after the integer Clip of a grid below 8 bits) is
   seen through its DequantizeLinear, a float Softmax output at the Softmax's input (its logits);
   outputs with no float counterpart are not supervised;
3. Adam learns the block's quantizers (``quantizers.py``) on the relative MAE (or MSE) between the
   block's outputs and the targets, plus AdaRound's rounding regulariser;
4. the hard result is written into the graph's constants and the block is run once more on every
   calibration feed to give later blocks their inputs.
A block holding an op the torch executor lacks (an LSTM, a custom-domain op) is not learned: its
quantizers keep the scale search's values and onnxruntime runs it (Q/DQ unfused, the same
arithmetic) to give the blocks after it their inputs, so one exotic op does not cost the whole
model its reconstruction.
With ``stage_supervision`` (RepAPQ) a stage's continuous parameters (QPR affine, activation steps;
the integers stay as learned) are then fine-tuned together on the stage outputs.
The float targets are computed one stage at a time, so memory holds one stage's boundary tensors.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch

from ..config import ReconstructionConfig
from ..graph.patterns import producer
from ..passes.base import PassResult
from ..progress import Progress
from ..search.quant_grid import IntGrid
from .executor import GraphModule, select_nodes
from .ops import missing_ops
from .partition import partition
from .quantizers import BlockQuantizers

Feed = Mapping[str, np.ndarray]
Values = dict[str, list[np.ndarray]]     # tensor name -> one array per calibration feed
# ``X_quantized_narrow``: the integer Clip after the QuantizeLinear of a grid narrower than its
# container (6-bit activations in uint8, passes/insert_qdq.py); it holds integers like ``X_quantized``.
_QDQ_SUFFIX = re.compile(r"_(dequantized_\d+|quantized_narrow|quantized)$")
_INTEGER_SUFFIX = re.compile(r"_quantized(_narrow)?$")
_NORMALIZERS = ("Softmax", "LogSoftmax")   # block outputs supervised at their input (_comparable)
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def float_name(simulation_name: str) -> str:
    """The float model's tensor behind a simulation tensor: ``X_dequantized_3`` -> ``X``."""
    return _QDQ_SUFFIX.sub("", simulation_name)


@dataclass
class BlockReport:
    name: str
    layers: int
    nearest_loss: float     # relative loss with the quantizers as the scale search left them
    learned_loss: float     # after learning, hard rounding


class ReconstructBlocks:
    """Learn weight rounding, activation steps (and the QPR affine, when configured) block by block; write them back.

    Leaves alone: weights without a Q/DQ pair, activations whose scale group was fixed by an
    earlier block, blocks with no float-comparable output (they keep nearest rounding).
    """

    name = "reconstruct_blocks"

    def __init__(self, float_model: onnx.ModelProto, feeds: Sequence[Feed], weight_grid: IntGrid,
                 config: ReconstructionConfig = ReconstructionConfig(), seed: int = 0, progress: bool = False,
                 layer_grids: Mapping[str, IntGrid] = {}, narrowest_bits: int = 8):
        self.float_model = float_model
        self.loss = config.loss_for(narrowest_bits)   # "auto" decided by the narrowest nominal width
        self.feeds = [{name: np.asarray(value) for name, value in feed.items()} for feed in feeds]
        self.weight_grid = weight_grid
        self.layer_grids = dict(layer_grids)   # layer node name -> its weight grid, where it is not weight_grid
        self.config = config
        self.seed = seed
        self.progress = progress
        self.reports: list[BlockReport] = []
        self.unlearned: dict[str, list[str]] = {}   # block -> the op types torch could not run

    def __call__(self, graph: gs.Graph) -> PassResult:
        config = self.config
        stages = partition(graph, max_layers_per_block=config.max_layers_per_block)
        cache: Values = {name: [feed[name] for feed in self.feeds] for name in self.feeds[0]}
        frozen: set[str] = set()
        generator = torch.Generator().manual_seed(self.seed)
        floats = _FloatModel(self.float_model)
        with _deterministic(self.seed):
            for number, stage in enumerate(stages):
                wanted = _comparable(graph, [n for b in stage.blocks for n in b.outputs])
                targets = floats.run(self.feeds, {*wanted, *(n for b in stage.blocks for n in b.inputs)})
                frozen_before = set(frozen)
                for block in stage.blocks:
                    missing = missing_ops(select_nodes(graph, block.inputs, block.outputs))
                    if missing:
                        self.unlearned[block.name] = missing
                        cache.update(_run_in_onnxruntime(graph, block.inputs, block.outputs, cache))
                        continue
                    quantizers, report = self._learn(graph, block.name, block.inputs, block.outputs, cache,
                                                     targets, frozen, generator, config.iterations, adaround=True)
                    frozen.update(quantizers.write_back())
                    self.reports.append(BlockReport(block.name, len(block.weight_layers), *report))
                    cache.update(_run_written_back(graph, block.inputs, block.outputs, cache))
                learnable = not any(block.name in self.unlearned for block in stage.blocks)
                if config.stage_supervision and len(stage.blocks) > 1 and config.stage_iterations and learnable:
                    quantizers, _ = self._learn(graph, stage.name, stage.inputs, stage.outputs, cache, targets,
                                                frozen_before, generator, config.stage_iterations, adaround=False)
                    frozen.update(quantizers.write_back())
                    cache.update(_run_written_back(graph, stage.inputs, stage.outputs, cache))
                needed = {n for later in stages[number + 1:] for n in later.inputs} | {t.name for t in graph.outputs}
                cache = {name: values for name, values in cache.items() if name in needed}
        graph.cleanup().toposort()
        before = np.nanmean([r.nearest_loss for r in self.reports]) if self.reports else 0.0
        after = np.nanmean([r.learned_loss for r in self.reports]) if self.reports else 0.0
        notes = [f"{len(self.reports)} blocks in {len(stages)} stages; mean relative block {self.loss.upper()}"
                 f" {before:.4g} with nearest rounding -> {after:.4g} learned"]
        if self.unlearned:
            notes.append(self.unlearned_note())
        return PassResult(graph, bool(self.reports), notes)

    def unlearned_note(self) -> str:
        """What a user is told when some blocks could not be learned (read only when ``unlearned``)."""
        ops = sorted({op for missing in self.unlearned.values() for op in missing})
        return (f"{len(self.unlearned)} of {len(self.unlearned) + len(self.reports)} blocks were not reconstructed:"
                f" the torch executor has no {', '.join(ops)}; they keep the scale search's ranges and nearest rounding")

    def _learn(self, graph, name, inputs, outputs, cache: Values, targets: Values, frozen, generator,
               iterations: int, adaround: bool) -> tuple[BlockQuantizers, tuple[float, float]]:
        config = self.config
        supervised = [o for o in _comparable(graph, outputs)
                      if float_name(o) in targets and targets[float_name(o)][0].dtype == np.float32]
        module = GraphModule(graph, inputs, supervised or outputs, ste=True)
        quantizers = BlockQuantizers(module, graph, self.weight_grid, frozen,
                                     adaround=adaround and config.rounding == "adaround",
                                     affine=config.affine, learn_scales=config.learn_activation_scales,
                                     layer_grids=self.layer_grids, step_floor=config.activation_step_floor)
        if not supervised:
            return quantizers, (float("nan"), float("nan"))
        data = _BlockData(inputs, supervised, cache, targets, self.loss)
        evaluate = lambda: data.loss(module, quantizers.overrides(hard=True), range(len(self.feeds)))  # noqa: E731
        with torch.no_grad():
            nearest = evaluate()
        batch_size = _step_batch(config, [cache[name][0] for name in inputs if name in cache])
        iterations = _step_count(config, iterations, batch_size)
        groups = quantizers.parameter_groups(config.weight_lr, config.scale_lr, config.affine_lr)
        if groups and iterations:
            optimizer = torch.optim.Adam(groups)
            warmup = int(0.2 * iterations)
            with Progress(f"reconstructing {name}", total=iterations, enabled=self.progress) as bar:
                for step in range(iterations):
                    picked = torch.randperm(len(self.feeds), generator=generator)[:batch_size].tolist()
                    mix = (lambda t, f: _qdrop(t, f, config.qdrop, generator)) if config.qdrop > 0 else None
                    loss = data.loss(module, quantizers.overrides(hard=False), picked, mix)
                    if step >= warmup and quantizers.weights and adaround:
                        progress = (step - warmup) / max(1, iterations - warmup)
                        loss = loss + config.rounding_weight * quantizers.regulariser(20.0 - 18.0 * progress)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    quantizers.project()
                    bar.update()
        with torch.no_grad():
            learned = evaluate()
            if learned > nearest:
                # the soft-to-hard rounding step lost more than learning gained (seen on a lone
                # first conv): keep the scale search's quantizers, so no block ends worse than it began
                quantizers.reset()
                learned = nearest
        return quantizers, (float(nearest), float(learned))


def _step_batch(config, first_feed_inputs: Sequence[np.ndarray]) -> int:
    """Feeds per step: ``batch_size``, fewer where one feed's block inputs are large."""
    per_feed = max(1, sum(int(np.asarray(value).size) for value in first_feed_inputs))
    return max(1, min(config.batch_size, config.max_step_elements // per_feed))


def _step_count(config, iterations: int, batch_size: int) -> int:
    """More steps for a block whose feeds per step were capped: the gradient noise of a small batch
    needs them, and such blocks are the few on large feature maps."""
    scale = min(config.capped_step_scale, -(-config.batch_size // batch_size))
    return iterations * max(1, scale)


def _comparable(graph: gs.Graph, outputs: Sequence[str]) -> list[str]:
    """Block outputs as float values: an integer ``X_quantized`` is seen through its first
    DequantizeLinear (learning then sees the step it is quantized with), and a float Softmax output
    through the Softmax, at its logits. Probabilities are mostly near zero: a classifier head over
    6625 characters (PP-OCRv4 rec) has a mean |p| of 1.5e-4, so a loss on them weighs the thousands of
    unlikely classes alike and hardly sees the few that decide the reading."""
    tensors = graph.tensors()
    found = []
    for name in outputs:
        name = _logits(tensors[name]) or name
        if _INTEGER_SUFFIX.search(name):
            restore = _first_dequantize(tensors[name])
            if restore is None:
                continue
            name = restore.outputs[0].name
        found.append(name)
    return found


def _logits(tensor: gs.Tensor):
    """The input of the Softmax that gives ``tensor`` (through reshapes: opset conversion wraps a
    Softmax over a 3-D tensor in a pair of them), or None."""
    source = producer(tensor)
    while source is not None and source.op in _RESHAPES:
        source = producer(source.inputs[0])
    if source is not None and source.op in _NORMALIZERS and isinstance(source.inputs[0], gs.Variable):
        return source.inputs[0].name
    return None


def _first_dequantize(tensor: gs.Tensor, depth: int = 2):
    """The first DequantizeLinear reading the integers of ``tensor``, past the integer Clip that holds
    a narrow grid (``X_quantized`` -> Clip -> ``X_quantized_narrow`` -> DequantizeLinear at 6 bits):
    without it a block cut there at 6 bits had no supervised output and learned nothing."""
    for consumer in tensor.outputs:
        if consumer.op == "DequantizeLinear":
            return consumer
    for consumer in tensor.outputs:
        if depth > 0 and consumer.op == "Clip" and consumer.outputs:
            found = _first_dequantize(consumer.outputs[0], depth - 1)
            if found is not None:
                return found
    return None


class _BlockData:
    """A block's cached inputs and float targets, served as (mini-)batches of calibration feeds.

    Feeds are concatenated along axis 0 when every input and target has the feed's batch there;
    otherwise (a shape tensor, a sequence laid out time-first) the block runs feed by feed.
    """

    def __init__(self, inputs: Sequence[str], outputs: Sequence[str], cache: Values, targets: Values, loss: str):
        self.inputs = {name: cache[name] for name in inputs}
        self.float_inputs = {name: targets.get(float_name(name)) for name in inputs}
        self.targets = {name: targets[float_name(name)] for name in outputs}
        self.loss_kind = loss
        power = 1 if loss == "mae" else 2
        # normalise each output's loss by its float magnitude so blocks and outputs weigh alike
        self.norms = {name: max(float(np.mean([np.mean(np.abs(v) ** power) for v in values])), 1e-12)
                      for name, values in self.targets.items()}
        sizes = [len(v) if v.ndim else -1 for v in next(iter(self.targets.values()))]
        self.batchable = all(len(arrays[i]) == sizes[i] if arrays[i].ndim else False
                             for arrays in list(self.inputs.values()) + list(self.targets.values())
                             for i in range(len(sizes)))

    def loss(self, module: GraphModule, overrides, picked: Sequence[int],
             mix: Callable | None = None) -> torch.Tensor:
        picked = list(picked)
        chunks = [picked] if self.batchable else [[i] for i in picked]
        total = torch.zeros(())
        for chunk in chunks:
            feeds = {name: self._gather(arrays, chunk) for name, arrays in self.inputs.items()}
            if mix is not None:
                feeds = {name: mix(value, self._gather(self.float_inputs[name], chunk))
                         if self._mixable(name, value) else value for name, value in feeds.items()}
            results = module(feeds, overrides)
            for name, target in self.targets.items():
                diff = results[name] - self._gather(target, chunk)
                error = diff.abs().mean() if self.loss_kind == "mae" else diff.pow(2).mean()
                total = total + error / self.norms[name] * len(chunk)
        return total / (len(picked) * len(self.targets))

    def _mixable(self, name: str, value: torch.Tensor) -> bool:
        floats = self.float_inputs[name]
        return (floats is not None and value.is_floating_point() and not _INTEGER_SUFFIX.search(name)
                and floats[0].dtype == np.float32)

    @staticmethod
    def _gather(arrays: list[np.ndarray], chunk: Sequence[int]) -> torch.Tensor:
        if len(chunk) == 1:
            return torch.from_numpy(np.require(arrays[chunk[0]], requirements="W"))
        return torch.from_numpy(np.concatenate([arrays[i] for i in chunk]))


def _qdrop(quantized: torch.Tensor, floats: torch.Tensor, probability: float, generator) -> torch.Tensor:
    if quantized.shape != floats.shape:
        return quantized
    keep_float = torch.rand(quantized.shape, generator=generator) < probability
    return torch.where(keep_float, floats.to(quantized.dtype), quantized)


def _run_written_back(graph: gs.Graph, inputs: Sequence[str], outputs: Sequence[str], cache: Values) -> Values:
    """Outputs of the block as the graph now stands (hard rounding), one array per feed."""
    module = GraphModule(graph, inputs, outputs)
    results: Values = {name: [] for name in outputs}
    count = len(next(iter(cache.values())))
    with torch.no_grad():
        for index in range(count):
            # calibration arrays may be read-only memory maps: torch wants writable memory (copied only then)
            values = module({name: torch.from_numpy(np.require(cache[name][index], requirements="W"))
                             for name in inputs})
            for name in outputs:
                results[name].append(values[name].numpy())
    return results


def _run_in_onnxruntime(graph: gs.Graph, inputs: Sequence[str], outputs: Sequence[str], cache: Values) -> Values:
    """Outputs of the block as the graph now stands, computed by onnxruntime from the cached inputs.

    Graph optimisation is off so that every QuantizeLinear/DequantizeLinear runs as written: the
    values are the simulation's, as the torch executor would give them, not those of fused kernels.
    """
    block = graph.copy()
    tensors = block.tensors()
    stored = {name: _stored_type(tensors[name]) for name in [*inputs, *outputs]}
    types = {name: stored[name] or cache[name][0].dtype for name in inputs}
    for name in inputs:
        tensors[name].dtype, tensors[name].shape = types[name], None
    block.inputs = [tensors[name] for name in inputs]
    block.outputs = [tensors[name] for name in outputs]
    model = gs.export_onnx(block.cleanup(), do_type_check=False)   # outputs may be untyped; onnxruntime infers them
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    results: Values = {name: [] for name in outputs}
    for index in range(len(next(iter(cache.values())))):
        values = session.run(list(outputs), {name: cache[name][index].astype(types[name], copy=False)
                                             for name in inputs})
        for name, value in zip(outputs, values):
            value = np.asarray(value)
            # the torch executor holds quantized tensors as float32 integers; so does the cache
            results[name].append(value.astype(np.float32) if stored[name] is not None else value)
    return results


def _stored_type(tensor: gs.Tensor):
    """The integer type of a quantized tensor (the cache holds it as float32), else None."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Clip" and producer.inputs:   # a narrow grid's integer Clip
        return _stored_type(producer.inputs[0])
    if producer is None or producer.op != "QuantizeLinear":
        return None
    zero_point = producer.inputs[2] if len(producer.inputs) > 2 else None
    if zero_point is None:
        return np.dtype(np.uint8)   # ONNX's default output type
    # None where numpy has no such type (gs keeps an onnx enum for int4): the cache's own type is used
    return None if zero_point.dtype is None or isinstance(zero_point.dtype, int) else np.dtype(zero_point.dtype)


class _FloatModel:
    """The float model under onnxruntime, asked for a chosen set of tensors (mapped to float names)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.available = {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.input}

    def run(self, feeds: Sequence[Feed], simulation_names) -> Values:
        wanted = sorted({float_name(n) for n in simulation_names} & self.available)
        from_feeds = [n for n in wanted if n in feeds[0]]
        computed = [n for n in wanted if n not in feeds[0]]
        values: Values = {name: [feed[name] for feed in feeds] for name in from_feeds}
        if computed:
            session = self._session(computed)
            values.update({name: [] for name in computed})
            for feed in feeds:
                for name, value in zip(computed, session.run(computed, dict(feed))):
                    values[name].append(np.asarray(value))
        return values

    def _session(self, names: list[str]) -> ort.InferenceSession:
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        present = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@contextmanager
def _deterministic(seed: int):
    """Seeded torch with deterministic kernels, restoring the caller's settings afterwards."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # One thread: many small block convolutions gain little from two, and on a shared machine
    # OpenMP's spinning workers made them 15x slower (measured, 16x16x16 conv, load 4 on 2 cores).
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_rng_state(state)
        torch.set_num_threads(threads)
