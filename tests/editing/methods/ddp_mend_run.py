"""Run by `test_mend.py`, alone and under ``accelerate launch``: a few MEND training steps on a tiny
backbone; the main process writes the network's weights and running statistics afterwards.

    python ddp_mend_run.py NAME MODEL_FOLDER TRAIN_JSON OUT.safetensors STEPS
"""
import sys

from safetensors.torch import save_file

from attrib.backbones.loader import load_backbone
from attrib.data import load_records
from attrib.parallel import finish, processes
from editing.methods import MethodContext, build_method, method_config


def main(name: str, folder: str, data: str, out: str, steps: str) -> None:
    backbone = load_backbone(name, folder)
    hyper = {**method_config("mend", name), "steps": int(steps), "batch_size": 4, "rank": 8, "n_edit_layers": 2,
             "lr": 1e-3, "lr_lr": 1e-3, "max_seconds": 600.0}
    editor = build_method("mend", MethodContext(backbone, hyper=hyper, seed=0))
    report = editor.prepare(load_records(data), [])
    if processes().main:
        state = {k: v.detach().clone().contiguous() for k, v in editor.net.state_dict().items()}
        save_file(state, out, metadata={"loss": str(report["loss_curve"][-1]["total"])})


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish()
