from losses.bce import BCELoss
from losses.deep_supervision import DeepSupervisionLoss
from losses.dice import DiceCELoss, DiceLoss

__all__ = ["BCELoss", "DeepSupervisionLoss", "DiceCELoss", "DiceLoss"]
