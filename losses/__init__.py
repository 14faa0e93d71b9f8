from losses.bce import BCEDiceLoss, BCELoss
from losses.deep_supervision import DeepSupervisionLoss
from losses.dice import DiceCELoss, DiceLoss

__all__ = ["BCEDiceLoss", "BCELoss", "DeepSupervisionLoss", "DiceCELoss", "DiceLoss"]
