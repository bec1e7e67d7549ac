"""Arrow layout of the activation tables, and zero-copy conversion to torch.

tokens.lance (1d):   token_id int32, context_id int64, position int32,
                     <col> fixed_size_list<dtype, d>, <col>_norm float32    (per hook)
contexts.lance (2d): context_id int64, doc_id int64, doc_offset int32,
                     tokens fixed_size_list<int32, T>,
                     <col> fixed_size_list<fixed_size_list<dtype, d>, T>,
                     <col>_norm fixed_size_list<float32, T>                  (per hook)

Arrow has no bfloat16: bfloat16 activations are stored as their raw 16 bits in uint16
values, and the field carries ``saelake.dtype = bfloat16`` so nobody reads them as ints.
"""
from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ARROW_VALUES = {"float16": pa.float16(), "bfloat16": pa.uint16(), "float32": pa.float32()}


def column_name(hook: str) -> str:
    """Lance field names cannot contain '.': blocks.3.hook_resid_post -> blocks_3_hook_resid_post."""
    return hook.replace(".", "_")


def acts_to_arrow(x: torch.Tensor, dtype: str) -> pa.Array:
    """[n, d] (or [n, T, d]) float tensor -> nested fixed_size_list array in the storage dtype."""
    t = x.detach().to(DTYPES[dtype]).contiguous()
    flat = t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()
    arr = pa.array(flat.reshape(-1), type=ARROW_VALUES[dtype])
    for size in reversed(x.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def acts_field(name: str, dtype: str, shape: tuple[int, ...]) -> pa.Field:
    typ = ARROW_VALUES[dtype]
    for size in reversed(shape):
        typ = pa.list_(typ, size)
    return pa.field(name, typ, metadata={"saelake.dtype": dtype})


def _values(arr: pa.Array | pa.ChunkedArray, depth: int) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    for _ in range(depth):
        arr = arr.flatten()  # respects slice offsets; no copy
    return arr.to_numpy(zero_copy_only=True)


def arrow_to_acts(arr, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of acts_to_arrow, zero-copy where Arrow allows: [n, *shape] in the storage dtype."""
    values = _values(arr, len(shape))
    with warnings.catch_warnings():  # Arrow buffers are read-only; we never write into them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(values)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.view(-1, *shape)


def as_float32_for_sql(batch: pa.RecordBatch, dtypes: dict[str, str]) -> pa.RecordBatch:
    """Cast activation columns to float32 lists: DuckDB cannot read Arrow float16 or our bf16 bits."""
    cols, fields = [], []
    for field, col in zip(batch.schema, batch.columns):
        dtype = dtypes.get(field.name)
        if dtype in ("float16", "bfloat16"):
            shape = []
            typ = field.type
            while pa.types.is_fixed_size_list(typ):
                shape.append(typ.list_size)
                typ = typ.value_type
            x = arrow_to_acts(col, dtype, tuple(shape)).float()
            col = acts_to_arrow(x.view(-1, *shape), "float32")
            field = acts_field(field.name, "float32", tuple(shape))
        cols.append(col)
        fields.append(field)
    return pa.RecordBatch.from_arrays(cols, schema=pa.schema(fields))
