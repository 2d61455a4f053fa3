"""Where a backbone runs and in which precision: the ``--device`` / ``--dtype`` options of every command.

    --device auto       the process's GPU under ``accelerate launch``, else cuda when one is visible, else cpu
    --device cuda:1     one device (``cpu``, ``cuda``, ``cuda:N``)
    --device balanced   the backbone spread over every visible GPU (``device_map="auto"``: a model larger than
                        one GPU); one process only
    --dtype auto        bfloat16 on a GPU, float32 on the CPU (``float32`` / ``bfloat16`` / ``float16``)

Inputs follow the model: `Backbone.encode` puts them on the device of the input embeddings. Adapters and
learned editors keep float32 master weights on that device whatever the backbone's dtype (the adapter's
output is cast to the hidden states' dtype where it is added). Noise draws stay on the CPU generator and
are moved afterwards, so a seed draws the same numbers on any device.
"""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_HELP = "auto | cpu | cuda | cuda:N | balanced (spread over every visible GPU)"
DTYPE_HELP = "auto (bfloat16 on a GPU, float32 on the CPU) | float32 | bfloat16 | float16"


def resolve_placement(device: str = "auto", dtype: str = "auto") -> tuple[torch.dtype, str | dict | None]:
    """(torch dtype, ``device_map`` for `load_backbone`) of the options; None keeps the model on the CPU as
    ``from_pretrained`` loads it. A device that is not there is refused naming it."""
    from attrib.parallel import device as launched_device
    from attrib.parallel import launched

    if device == "balanced":
        if launched():
            raise ValueError("--device balanced spreads one backbone over every GPU; it cannot run under "
                             "`accelerate launch`, where each process holds its own copy (use --device auto)")
        if not torch.cuda.is_available():
            raise ValueError("--device balanced needs visible GPUs; none is (CUDA_VISIBLE_DEVICES, drivers)")
        target = "balanced"
    elif device == "auto":
        target = str(launched_device() or ("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        try:
            target = str(torch.device(device))
        except RuntimeError:
            raise ValueError(f"--device {device!r}: not a device; use {DEVICE_HELP}") from None
        if target.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no GPU is visible to this process")
    on_gpu = target != "cpu" and not target.startswith("cpu")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if on_gpu else torch.float32
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"--dtype {dtype!r}: choose from auto, {', '.join(DTYPES)}")
    if target == "balanced":
        return torch_dtype, "auto"
    return torch_dtype, (None if not on_gpu else {"": target})
