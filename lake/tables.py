"""Arrow layout of the activation tables, and zero-copy conversion to torch.

tokens.lance (1d):   token_id int32, context_id int64, position int32,
                     <col> fixed_size_list<storage, width>, <col>_norm float32    (per hook)
contexts.lance (2d): context_id int64, doc_id int64, doc_offset int32,
                     tokens fixed_size_list<int32, T>,
                     <col> fixed_size_list<fixed_size_list<storage, width>, T>,
                     <col>_norm fixed_size_list<float32, T>                        (per hook)

A hook column holds its codec's storage elements (``lake/codecs.py``): for float16/float32 the
values themselves (width = d); bfloat16 as its raw 16 bits in uint16 (Arrow has no bfloat16);
int8/float8 as codes followed by their scales in the same cell (width > d). The field carries
``saelake.dtype`` (the codec) and ``saelake.d_model`` so nobody reads stored elements as values:
``arrow_to_acts`` decodes, and it is the only way out.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import torch

from .codecs import get_codec


def column_name(hook: str) -> str:
    """Lance field names cannot contain '.': blocks.3.hook_resid_post -> blocks_3_hook_resid_post (a
    model's hook in a run of several models, a:blocks.3.hook_resid_post -> a__blocks_3_hook_resid_post)."""
    return hook.replace(".", "_").replace(":", "__")


def acts_to_arrow(stored: torch.Tensor) -> pa.Array:
    """[n, width] (or [n, T, width]) storage elements (``Codec.encode``'s output) -> nested
    fixed_size_list array."""
    t = stored.detach().contiguous()
    # numpy has no bfloat16 and torch's uint16 is not numpy-convertible: hand over the raw bits
    flat = t.view(torch.int16).numpy().view(np.uint16) if t.dtype in (torch.uint16, torch.bfloat16) else t.numpy()
    arr = pa.array(flat.reshape(-1))
    for size in reversed(t.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def acts_field(name: str, dtype: str, shape: tuple[int, ...]) -> pa.Field:
    """The field of a hook column: ``shape`` ends with d_model; cells hold the codec's width."""
    codec = get_codec(dtype)
    typ = codec.arrow
    for size in reversed((*shape[:-1], codec.width(shape[-1]))):
        typ = pa.list_(typ, size)
    return pa.field(name, typ, metadata={"saelake.dtype": dtype, "saelake.d_model": str(shape[-1])})


def _values(arr: pa.Array | pa.ChunkedArray, depth: int) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    for _ in range(depth):
        arr = arr.flatten()  # respects slice offsets; no copy
    return arr.to_numpy(zero_copy_only=True)


def arrow_to_stored(arr, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A hook column's cells as stored, zero-copy where Arrow allows: [n, *shape[:-1], width] storage
    elements (``shape`` ends with d_model). Only for moving rows around: decode before use."""
    codec = get_codec(dtype)
    values = _values(arr, len(shape))
    with warnings.catch_warnings():  # Arrow buffers are read-only; we never write into them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(values)
    return t.view(-1, *shape[:-1], codec.width(shape[-1]))


def arrow_to_acts(arr, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode a hook column: [n, *shape] activations (``shape`` ends with d_model). Plain codecs come
    back zero-copy in their storage dtype (float16, bfloat16, float32); int8/float8 as float32."""
    return get_codec(dtype).decode(arrow_to_stored(arr, dtype, shape), shape[-1])


def as_float32_for_sql(batch: pa.RecordBatch, hooks: dict[str, tuple[str, int]]) -> pa.RecordBatch:
    """Decode activation columns (``hooks``: column -> (codec, d_model)) to float32 lists: DuckDB
    cannot read Arrow float16, our bfloat16 bits, or codes (and must never see codes without scales)."""
    cols, fields = [], []
    for field, col in zip(batch.schema, batch.columns):
        if field.name in hooks:
            dtype, d = hooks[field.name]
            shape = []
            typ = field.type
            while pa.types.is_fixed_size_list(typ):
                shape.append(typ.list_size)
                typ = typ.value_type
            shape[-1] = d  # the cell holds the codec's width
            x = arrow_to_acts(col, dtype, tuple(shape)).float()
            col = acts_to_arrow(x.view(-1, *shape))
            field = acts_field(field.name, "float32", tuple(shape))
        cols.append(col)
        fields.append(field)
    return pa.RecordBatch.from_arrays(cols, schema=pa.schema(fields))
