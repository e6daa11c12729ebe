"""Exact rewrites of a model OpenVINO read from our ONNX graphs, at the static shapes it compiles for: the same
values up to f32 rounding, in forms its CPU kernels run faster. Each returns how many places it rewrote."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from . import upsampling

if TYPE_CHECKING:
    from openvino import Model

NAMES = ("phase_upsampling", "group_norms")  # in the order they run


def check(skip: Collection[str]) -> None:
    """Raise ValueError naming any of `skip` that is not a rewrite."""
    unknown = set(skip) - set(NAMES)
    if unknown:
        raise ValueError(f"no rewrite named {', '.join(sorted(unknown))} (there are {', '.join(NAMES)})")


def apply(model: Model, skip: Collection[str] = ()) -> dict[str, int]:
    """Every rewrite but those named in `skip`, in place; their counts by name. (A --static folder's wide
    upsamplers come phased already.)"""
    check(skip)
    # looked up at each call, not at import: tests count a rewrite by patching its module attribute
    rewrites = {"phase_upsampling": phase_upsampling, "group_norms": group_norms}
    return {name: rewrites[name](model) for name in NAMES if name not in skip}


def phase_upsampling(model: Model) -> int:
    """Rewrite each 2x nearest Interpolate feeding only a 3x3 Convolution (constant f32 weights, unit stride and
    dilation, padding 1, `upsampling.MIN_CHANNELS` inputs or more) into `upsampling`'s phase form (four 2x2
    Convolutions, a Concat, a DepthToSpace) where the static shapes show an exact doubling; returns how many. An
    upsampling to an odd size (a U-Net after an odd skip) is left as it is: its last row's taps differ."""
    from openvino import opset13 as ops

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Interpolate" or not _doubles(op):
            continue
        consumers = list(op.output(0).get_target_inputs())
        conv = consumers[0].get_node() if len(consumers) == 1 else None
        if conv is None or conv.get_type_name() != "Convolution" or consumers[0].get_index() != 0:
            continue
        attrs, weight = conv.get_attributes(), conv.input_value(1).get_node()
        if (attrs.get("strides") != [1, 1] or attrs.get("dilations") != [1, 1] or
                attrs.get("pads_begin") != [1, 1] or attrs.get("pads_end") != [1, 1] or
                attrs.get("auto_pad") not in ("explicit", "notset") or weight.get_type_name() != "Constant"):
            continue
        kernel = weight.get_data()
        if kernel.ndim != 4 or kernel.shape[2:] != (3, 3) or kernel.dtype != np.float32:
            continue
        x = op.input_value(0)
        phases = [ops.convolution(x, ops.constant(k), [1, 1], *upsampling.phase_pads(a, b), [1, 1])
                  for (a, b), k in zip(upsampling.PHASES, upsampling.phase_kernels(kernel))]
        out = ops.depth_to_space(ops.concat(phases, 1), "blocks_first", 2)
        out.set_friendly_name(conv.get_friendly_name() + "/phases")
        conv.output(0).replace(out.output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


def _doubles(op) -> bool:
    """Whether an Interpolate is a 2x nearest upsampling of a static [N, C >= MIN_CHANNELS, H, W] tensor whose
    output pixel (i, j) reads input pixel (i // 2, j // 2): by sizes, or by constant scales of exactly 2."""
    attrs = op.get_attributes()
    src, dst = op.get_input_partial_shape(0), op.get_output_partial_shape(0)
    if (attrs.get("mode") != "nearest" or attrs.get("coordinate_transformation_mode") != "asymmetric"
            or attrs.get("nearest_mode") != "floor" or attrs.get("antialias")
            or any(attrs.get("pads_begin", [])) or any(attrs.get("pads_end", []))
            or not (src.is_static and dst.is_static) or len(src) != 4):
        return False
    n, c, h, w = (d.get_length() for d in src)
    if [d.get_length() for d in dst] != [n, c, 2 * h, 2 * w] or c < upsampling.MIN_CHANNELS:
        return False
    if attrs.get("shape_calculation_mode") == "sizes":
        return True
    # by scales (one input of floats): output pixel i reads floor(i / scale), so the scale itself must be 2
    scales = [op.input_value(i).get_node() for i in range(1, op.get_input_size())
              if op.input_value(i).get_element_type().is_real()]
    return (len(scales) == 1 and scales[0].get_type_name() == "Constant"
            and set(np.asarray(scales[0].get_data()).ravel().tolist()) <= {1.0, 2.0})


def group_norms(model: Model) -> int:
    """Rewrite each GroupNorm as ONNX writes it (Reshape to [N, G, -1], InstanceNormalization with unit scale and
    zero bias, Reshape back, then the per-channel affine), which OpenVINO runs on a planar copy of the tensor with a
    layout reorder on each side, into reductions over the spatial axes of the [N, C, H, W] tensor itself: channel
    means averaged within each group, x minus the group mean, the same for the variance, then one per-channel scale
    and shift. Two passes, as MVN, so the variance is as accurate; every big-tensor op keeps the channels-last
    layout the int8 convolutions around it use. Static f32 tensors only."""
    count = 0
    for mvn in model.get_ordered_ops():
        norm = _group_norm(mvn) if mvn.get_type_name() == "MVN" else None
        if norm is None:
            continue
        norm.end.output(0).replace(_group_norm_by_channels(norm).output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


class _GroupNorm(NamedTuple):
    x: object  # the [N, C, H, W] input (an OpenVINO Output)
    groups: int
    eps: float
    gamma: np.ndarray  # [C]
    beta: np.ndarray  # [C]
    end: object  # the node whose output the rewrite replaces


def _group_norm(mvn) -> _GroupNorm | None:
    """The GroupNorm around this MVN, or None."""
    attrs = mvn.get_attributes()
    to_groups = mvn.input_value(0).get_node()
    if (not attrs.get("normalize_variance") or attrs.get("eps_mode") != "INSIDE_SQRT"
            or to_groups.get_type_name() != "Reshape"):
        return None
    x = to_groups.input_value(0)
    shape, grouped = _static(x.get_partial_shape()), _static(mvn.get_input_partial_shape(0))
    if (shape is None or grouped is None or len(shape) != 4 or len(grouped) != 3
            or x.get_element_type().get_type_name() != "f32"):
        return None
    n, c, h, w = shape
    groups = grouped[1]
    axes = _constant(mvn.input_value(1))
    if grouped != [n, groups, c // groups * h * w] or axes is None or axes.ravel().tolist() not in ([2], [-1]):
        return None
    scale = _sole_consumer(mvn, "Multiply")
    bias = _sole_consumer(scale, "Add")
    back = _sole_consumer(bias, "Reshape")
    if (back is None or not np.all(_operand(scale, mvn) == 1) or not np.all(_operand(bias, scale) == 0)
            or _static(back.get_output_partial_shape(0)) != [n, c, h, w]):
        return None
    times = _sole_consumer(back, "Multiply")
    plus = _sole_consumer(times, "Add")
    gamma, beta = _per_channel(times, back, c), _per_channel(plus, times, c)
    if gamma is None or beta is None:  # no affine we can fold (or not f32): it stays, after the rewrite
        return _GroupNorm(x, groups, float(attrs["eps"]), np.ones(c, np.float32), np.zeros(c, np.float32), back)
    return _GroupNorm(x, groups, float(attrs["eps"]), gamma, beta, plus)


def _group_norm_by_channels(norm: _GroupNorm):
    from openvino import opset13 as ops

    x, groups, eps, gamma, beta = norm.x, norm.groups, norm.eps, norm.gamma, norm.beta
    n, c = _static(x.get_partial_shape())[:2]
    spatial = ops.constant(np.array([2, 3], np.int64))

    def group_mean(per_channel):  # [N, C, 1, 1] -> each group's mean, repeated over its channels
        grouped = ops.reshape(per_channel, ops.constant(np.array([n, groups, c // groups], np.int64)), False)
        mean = ops.reduce_mean(grouped, ops.constant(np.array([2], np.int64)), True)
        spread = ops.broadcast(mean, ops.constant(np.array([n, groups, c // groups], np.int64)))
        return ops.reshape(spread, ops.constant(np.array([n, c, 1, 1], np.int64)), False)

    centred = ops.subtract(x, group_mean(ops.reduce_mean(x, spatial, True)))
    variance = group_mean(ops.reduce_mean(ops.multiply(centred, centred), spatial, True))
    scale = ops.divide(ops.constant(gamma.reshape(1, c, 1, 1).astype(np.float32)),
                       ops.sqrt(ops.add(variance, ops.constant(np.float32(eps)))))
    return ops.add(ops.multiply(centred, scale), ops.constant(beta.reshape(1, c, 1, 1).astype(np.float32)))


def _static(shape) -> list[int] | None:
    return [d.get_length() for d in shape] if shape.is_static else None


def _per_channel(node, other, channels: int) -> np.ndarray | None:
    """The f32 operand of a binary node beside `other` if it broadcasts along the channel axis of [N, C, H, W]
    ([C, 1, 1] or [1, C, 1, 1], as torch writes a GroupNorm's weight and bias), flattened to [C]."""
    operand = _beside(node, other)
    if operand is None or _static(operand.get_partial_shape()) not in ([channels, 1, 1], [1, channels, 1, 1]):
        return None
    data = _constant(operand)
    return data.reshape(channels) if data is not None and data.dtype == np.float32 else None


def _sole_consumer(node, kind: str):
    """The one consumer of a node's output, if it is of this kind (shape queries, folded at static shapes, aside)."""
    if node is None:
        return None
    users = [t.get_node() for t in node.output(0).get_target_inputs() if t.get_node().get_type_name() != "ShapeOf"]
    return users[0] if len(users) == 1 and users[0].get_type_name() == kind else None


def _operand(node, other) -> np.ndarray | None:
    """The constant operand of a binary node whose other operand is `other`'s output."""
    operand = _beside(node, other)
    return None if operand is None else _constant(operand)


def _beside(node, other):
    """The input of a binary node that is not `other`'s output (None if neither or no node)."""
    if node is None or node.get_input_size() != 2:
        return None
    for i in (0, 1):
        if node.input_value(i).get_node().get_instance_id() == other.get_instance_id():
            return node.input_value(1 - i)
    return None


def _constant(value) -> np.ndarray | None:
    """A value's data if it is a constant, or a constant only reshaped (ONNX's InstanceNormalization scale)."""
    node = value.get_node()
    if node.get_type_name() in ("Reshape", "Unsqueeze", "Squeeze"):
        node = node.input_value(0).get_node()
    return np.asarray(node.get_data()) if node.get_type_name() == "Constant" else None
