"""Typed, frozen configuration: one definition per option, shared by the CLI and the API.

A recipe file (TOML/YAML) loads into these dataclasses field for field; the CLI builds one and
calls the API. There are no hidden defaults elsewhere.
"""
from __future__ import annotations

import json
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from .calibrate.images import ImagePreprocess
from .errors import UserError
from .search.mixed_precision import MixedPrecisionConfig

ScaleSearch = Literal["mae", "mse", "minmax", "percentile"]
Target = Literal["ort-cpu", "tensorrt"]
WeightRange = Literal["auto", "full", "reduced", "paired", "unsigned"]

SCALE_SEARCHES: tuple[str, ...] = ("mae", "mse", "minmax", "percentile")
TARGETS: tuple[str, ...] = ("ort-cpu", "tensorrt")
WEIGHT_RANGES: tuple[str, ...] = ("auto", "full", "reduced", "paired", "unsigned")


@dataclass(frozen=True)
class CalibrationConfig:
    max_samples: int = 256          # samples beyond this are not read
    histogram_bins: int = 2048
    # Elements per tensor and sample that feed the histogram; min/max always see every element.
    sample_elements: int = 1 << 18
    # How a folder of .png/.jpg files becomes input tensors; None: the folder must hold .npy/.npz.
    images: Optional[ImagePreprocess] = None


@dataclass(frozen=True)
class ReconstructionConfig:
    """Block-wise reconstruction (UWC arXiv 2201.06376, RepAPQ arXiv 2402.16121) after the scale search."""
    iterations: int = 100            # Adam steps per block (PP-OCRv4 rec: ~10 min at 64 samples, 2 cores)
    batch_size: int = 8              # calibration feeds per step
    # Cap on the block-input elements one step reads: blocks on large feature maps (a detector at
    # 480x480) take fewer feeds per step, so their cost stays near that of small inputs. Counted,
    # not timed, so the result stays deterministic. cls and the zoo stay far below it; rec's softmax
    # input and ddddocr's first blocks just pass it (265k and 443k elements a feed at batch 8).
    max_step_elements: int = 1 << 21
    # A block held to fewer feeds per step takes up to this many times the steps, so it sees about as
    # many feeds as the others. Measured at 2 (BENCHMARKS.md): PP-OCRv4 det +0.44 / +0.15 dB (seeds
    # 0/1); ddddocr and rec, whose few capped blocks also get the steps, within 0.03 dB; cls, zoo uncapped.
    capped_step_scale: int = 2
    weight_lr: float = 5e-2          # AdaRound's rounding variables
    scale_lr: float = 1e-3           # LSQ activation steps, learned relative to the searched one
    affine_lr: float = 1e-3          # QPR per-channel gamma (as log) and beta
    max_layers_per_block: int = 2
    rounding: Literal["adaround", "nearest"] = "adaround"
    rounding_weight: float = 1.0     # the rounding regulariser's weight against the relative loss
    learn_activation_scales: bool = True
    # Lower bound on a learned activation step, as a fraction of the step the range search chose
    # (0: LSQ may shrink it freely). Steps shrunk by LSQ clip what lies outside the calibration
    # batches they saw (on PP-OCRv4 rec clipping alone costs as much as the whole int8 model), but a
    # floor of 1 did not pay (BENCHMARKS.md, session 12): rec exact match 0.694 against 0.689 over
    # seeds 0-2 with one seed 3.3 dB down, the classifier 1 point and 0.8 dB down, det, ddddocr, the zoo within noise.
    activation_step_floor: float = 0.0
    # RepAPQ's QPR per-channel affine (gamma on the weight scale, beta added to the bias). Off by
    # default, measured (BENCHMARKS.md): on PP-OCRv4 rec over seeds 0/1 it cost 0.9 dB and 2.4 points
    # of exact match and made the seed spread 2.0 dB instead of 0.4; on ddddocr's recognizer 23.50 /
    # 23.44 dB without it against 21.67 / 23.25 with it; the zoo within noise either way; PP-OCRv4
    # det the one loser, 0.6 dB at both seeds. Both the gain and the losses are gamma's: gamma alone
    # keeps det's 0.6 dB and costs rec up to 4 dB; a held-out guard per block does not catch it.
    affine: bool = False
    stage_supervision: bool = False
    stage_iterations: int = 50
    qdrop: float = 0.0               # probability of taking an input element from the float model
    # "auto": MAE (RepAPQ) where every weight and activation is on an 8-bit grid, MSE below. Measured
    # (BENCHMARKS.md, session 15): PP-OCRv4 rec W4A8 exact match 0.368 / 0.416 (seeds 0 / 1) with MAE
    # against 0.586 / 0.430 with MSE (9.18 / 10.27 dB against 11.57 / 10.64), W6A6 0.160 against 0.230,
    # the classifier W4A8 +0.6 dB, W6A6 -0.5 dB, the zoo below 8 bits within noise; at 8 bits the two
    # read alike on rec and the classifier.
    loss: Literal["auto", "mae", "mse"] = "auto"

    def loss_for(self, narrowest_bits: int) -> str:
        """The loss used, given the narrowest nominal weight or activation width of the model."""
        if self.loss != "auto":
            return self.loss
        return "mse" if narrowest_bits < 8 else "mae"


@dataclass(frozen=True)
class BiasCorrectionConfig:
    """Empirical bias correction (emit/bias_correction.py): each layer's mean output shift moved into its bias."""
    max_samples: int = 64          # calibration samples run once through each model (the notes give the shifts' standard error)
    # 0: one onnxruntime pass per dependency level, so a layer is measured after every layer it
    # depends on was corrected. A cap merges neighbouring levels (fewer passes) and counts their
    # shifts twice: on the zoo at 4-bit weights 4 bands for 10 levels lost 1-12 dB to 10.
    max_bands: int = 0
    # Where the float and quantized means are matched: at the layer output, or after the Relu/Clip
    # that is its only consumer (noise around zero raises a Relu's mean even when the
    # pre-activation mean is right). "activation": up to 3.4 dB better on the zoo at 4-bit weights
    # with the scale search alone. "auto": "activation" after the scale search alone, "layer" after
    # reconstruction, whose MAE loss matches each block's medians and leaves its means shifted: on
    # PP-OCRv4 rec (BENCHMARKS.md, session 16) exact / CER 0.708 / 0.178 and 0.694 / 0.182 at seeds
    # 0 / 1 (0.694 / 0.188 without); measured after the activations it had cost rec 2 to 3 points
    # of exact match (session 14, on another host).
    measure: Literal["auto", "layer", "activation"] = "auto"
    # Quantized values drawn per channel to solve the post-activation shift. 4096 left PP-OCRv4 rec `--fast`
    # 2.5 dB apart between seeds (15.29 / 12.81 / 14.45); 32768: 15.18 / 15.11 / 15.51 (BENCHMARKS.md, session 14).
    values_per_channel: int = 32768
    # Keep the corrected biases only where they leave the model outputs (onnxruntime, the same
    # samples, kernels fused as deployed) no further from the float ones than before. Matching each
    # layer's mean does not always bring the outputs closer: on ddddocr's recognizer (convolutions
    # into an LSTM) `--fast` lost 2.1 dB with it, while rec, det and the zoo gained 0.5 to 5 dB
    # (BENCHMARKS.md, session 17; the guard undoes ddddocr's and, a near tie on the calibration
    # samples, the zoo's acnet's). The API turns it off where a user asked for the correction by
    # name (``QuantConfig.bias_correction=True``).
    guard: bool = True

    def __post_init__(self) -> None:
        if self.max_samples < 1 or self.max_bands < 0 or self.values_per_channel < 1:
            raise UserError("bias correction needs max_samples, values_per_channel >= 1 and max_bands >= 0")
        if self.measure not in ("auto", "layer", "activation"):
            raise UserError(f"bias correction measure must be 'auto', 'layer' or 'activation', got {self.measure!r}")

    def measure_after(self, reconstructed: bool) -> str:
        """Where the means are matched, given whether block reconstruction ran before the correction."""
        if self.measure != "auto":
            return self.measure
        return "layer" if reconstructed else "activation"


@dataclass(frozen=True)
class NodeOverride:
    """Settings for the nodes whose name or op type matches the glob ``match``; None keeps the global one.

    ``scale_search`` picks the range search of the activations the node reads, ``weight_scale_search``
    that of its weight. Where several overrides match a node, the later one wins field by field.
    """
    match: str
    keep_float: bool = False
    weight_bits: Optional[int] = None
    scale_search: Optional[ScaleSearch] = None
    weight_scale_search: Optional[ScaleSearch] = None

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match:
            raise UserError("an override needs a non-empty match pattern")
        if self.weight_bits is not None and (not isinstance(self.weight_bits, int) or not 2 <= self.weight_bits <= 8):
            raise UserError(f"override {self.match!r}: weight bits must be an integer from 2 to 8")
        for name in ("scale_search", "weight_scale_search"):
            if getattr(self, name) not in (None, *SCALE_SEARCHES):
                raise UserError(f"override {self.match!r}: unknown {name} {getattr(self, name)!r}")

    def matches(self, name: str, op: str) -> bool:
        return fnmatchcase(name, self.match) or fnmatchcase(op, self.match)


@dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = 8
    activation_bits: int = 8
    # Measured (BENCHMARKS.md): MSE for both. MAE on a single activation tensor clips tails that
    # deep layers still need (PP-OCRv4 rec: 0.8 dB output SQNR against 11 dB), and MAE on weights
    # clips the one large centre tap a merged identity branch leaves per channel (zoo RepVGG:
    # 57% top-1 against 89% with MSE). MAE belongs to the block reconstruction loss instead.
    scale_search: ScaleSearch = "mse"
    weight_scale_search: ScaleSearch = "mse"
    percentile: float = 99.99
    target: Target = "ort-cpu"
    # onnxruntime's u8 x s8 kernels saturate int16 pairs on x86 CPUs without VNNI (emit/saturation.py:
    # 18.8 dB against 30.4 on one net). "reduced" holds 8-bit weights to [-64, 64]; "paired" keeps the
    # full grid and holds only same-sign adjacent pairs of the reduction axis to |a| + |b| <= 128
    # (search/weight_pairs.py; depthwise convs, summed in int32, need nothing; layers whose order is
    # not known fall back to reduced): PP-OCRv4 rec weight error 37.4 dB against 32.4 reduced, but
    # model outputs no better (BENCHMARKS.md, session 11). "auto" reduces when the target has that
    # problem and this host lacks VNNI, else "full". Quantizing on a VNNI machine for AVX2 servers:
    # say "reduced" (or "paired").
    weight_range: WeightRange = "auto"
    seed: int = 0
    fuse_branches: bool = True
    # Data-aware cross-layer equalization (passes/equalize.py), exact in float. On: PP-OCRv4 rec exact
    # match 0.665 -> 0.715 (fast) and 0.650 -> 0.710 (reconstruction), BENCHMARKS.md run B; it fixes
    # strongly unbalanced nets (+13 to +31 dB on synthetic ones) and leaves the zoo unchanged (its
    # channels sit within 4x of the median). Across gated HardSwish and learnable affines (session 13)
    # PP-OCRv4 det gained 1.1-1.3 dB and rec 0.2 dB. Costs one calibration pass (64 samples).
    equalize: bool = True
    # With equalize: move calibration minima of Relu channels into the next conv's bias (off: not
    # exact on inputs that dip below them; passes/equalize.py EqualizeConfig.absorb_high_bias).
    absorb_high_bias: bool = False
    # Empirical bias correction after the scale search (and reconstruction), before emitting.
    # None: on with the fast recipe (guarded: BiasCorrectionConfig.guard), where it is the only
    # correction of weight rounding (BENCHMARKS.md: PP-OCRv4 rec +1.7 dB and exact match 0.665 -> 0.700,
    # det IoU 0.952 -> 0.966, zoo +0.3 to +1.2 dB at W8, for about 10-20 s on rec), off after
    # reconstruction, which already learns each block against the float outputs. On there (an ablation:
    # --bias-correction) it matches layer-output means: PP-OCRv4 rec CER 0.188 / 0.199 -> 0.178 / 0.182
    # at seeds 0 / 1 at 0.2 to 0.3 dB of output SQNR, but ddddocr's recognizer lost 4.4 dB and 7 points
    # of agreement, det 0.6 dB, and rec at W6A6 read every line as blank (session 16).
    bias_correction: Optional[bool] = None
    # Outlier-aware activation ranges: a tensor whose channels include outliers (find_outliers) gets a
    # range that reaches those channels' median-sample min and max (channel_stats.outlier_cover).
    # Off (BENCHMARKS.md): the zoo has no outlier channels (models unchanged); on PP-OCRv4 rec it
    # lost 0.8 dB output SQNR and 3.5 points exact match (11.5 -> 10.7 dB, 0.665 -> 0.630), as
    # 8-bit MSE already keeps most such channels and the wider grid costs the rest. It pays where
    # the search clips a channel the output reads: +6.5 dB with MAE, +2.0 dB at 4-bit activations
    # (+0.8 after an MSE reconstruction).
    outlier_aware_ranges: bool = False
    # Op types or node names kept in float whatever the planner would do.
    keep_float: tuple[str, ...] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    # Scale search only (True) or block-wise reconstruction on top (False, the default: the most
    # accurate recipe). Reconstruction gained 1.6 dB output SQNR on PP-OCRv4 rec and 2.7 dB on the
    # PP-OCR classifier (BENCHMARKS.md); the per-step element cap keeps PP-OCRv4 det at 480x480 near
    # 6 min and rec near 5.5 min on 2 cores. `--fast` keeps scale search only (under a minute there).
    fast: bool = False
    overrides: tuple[NodeOverride, ...] = ()
    # Per-layer weight widths chosen under a budget (RFQuant-style greedy search); off without one.
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    # Per-channel k-means codebooks of 2^weight_bits int8 entries instead of the uniform grid
    # (search/clustering.py); emitted as indices + codebook that onnxruntime folds to int8 weights.
    clustered_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise UserError(f"{name.replace('_', ' ')} must be an integer from 2 to 8, got {bits!r}")
        if self.activation_bits < 4:
            # Fewer than 16 levels per tensor: every net measured here falls apart, and no
            # runtime has kernels for it; say so instead of writing a useless model.
            raise UserError(f"activation bits must be from 4 to 8, got {self.activation_bits}")
        for name in ("scale_search", "weight_scale_search"):
            if getattr(self, name) not in SCALE_SEARCHES:
                raise UserError(f"unknown {name.replace('_', '-')} {getattr(self, name)!r};"
                                f" choose one of {', '.join(SCALE_SEARCHES)}")
        if self.weight_range not in WEIGHT_RANGES:
            raise UserError(f"unknown weight range {self.weight_range!r}; choose one of {', '.join(WEIGHT_RANGES)}")
        if self.target not in TARGETS:
            raise UserError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.weight_range == "unsigned" and self.target != "ort-cpu":
            raise UserError("weight range 'unsigned' stores weights as uint8 for onnxruntime CPU's u8 x u8 kernels;"
                            f" {self.target} takes int8 weights: choose another weight range")
        if not 50.0 < self.percentile <= 100.0:
            raise UserError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.calibration.max_samples < 1:
            raise UserError("calibration max samples must be at least 1")
        rec = self.reconstruction
        if rec.rounding not in ("adaround", "nearest") or rec.loss not in ("auto", "mae", "mse"):
            raise UserError(f"unknown reconstruction rounding {rec.rounding!r} or loss {rec.loss!r}")
        if rec.iterations < 0 or rec.batch_size < 1 or rec.max_layers_per_block < 1 or not 0 <= rec.qdrop <= 1 \
                or rec.max_step_elements < 1 or not rec.activation_step_floor >= 0:
            raise UserError("reconstruction needs iterations >= 0, batch size, layers per block and step"
                            " elements >= 1, qdrop in [0, 1], activation step floor >= 0")

        mixed = self.mixed_precision
        if mixed.enabled:
            if any(b is not None and b <= 0 for b in (mixed.budget_size_mb, mixed.budget_bitops_g,
                                                      mixed.budget_mean_bits)):
                raise UserError("mixed-precision budgets must be positive")
            if not mixed.candidates or any(not isinstance(b, int) or not 2 <= b <= 8 for b in mixed.candidates):
                raise UserError("mixed-precision candidate widths must be integers from 2 to 8")
            if mixed.samples < 1 or any(not pull > 0 for pull in mixed.uniform_pulls):
                raise UserError("mixed-precision search needs at least 1 sample and positive pulls toward uniform")
        if self.clustered_weights and not self.fast:
            raise UserError("clustered weights need the fast recipe (reconstruction learns rounding on the"
                            " uniform grid): add --fast")
        if self.clustered_weights and self.target != "ort-cpu":
            raise UserError("clustered weights are emitted for onnxruntime only (it folds the codebook to int8"
                            " weights at load): use --target ort-cpu")


    def with_(self, **changes) -> "QuantConfig":
        return replace(self, **changes)

    @property
    def corrects_bias(self) -> bool:
        return self.fast if self.bias_correction is None else self.bias_correction

    @property
    def float_patterns(self) -> tuple[str, ...]:
        """``keep_float`` plus the matches of the overrides that keep their nodes float."""
        return self.keep_float + tuple(o.match for o in self.overrides if o.keep_float)

    def for_node(self, name: str, op: str) -> NodeOverride:
        """The effective settings of one node, every field filled."""
        settings = {"weight_bits": self.weight_bits, "scale_search": self.scale_search,
                    "weight_scale_search": self.weight_scale_search, "keep_float": False}
        for override in self.overrides:
            if override.matches(name, op):
                settings.update({k: v for k, v in asdict(override).items() if k != "match" and v not in (None, False)})
        return NodeOverride(match=name, **settings)



# Recipes: a TOML/YAML/JSON file whose tables are these dataclasses, key for key.

def config_from_dict(data: Any, cls: type = QuantConfig, where: str = "") -> Any:
    """Build ``cls`` from a recipe mapping; an unknown key is a UserError naming it with its table."""
    if not isinstance(data, Mapping):
        raise UserError(f"recipe {where.rstrip('.') or 'file'} must be a table, got {data!r}")
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise UserError(f"unknown recipe key {where + str(key)!r}; known keys: {', '.join(known)}")
    try:
        return cls(**{key: _recipe_value(value, hints[key], where + key) for key, value in data.items()})
    except TypeError as exc:  # a required field is missing
        raise UserError(f"recipe table {where.rstrip('.') or 'top level'}: {exc}") from None


def _recipe_value(value: Any, hint: Any, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return None if value is None else _recipe_value(value, next(a for a in args if a is not type(None)), key)
    if is_dataclass(hint):
        return config_from_dict(value, hint, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"recipe key {key!r} takes a list, got {value!r}")
        return tuple(_recipe_value(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
    if origin is Literal:
        if value not in args:
            raise UserError(f"recipe key {key!r} takes one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    accepted = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}.get(hint, (object,))
    if not isinstance(value, accepted) or (hint is not bool and isinstance(value, bool)):
        raise UserError(f"recipe key {key!r} takes {getattr(hint, '__name__', hint)}, got {value!r}")
    return float(value) if hint is float else value


def load_recipe(path: str | Path) -> QuantConfig:
    """A QuantConfig from a .toml, .yaml/.yml or .json recipe file."""
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise UserError(f"recipe must be a .toml, .yaml/.yml or .json file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text) or {}
    except ImportError as exc:
        raise UserError(f"reading {path.suffix} recipes needs the {exc.name} module") from None
    except Exception as exc:
        raise UserError(f"cannot parse recipe {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(data, dict) and "override" in data and "overrides" not in data:
        data["overrides"] = data.pop("override")  # [[override]] reads better in TOML than [[overrides]]
    return config_from_dict(data)



def recipe_toml(config: QuantConfig) -> str:
    """The config as a TOML recipe that load_recipe() reads back into an equal config."""
    return "\n".join(_toml_lines(asdict(config), "")).lstrip("\n") + "\n"


def _toml_lines(table: dict, prefix: str) -> list[str]:
    def is_table_list(value) -> bool:
        return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, dict) for v in value)

    lines = [f"{key} = {_toml_value(value)}" for key, value in table.items()
             if value is not None and not isinstance(value, dict) and not is_table_list(value)]
    for key, value in table.items():
        if isinstance(value, dict):
            lines += ["", f"[{prefix}{key}]", *_toml_lines(value, f"{prefix}{key}.")]
        elif is_table_list(value):
            for item in value:
                lines += ["", f"[[{prefix}{key}]]", *_toml_lines(item, f"{prefix}{key}.")]
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    return repr(value)
