"""Re-parameterization: parallel linear branches that meet in Add become one Conv with bias.

A branch is any chain of per-pixel linear, translation-equivariant ops (Conv of any kernel,
stride, padding, auto_pad, groups or dilation; BatchNormalization; zero Pad; AveragePool; Mul/Add/
Sub/Div by a per-channel constant) or nothing at all (identity). A sum of such branches from one
tensor is again a convolution; its kernel is measured by pushing impulses through the group's own
ops with onnxruntime and its bias by pushing zeros, so no op needs a hand-written fusion rule.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from math import gcd
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..graph.patterns import constant_value, is_graph_output, producer, sole_consumer
from .base import PassResult
from .channel_affine import ChannelAffine, identity_affine
from .fold_affine import affine_of

_MERGES = ("Add", "Sum")
_AFFINES = ("BatchNormalization", "Mul", "Add", "Sub", "Div")
_MAX_BRANCH_DEPTH = 16  # how far back two Add inputs are searched for a shared input
_TOLERANCE = 1e-4  # max |fused - original| / max |original| on random inputs
_PROBE_BATCH = 256


class NotFusable(Exception):
    """Why a group stays as it is; the message becomes the group's note."""


@dataclass
class BranchGroup:
    """One group the pass looked at, as ``inspect`` and the report show it."""

    input: str
    output: str
    branches: list[str]  # per branch, its ops: "conv3x3+bn", "identity+bn"
    fused: bool
    reason: str = ""
    fused_node: Optional[str] = None
    after: list[str] = field(default_factory=list)  # affines after the sum folded in ("bn")
    affine: Optional[ChannelAffine] = None  # the fused conv's QPR affine, identity at first

    def note(self) -> str:
        kind = "chain" if len(self.branches) == 1 else "group"
        then = f" then {'+'.join(self.after)}" if self.after else ""
        head = (f"{kind} at {self.input} -> {self.output}: {len(self.branches)} branches "
                f"[{', '.join(self.branches)}]{then}")
        return f"{head}: fused into {self.fused_node}" if self.fused else f"{head}: not fused: {self.reason}"


@dataclass(frozen=True)
class Window:
    """Per spatial axis (h, w): output pixel o reads input pixels o*stride - pad_begin onwards,
    ``extent`` of them, of the input zero-padded by pad_begin / pad_end."""

    extent: tuple = (1, 1)
    stride: tuple = (1, 1)
    pad_begin: tuple = (0, 0)
    pad_end: tuple = (0, 0)

    def then(self, step: "Window") -> "Window":
        """This window followed by ``step``, which works at this window's output resolution."""
        return Window(
            tuple(e + (k - 1) * s for e, k, s in zip(self.extent, step.extent, self.stride)),
            tuple(s * t for s, t in zip(self.stride, step.stride)),
            tuple(p + q * s for p, q, s in zip(self.pad_begin, step.pad_begin, self.stride)),
            tuple(p + q * s for p, q, s in zip(self.pad_end, step.pad_end, self.stride)),
        )

    @property
    def slack(self) -> tuple:
        # output size = (size + slack) // stride + 1, so equal slack means equal output sizes
        return tuple(b + e - k for b, e, k in zip(self.pad_begin, self.pad_end, self.extent))

    @property
    def pads(self) -> bool:
        return any(self.pad_begin) or any(self.pad_end)


@dataclass
class Step:
    """One op of a branch: its window, output channels and whether it adds a bias."""

    window: Window = Window()
    out_channels: Optional[int] = None  # None: same as its input
    adds_bias: bool = False
    groups: Optional[int] = None


@dataclass
class Branch:
    """What fusing needs to know of one branch: where it reads, what it makes, its conv groups."""

    window: Window
    out_channels: int
    groups: list[int]


class FuseParallelBranches:
    """Replace each group of parallel linear branches meeting in Add/Sum by one Conv with bias.

    Rewritten:
      1. Add/Sum trees whose inputs all trace back, through linear ops only, to one tensor
         (RepVGG, QARepVGG, ACNet, DBB, MobileOne, depthwise and grouped variants); per-channel
         affines right after the sum (QARepVGG's BN) are folded in too.
      2. Sequential chains starting at a Conv (Conv->BN, 1x1->kxk, Conv->AvgPool) without
         anything non-linear between.
    Left alone, with the reason as a note:
      - a branch with a non-linear or unknown op (the sum is then not a convolution);
      - zero padding (a Pad, or a padded Conv/AveragePool) after a bias: the border would see
        zeros where the fused conv sees the bias;
      - an intermediate tensor used outside the group (fusing would have to keep it anyway);
      - branches with different strides or output sizes; SAME auto_pad with stride > 1 (its
        padding depends on the input size); AveragePool with ceil_mode or count_include_pad=0
        over padding;
      - any fusion whose conv differs from the original on random inputs by more than 1e-4.
    Each fused conv carries an identity QPR affine (``BranchGroup.affine``) for calibration.
    """

    name = "fuse_branches"

    def __init__(self) -> None:
        self.last_groups: list[BranchGroup] = []

    @property
    def fused_nodes(self) -> list[str]:
        return [g.fused_node for g in self.last_groups if g.fused_node]

    def __call__(self, graph: gs.Graph) -> PassResult:
        self.last_groups = []
        self._fuse_sums(graph)
        graph.cleanup().toposort()
        self._fuse_chains(graph)
        graph.cleanup().toposort()
        notes = [group.note() for group in self.last_groups]
        return PassResult(graph, bool(self.fused_nodes), notes)

    def _fuse_sums(self, graph: gs.Graph) -> None:
        for node in list(graph.nodes):
            if not _is_merge(node) or _is_merge(sole_consumer(node.outputs[0], graph)):
                continue  # not a merge, or an inner Add of a bigger sum
            leaves, merges = _add_tree(node, graph)
            found = _common_input(leaves)
            if found is not None and any(n.op == "Conv" for ns in found[1] for n in ns):
                root, branch_nodes = found
                self._fuse(graph, root, branch_nodes, merges)

    def _fuse_chains(self, graph: gs.Graph) -> None:
        taken: set[int] = set()
        for node in list(graph.nodes):
            if node.op != "Conv" or id(node) in taken:
                continue
            chain = [node]
            while (nxt := sole_consumer(chain[-1].outputs[0], graph)) is not None and _extends(chain, nxt):
                chain.append(nxt)
            taken.update(id(n) for n in chain)
            if len(chain) > 1:
                self._fuse(graph, node.inputs[0], [chain], [])

    def _fuse(self, graph, root, branch_nodes, merges) -> None:
        kinds = [_kind_of(nodes) for nodes in branch_nodes]
        group = BranchGroup(root.name, (merges or branch_nodes[0])[-1].outputs[0].name, kinds, False)
        try:
            tail = _tail_affines(graph, merges[-1]) if merges else []
            group.after = [_label_of(n) for n in tail]
            nodes = _unique([n for ns in branch_nodes for n in ns] + merges + tail)
            group.output = nodes[-1].outputs[0].name
            conv = _replace_group(graph, root, branch_nodes, nodes)
            group.fused, group.fused_node = True, conv.name
            group.affine = identity_affine(conv.inputs[1].values.shape[0])
        except NotFusable as reason:
            group.reason = str(reason)
        self.last_groups.append(group)


# --- finding groups ---------------------------------------------------------------------------

def _is_merge(node: Optional[gs.Node]) -> bool:
    return (node is not None and node.op in _MERGES and len(node.inputs) >= 2
            and all(isinstance(t, gs.Variable) for t in node.inputs))


def _extends(chain: list[gs.Node], node: gs.Node) -> bool:
    """Whether a standalone chain takes ``node`` too. It never grows a kernel past its convs':
    a conv joins only next to 1x1 convs, and AveragePool only inside a branch group."""
    variables = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
    if len(variables) != 1 or node.op not in _AFFINES + ("Pad", "Conv"):
        return False
    if node.op != "Conv":
        return True
    pointwise = all(_is_pointwise(n) for n in chain if n.op == "Conv") or _is_pointwise(node)
    return pointwise and _no_more_weights([n for n in chain if n.op == "Conv"] + [node])


def _no_more_weights(convs: list[gs.Node]) -> bool:
    """A chain of convs is fused only when the fused kernel is no bigger than the chain's.

    A bottleneck (96 -> 24 -> 96 channels) is cheaper as two convs than as one 96 -> 96 conv;
    fusing it would be exact but slower, and would widen the layer the quantizer sees.
    """
    weights = [constant_value(c.inputs[1]) for c in convs]
    if any(w is None for w in weights):
        return False
    groups = {int(_attr(c, "group", 1)) for c in convs}
    in_channels = weights[0].shape[1] * int(_attr(convs[0], "group", 1))
    out_channels = weights[-1].shape[0]
    fused_groups = groups.pop() if len(groups) == 1 and in_channels == out_channels else 1
    kernel = [sum(w.shape[2 + axis] - 1 for w in weights) + 1 for axis in range(weights[0].ndim - 2)]
    fused = out_channels * (in_channels // fused_groups) * int(np.prod(kernel))
    return fused <= sum(w.size for w in weights)


def _is_pointwise(conv: gs.Node) -> bool:
    weight = constant_value(conv.inputs[1])
    return weight is not None and weight.shape[2:] == (1, 1)


def _add_tree(top: gs.Node, graph: gs.Graph) -> tuple[list[gs.Tensor], list[gs.Node]]:
    """The summed tensors of an Add/Sum tree and its merge nodes, inner ones first."""
    leaves, merges = [], []
    for tensor in top.inputs:
        inner = producer(tensor)
        if _is_merge(inner) and sole_consumer(tensor, graph) is top:
            inner_leaves, inner_merges = _add_tree(inner, graph)
            leaves += inner_leaves
            merges += inner_merges
        else:
            leaves.append(tensor)
    return leaves, merges + [top]


def _path_back(tensor: gs.Tensor) -> list[gs.Tensor]:
    """The tensor and its ancestors through single-activation-input nodes."""
    path = [tensor]
    while len(path) <= _MAX_BRANCH_DEPTH and (node := producer(path[-1])) is not None:
        variables = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
        if len(variables) != 1:
            break
        path.append(variables[0])
    return path


def _common_input(leaves: list[gs.Tensor]):
    """(shared input, per-branch nodes from it to the Add), or None when the leaves share none."""
    paths = [_path_back(leaf) for leaf in leaves]
    others = [{id(t) for t in path} for path in paths[1:]]
    for root in paths[0]:
        if all(id(root) in ids for ids in others):
            cut = [[id(t) for t in path].index(id(root)) for path in paths]
            return root, [[producer(t) for t in reversed(path[:n])] for path, n in zip(paths, cut)]
    return None


def _tail_affines(graph: gs.Graph, top: gs.Node) -> list[gs.Node]:
    """Per-channel affines (e.g. QARepVGG's BN) right after the sum, in order."""
    tail, tensor = [], top.outputs[0]
    while (node := sole_consumer(tensor, graph)) is not None and node.op in _AFFINES:
        channels = _channels_of_affine(node)
        if channels is None or affine_of(node, channels, 4) is None:
            break
        tail.append(node)
        tensor = node.outputs[0]
    return tail


def _channels_of_affine(node: gs.Node) -> Optional[int]:
    values = [constant_value(t) for t in node.inputs[1:]]
    sizes = [v.size for v in values if v is not None]
    return max(sizes) if sizes else None


# --- describing branches ----------------------------------------------------------------------

def _attr(node: gs.Node, key: str, default):
    value = node.attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _conv_like_window(node: gs.Node, kernel: tuple) -> Window:
    strides = tuple(_attr(node, "strides", [1, 1]))
    dilations = tuple(_attr(node, "dilations", [1, 1]))
    extent = tuple(d * (k - 1) + 1 for d, k in zip(dilations, kernel))
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if strides != (1, 1):
            raise NotFusable(f"{node.name}: auto_pad {auto_pad} with stride > 1 pads by input size")
        totals = [e - 1 for e in extent]
        low = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        return Window(extent, strides, tuple(low), tuple(t - b for t, b in zip(totals, low)))
    pads = [0, 0, 0, 0] if auto_pad == "VALID" else list(_attr(node, "pads", [0, 0, 0, 0]))
    return Window(extent, strides, tuple(pads[:2]), tuple(pads[2:]))


def _conv_step(node: gs.Node, channels: int) -> Step:
    weight = constant_value(node.inputs[1])
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else 0
    if weight is None or bias is None:
        raise NotFusable(f"{node.name}: Conv weight or bias is not a constant")
    if weight.ndim != 4:
        raise NotFusable(f"{node.name}: only 2-D convolutions are fused")
    groups = int(_attr(node, "group", 1))
    if weight.shape[1] * groups != channels:
        raise NotFusable(f"{node.name}: Conv expects {weight.shape[1] * groups} channels, not {channels}")
    window = _conv_like_window(node, tuple(weight.shape[2:]))
    return Step(window, weight.shape[0], bool(np.any(bias)), groups)


def _pad_step(node: gs.Node) -> Step:
    pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else np.array(_attr(node, "pads", []))
    value = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else 0
    if _attr(node, "mode", "constant") != "constant" or pads is None or value is None or np.any(value):
        raise NotFusable(f"{node.name}: only constant zero Pad is linear and fusable")
    if len(node.inputs) > 3 and node.inputs[3].name:
        raise NotFusable(f"{node.name}: Pad with axes is not fused")
    pads = [int(p) for p in pads]
    if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
        raise NotFusable(f"{node.name}: Pad must add non-negative spatial padding only")
    return Step(Window((1, 1), (1, 1), tuple(pads[2:4]), tuple(pads[6:8])))


def _pool_step(node: gs.Node) -> Step:
    kernel = tuple(_attr(node, "kernel_shape", []))
    if len(kernel) != 2:
        raise NotFusable(f"{node.name}: only 2-D average pools are fused")
    window = _conv_like_window(node, kernel)
    if _attr(node, "ceil_mode", 0):
        raise NotFusable(f"{node.name}: AveragePool with ceil_mode has partial border windows")
    if window.pads and not _attr(node, "count_include_pad", 0):
        raise NotFusable(f"{node.name}: AveragePool with count_include_pad=0 over padding "
                         "divides border pixels by fewer taps, which no conv does")
    return Step(window)


def _step_of(node: gs.Node, channels: int) -> Step:
    if node.op == "Conv":
        return _conv_step(node, channels)
    if node.op == "Pad":
        return _pad_step(node)
    if node.op == "AveragePool":
        return _pool_step(node)
    if node.op in _AFFINES:
        if _attr(node, "training_mode", 0):
            raise NotFusable(f"{node.name}: BatchNormalization in training mode")
        affine = affine_of(node, channels, 4)
        if affine is None:
            raise NotFusable(f"{node.name}: {node.op} is not by a per-channel constant")
        return Step(adds_bias=bool(np.any(affine.shift)))
    raise NotFusable(f"{node.name}: {node.op} is not a fusable linear op")


def _label_of(node: gs.Node) -> str:
    if node.op == "Conv" and (weight := constant_value(node.inputs[1])) is not None:
        groups = int(_attr(node, "group", 1))
        kh, kw = weight.shape[2:]
        if groups > 1 and weight.shape[1] == 1:
            return f"dwconv{kh}x{kw}"
        return f"conv{kh}x{kw}" + (f"/g{groups}" if groups > 1 else "")
    if node.op == "AveragePool":
        kernel = _attr(node, "kernel_shape", [])
        return f"avgpool{'x'.join(map(str, kernel))}"
    labels = {"BatchNormalization": "bn", "Mul": "scale", "Div": "scale", "Add": "shift",
              "Sub": "shift", "Pad": "pad"}
    return labels.get(node.op, node.op)


def _kind_of(nodes: list[gs.Node]) -> str:
    labels = [_label_of(node) for node in nodes]
    if not any(node.op in ("Conv", "AveragePool", "Pad") for node in nodes):
        labels.insert(0, "identity")
    return "+".join(labels)


def _input_channels(node: gs.Node) -> Optional[int]:
    """The channel count a branch's first node implies for its input, when it implies one."""
    if node.op == "Conv" and (weight := constant_value(node.inputs[1])) is not None:
        return int(weight.shape[1] * _attr(node, "group", 1))
    if node.op in _AFFINES:
        return _channels_of_affine(node)
    return None


def _unique(nodes: list[gs.Node]) -> list[gs.Node]:
    """Nodes in order, each once (branches may share a prefix, e.g. one Pad feeding two)."""
    return list({id(node): node for node in nodes}.values())


def _used_outside(tensor: gs.Tensor, group: list[gs.Node], graph: gs.Graph) -> bool:
    inside = {id(node) for node in group}
    return is_graph_output(tensor, graph) or any(id(user) not in inside for user in tensor.outputs)


def _analyse(nodes: list[gs.Node], channels: int, graph: gs.Graph, index: int,
             group: list[gs.Node]) -> Branch:
    """The branch's window and channels; refuses what would not fuse exactly."""
    window, groups, biased = Window(), [], False
    for node in nodes:
        if node is not group[-1] and _used_outside(node.outputs[0], group, graph):
            raise NotFusable(f"branch {index}: {node.outputs[0].name} is also used outside the group")
        step = _step_of(node, channels)
        if biased and step.window.pads:
            raise NotFusable(f"branch {index}: {node.name} zero-pads after a bias; the border "
                             "would see zeros where a fused conv sees the bias")
        window, channels = window.then(step.window), step.out_channels or channels
        biased = biased or step.adds_bias
        groups += [step.groups] if step.groups else []
    return Branch(window, channels, groups)


# --- fusing -----------------------------------------------------------------------------------

def _fused_window(branches: list[Branch]) -> Window:
    strides = {b.window.stride for b in branches}
    if len(strides) != 1:
        raise NotFusable(f"branches have different strides {sorted(strides)}")
    slacks = {b.window.slack for b in branches}
    if len(slacks) != 1:
        raise NotFusable("branch outputs differ in size")
    begin = tuple(max(b.window.pad_begin[a] for b in branches) for a in range(2))
    extent = tuple(max(begin[a] - b.window.pad_begin[a] + b.window.extent[a] for b in branches)
                   for a in range(2))
    slack = slacks.pop()
    end = tuple(slack[a] + extent[a] - begin[a] for a in range(2))
    if min(end) < 0:
        raise NotFusable("the fused conv would need negative padding")
    return Window(extent, strides.pop(), begin, end)


def _replace_group(graph, root, branch_nodes, nodes) -> gs.Node:
    if not _is_float32(root.dtype):
        raise NotFusable(f"only float32 groups are fused ({root.name} is {root.dtype})")
    channels = _root_channels(root, branch_nodes)
    branches = [_analyse(ns, channels, graph, i, nodes) for i, ns in enumerate(branch_nodes)]
    out_channels = {b.out_channels for b in branches}
    if len(out_channels) != 1:
        raise NotFusable(f"branches have different channel counts {sorted(out_channels)}")
    window = _fused_window(branches)
    groups = gcd(channels, *out_channels, *[g for b in branches for g in b.groups])
    original = _session(_subgraph(nodes, root.name, channels, nodes[-1].outputs[0].name, graph))
    for candidate in dict.fromkeys((groups, 1)):
        weight, bias = _probe(original, channels, candidate, window)
        fused = _session(_conv_model(weight, bias, window, candidate, graph))
        error = _relative_error(original, fused, channels, window)
        if error < _TOLERANCE:
            return _insert_conv(graph, root, nodes[-1], weight, bias, window, candidate)
    raise NotFusable(f"fused conv differs from the branches (relative error {error:.2e})")


def _is_float32(dtype) -> bool:
    # onnx-graphsurgeon gives numpy dtypes, or onnx enums for types numpy lacks
    if dtype is None or isinstance(dtype, int):
        return dtype in (None, onnx.TensorProto.FLOAT)
    return np.dtype(dtype) == np.float32


def _root_channels(root: gs.Tensor, branch_nodes) -> int:
    if root.shape is not None and len(root.shape) == 4 and isinstance(root.shape[1], int):
        return root.shape[1]
    for nodes in branch_nodes:
        for node in nodes:
            if (channels := _input_channels(node)) is not None:
                return channels
            if node.op not in ("Pad", "AveragePool"):
                break
    raise NotFusable(f"channel count of {root.name} is unknown")


def _subgraph(nodes, root_name, channels, output_name, graph) -> onnx.ModelProto:
    initializers, onnx_nodes = {}, []
    for node in nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and tensor.name not in initializers:
                initializers[tensor.name] = numpy_helper.from_array(np.asarray(tensor.values), tensor.name)
        onnx_nodes.append(helper.make_node(node.op, [t.name for t in node.inputs],
                                           [t.name for t in node.outputs], name=node.name, **node.attrs))
    return _model(onnx_nodes, list(initializers.values()), root_name, channels, output_name, graph)


def _conv_model(weight, bias, window, groups, graph) -> onnx.ModelProto:
    init = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **_conv_attrs(window, groups))
    return _model([node], init, "x", weight.shape[1] * groups, "y", graph)


def _conv_attrs(window: Window, groups: int) -> dict:
    return dict(kernel_shape=list(window.extent), strides=list(window.stride),
                pads=list(window.pad_begin + window.pad_end), dilations=[1, 1], group=groups)


def _model(nodes, initializers, input_name, channels, output_name, graph) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, ["n", channels, "h", "w"])]
    outputs = [helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, None)]
    body = helper.make_graph(nodes, "branch_group", inputs, outputs, initializers)
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", graph.opset)])
    model.ir_version = min(model.ir_version, 9)
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's error types share no useful base class
        raise _cannot_run(exc) from None


def _run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    try:
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    except Exception as exc:  # e.g. branch shapes that do not broadcast at the probe size
        raise _cannot_run(exc) from None


def _cannot_run(exc: Exception) -> NotFusable:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return NotFusable(f"onnxruntime cannot run the group: {lines[0][:200]}")


def _probe(session, channels: int, groups: int, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Kernel and bias of the group: impulses at one interior window, then zeros for the bias.

    One impulse per group at a time: an output channel sees only its own group's inputs.
    """
    first = [-(-p // s) for p, s in zip(window.pad_begin, window.stride)]  # first interior output
    start = [o * s - p for o, s, p in zip(first, window.stride, window.pad_begin)]
    size = [b + e + 2 * s for b, e, s in zip(start, window.extent, window.stride)]
    per_group = channels // groups
    taps = list(itertools.product(range(per_group), range(window.extent[0]), range(window.extent[1])))
    responses = []
    for chunk_start in range(0, len(taps) + 1, _PROBE_BATCH):
        chunk = taps[chunk_start:chunk_start + _PROBE_BATCH]
        x = np.zeros((len(chunk) + 1, channels, *size), np.float32)  # last sample: zeros
        for i, (c, dy, dx) in enumerate(chunk):
            x[i, c::per_group, start[0] + dy, start[1] + dx] = 1.0
        responses.append(_run(session, x)[:, :, first[0], first[1]])
    bias = responses[0][-1]
    kernel = np.concatenate([r[:-1] for r in responses]) - bias
    weight = kernel.reshape(per_group, *window.extent, -1).transpose(3, 0, 1, 2)
    return np.ascontiguousarray(weight, np.float32), bias.astype(np.float32)


def _relative_error(original, fused, channels: int, window: Window) -> float:
    """Worst relative difference on random inputs of two sizes, so every border case is hit."""
    rng = np.random.default_rng(0)
    base = [e + 3 * s + 1 for e, s in zip(window.extent, window.stride)]
    worst = 0.0
    for size in ((base[0], base[1] + 1), (base[0] + 1, base[1])):
        x = rng.standard_normal((2, channels, *size)).astype(np.float32)
        expected, actual = _run(original, x), _run(fused, x)
        if expected.shape != actual.shape:
            return float("inf")
        scale = max(float(np.abs(expected).max()), 1e-12)
        worst = max(worst, float(np.abs(expected - actual).max()) / scale)
    return worst


def _insert_conv(graph, root, last, weight, bias, window, groups) -> gs.Node:
    output = last.outputs[0]
    name = f"{output.name}/reparam_conv"
    last.outputs = []
    conv = gs.Node("Conv", name=name, attrs=_conv_attrs(window, groups),
                   inputs=[root, gs.Constant(f"{name}.weight", weight), gs.Constant(f"{name}.bias", bias)],
                   outputs=[output])
    graph.nodes.append(conv)
    return conv
