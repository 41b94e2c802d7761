"""One DALI CPU operator that builds a lesion's network input in a single pass over memory.

The portable graph in loader.py composes the input from stock operators (two arithmetic
expressions, a stack, a flip). On a GPU that is the right choice. On CPU cores each of those
operators reads and writes the whole (C, 512, 256) float32 sample again, and the loader is bound by
memory traffic: about 1,300-1,500 samples/s on this project's 2-core reference machine. This operator does
the same work in one loop. It reads the image and label map once and writes each output element
once, with the view mirror folded into the read index. That reaches about 3,700-4,000 samples/s
(bench/loader.py).

It runs as DALI's `NumbaFunction` operator, so it executes in DALI's CPU thread pool, outside
Python's GIL. DALI's Python wrapper compiles its C-callable glue again for every pipeline (about
2 s each, and every fold builds two). Instead we hand the operator our own C callbacks, compiled
once per machine and cached on disk (`cache=True`). They follow the callback ABI of DALI's numba
plugin (nvidia/dali/plugin/numba/__init__.py: `_run_fn_sig`, `_setup_fn_sig`, `_get_shape_view`).
That ABI is internal, so pyproject pins DALI, and tests/test_loader.py checks this operator against
the Dataset bit for bit.

Inputs per sample: image (H, W) float32, labels (H, W) uint16, lesion id (1,) uint16, flip (1,)
int32. Output: (C, H, W) float32 with C = 3 (image, lesion, other lesions) or 2 (no other-lesions
channel), as defined in wbs_dist.preprocess (`make_input`, `mirror_views`: the reference it is tested against).
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit
from numba import types as nt
from numba.core import cgutils
from numba.extending import intrinsic
from nvidia.dali import types
from nvidia.dali.plugin.numba import NumbaFunction


@intrinsic
def _ptr(typingctx, address):
    """int64 address → void* (the callbacks receive raw addresses from DALI)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return nt.voidptr(address), codegen


@njit(cache=True)
def _shape(shapes_ptr, i, ndim):
    """The shape of the i-th output/input of the (only) sample: per-sample mode passes one sample."""
    per_tensor = carray(_ptr(shapes_ptr), i + 1, dtype=np.int64)
    return carray(_ptr(per_tensor[i]), ndim, dtype=np.int64)


@njit(cache=True)
def compose(out, image, labels, lesion_id, flip):
    """out[c, y, x] for one sample; flip mirrors each of the two side-by-side views in place."""
    channels, h, w = out.shape
    half = w // 2
    one, zero = np.float32(1.0), np.float32(0.0)
    for y in range(h):
        for view in range(2):
            base = view * half
            for x in range(half):
                sx = base + (half - 1 - x if flip else x)
                label = labels[y, sx]
                out[0, y, base + x] = image[y, sx]
                out[1, y, base + x] = one if label == lesion_id else zero
                if channels == 3:
                    out[2, y, base + x] = one if (label != 0 and label != lesion_id) else zero


_RUN_SIG = nt.void(nt.uint64, nt.uint64, nt.uint64, nt.int32, nt.uint64, nt.uint64, nt.uint64, nt.int32)
_SETUP_SIG = nt.void(nt.uint64, nt.uint64, nt.int32, nt.uint64, nt.uint64, nt.int32, nt.int32)


@cfunc(_RUN_SIG, nopython=True, cache=True)
def _run(out_ptr, out_shapes_ptr, out_ndims_ptr, num_outs, in_ptr, in_shapes_ptr, in_ndims_ptr, num_ins):
    outs = carray(_ptr(out_ptr), 1, dtype=np.int64)
    ins = carray(_ptr(in_ptr), 4, dtype=np.int64)
    c, h, w = _shape(out_shapes_ptr, 0, 3)
    out = carray(_ptr(outs[0]), (c, h, w), dtype=np.float32)
    image = carray(_ptr(ins[0]), (h, w), dtype=np.float32)
    labels = carray(_ptr(ins[1]), (h, w), dtype=np.uint16)
    lesion_id = carray(_ptr(ins[2]), 1, dtype=np.uint16)[0]
    flip = carray(_ptr(ins[3]), 1, dtype=np.int32)[0]
    compose(out, image, labels, lesion_id, flip)


@njit(cache=True)
def _set_shapes(out_shapes_ptr, in_shapes_ptr, num_ins, num_samples, channels):
    outs = carray(_ptr(out_shapes_ptr), (1, num_samples), dtype=np.int64)
    ins = carray(_ptr(in_shapes_ptr), (num_ins, num_samples), dtype=np.int64)
    for s in range(num_samples):
        o = carray(_ptr(outs[0, s]), 3, dtype=np.int64)
        i = carray(_ptr(ins[0, s]), 2, dtype=np.int64)
        o[0], o[1], o[2] = channels, i[0], i[1]


@cfunc(_SETUP_SIG, nopython=True, cache=True)
def _setup_3(out_shapes_ptr, out_ndims_ptr, num_outs, in_shapes_ptr, in_ndims_ptr, num_ins, num_samples):
    _set_shapes(out_shapes_ptr, in_shapes_ptr, num_ins, num_samples, 3)


@cfunc(_SETUP_SIG, nopython=True, cache=True)
def _setup_2(out_shapes_ptr, out_ndims_ptr, num_outs, in_shapes_ptr, in_ndims_ptr, num_ins, num_samples):
    _set_shapes(out_shapes_ptr, in_shapes_ptr, num_ins, num_samples, 2)


class LesionInputOp(NumbaFunction):
    """NumbaFunction given the compiled callbacks above instead of compiling its own per pipeline;
    `setup_fn` carries the channel count (2 or 3)."""

    def _get_run_fn_cpu(self, *args):
        return _run.address

    def _get_setup_fn_cpu(self, channels):
        return {2: _setup_2, 3: _setup_3}[channels].address


def lesion_input(image, labels, lesion_id, flip, *, channels: int):
    """The DALI node for (C, H, W) inputs; call inside a pipeline definition (CPU only)."""
    op = LesionInputOp(run_fn=None, setup_fn=channels, out_types=[types.FLOAT],
                       in_types=[types.FLOAT, types.UINT16, types.UINT16, types.INT32],
                       outs_ndim=[3], ins_ndim=[2, 2, 1, 1], device="cpu")
    return op(image, labels, lesion_id, flip)
