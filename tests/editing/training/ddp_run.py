"""Run by `test_ddp.py`, alone and under ``accelerate launch``: a few VEAD + IM training steps on a tiny
backbone; the main process writes the step-1 gradient (summed over the processes) and the final weights.

    python ddp_run.py NAME MODEL_FOLDER TRAIN_JSON OUT.safetensors STEPS ROWS_PER_BACKWARD PRODUCT_CHUNK
"""
import sys

from safetensors.torch import save_file

from attrib.backbones.loader import load_backbone
from attrib.data import load_records
from attrib.parallel import finish, processes
from editing.adapter.vead import VeadConfig
from editing.adapter.visedit import EditPlacement, VisEditEditor
from editing.training.config import TrainConfig
from editing.training.loop import train


def main(name: str, folder: str, data: str, out: str, steps: str, rows: str, chunk: str) -> None:
    backbone = load_backbone(name, folder)
    editor = VisEditEditor(backbone, EditPlacement(0, (1,), 1),
                           VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2, scene_gate=True,
                                      target_role=True))
    config = TrainConfig(steps=int(steps), batch_size=4, lr=1e-3, influence_draws=1, loc_partners=1,
                         rows_per_backward=int(rows), product_chunk=int(chunk), scene_reference=4)
    kept = {}

    def keep(step: int, losses: dict) -> None:
        if step == 1:
            kept.update({f"grad.{k}": p.grad.clone() for k, p in editor.adapter.named_parameters()
                         if p.grad is not None})

    trained = train(editor, load_records(data), config, progress=False, on_step=keep)
    kept.update({f"weight.{k}": p.detach().clone() for k, p in editor.adapter.named_parameters()})
    if processes().main:
        losses = {f"{k}": str(v) for k, v in trained.history[-1].items()}
        save_file({k: v.contiguous() for k, v in kept.items()}, out, metadata=losses)


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish()
