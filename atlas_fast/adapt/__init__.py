"""Learning aTLAS coefficients for real jobs: few-shot and multi-task cross-entropy, test-time entropy
minimisation, unsupervised FixMatch (UFM) and task negation, with zero-shot or linear-probe heads.

    result = adapt("ViT-B-32", "bank.safetensors", "data/cars", pretrained="zeroshot.pt",
                   objective="ce", shots=16, epochs=10, out="runs/cars")
    evaluate("ViT-B-32", "data/cars", pretrained="zeroshot.pt", bank="bank.safetensors",
             coefficients="runs/cars/coefficients.safetensors")
    merge("ViT-B-32", "bank.safetensors", "runs/cars/coefficients.safetensors", "cars.pt",
          pretrained="zeroshot.pt")
    select_blocks("ViT-B-32", "bank.safetensors", "data/cars", keep=2, pretrained="zeroshot.pt", shots=16,
                  out="bank_cars_b2.safetensors")     # the 2 best task vectors of each block, by |dL/dc| at θ0
"""
import sys

from .api import AdaptResult, adapt, build_bank, compose_from_file, evaluate, merge
from .data import DataError
from .heads import Classifier, LinearHead, ZeroShotHead, fit_linear_probe, zero_shot_head
from .inputs import BankMismatchError, load_data, load_model
from .loop import Task, TrainConfig, train
from .models import ModelSpecError
from .online import OnlineStep, OnlineTTA
from .select import Selection, save_selection, select_blocks, selection_path
from .streams import adapt_online, adapt_streams

__all__ = ["adapt", "evaluate", "merge", "build_bank", "load_data", "load_model", "compose_from_file",
           "AdaptResult", "BankMismatchError", "DataError", "ModelSpecError", "Classifier", "LinearHead",
           "ZeroShotHead", "fit_linear_probe", "zero_shot_head", "Task", "TrainConfig", "train", "select_blocks",
           "save_selection", "selection_path", "Selection", "OnlineTTA", "OnlineStep", "adapt_online",
           "adapt_streams"]


class _CallableModule(type(sys)):
    """atlas_fast.adapt is this package and, called, the adapt() function: `atlas_fast.adapt(model, bank, data)`
    works while `atlas_fast.adapt.evaluate` and imports of its modules keep working."""

    def __call__(self, *args, **kwargs):
        return adapt(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
