from losses.bce import BCEDiceLoss, BCELoss
from losses.by_name import LOSSES, build_loss
from losses.deep_supervision import DeepSupervisionLoss
from losses.dice import DiceCELoss, DiceLoss

__all__ = ["BCEDiceLoss", "BCELoss", "DeepSupervisionLoss", "DiceCELoss", "DiceLoss", "LOSSES", "build_loss"]
