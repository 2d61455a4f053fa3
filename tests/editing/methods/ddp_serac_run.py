"""Run by `test_serac.py`, alone and under ``accelerate launch``: SERAC's two training phases on a tiny
backbone (features and the classifier; a few counterfactual steps); the main process writes the classifier
and the counterfactual copy's trained layers afterwards.

    python ddp_serac_run.py NAME MODEL_FOLDER TRAIN_JSON OUT.safetensors
"""
import sys

from safetensors.torch import save_file

from attrib.backbones.loader import load_backbone
from attrib.data import load_records
from attrib.parallel import finish, processes
from editing.methods import MethodContext, build_method, method_config
from editing.methods.serac_parts import trainable_layers


def main(name: str, folder: str, data: str, out: str) -> None:
    backbone = load_backbone(name, folder)
    hyper = {**method_config("serac", name), "feature_batch": 2, "cls_records": 8, "cls_steps": 5, "cls_batch": 4,
             "cls_lr": 1e-2, "cf_steps": 3, "cf_batch": 4, "cf_lr": 1e-3, "dev_records": 0}
    editor = build_method("serac", MethodContext(backbone, hyper=hyper, seed=0))
    editor.prepare(load_records(data), [])
    if processes().main:
        state = {f"classifier.{k}": v for k, v in editor.classifier.state_dict().items()}
        names = {id(p): n for n, p in editor.counterfactual.model.named_parameters()}
        state.update({f"cf.{names[id(p)]}": p for p in trainable_layers(editor.counterfactual,
                                                                         hyper["cf_train_layers"])})
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish()
