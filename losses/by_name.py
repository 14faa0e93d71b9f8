"""The segmentation loss a ``--loss`` name stands for, for a network of one sigmoid logit or of one
logit per class."""

from torch import nn

from losses.bce import BCEDiceLoss, BCELoss
from losses.dice import DiceCELoss, DiceLoss

LOSSES = ("auto", "dice", "bce", "bce_dice")


def build_loss(name: str, outputs: int) -> nn.Module:
    """`dice` (soft Dice over the batch), `bce` (binary cross-entropy) or `bce_dice` (their sum; with
    several classes, cross-entropy + Dice); `auto` is `dice` for one sigmoid logit and `bce_dice` for
    several classes, where Dice alone lets a thin class stall (ACDC's myocardium, README "Real data").

    Args:
        name: one of ``LOSSES``.
        outputs: logits of the network: 1 is one sigmoid logit for one foreground class, more are
            one softmax logit per class, background included.
    """
    if name not in LOSSES:
        raise SystemExit(f"--loss {name}: choose one of {', '.join(LOSSES)}")
    if name == "auto":
        name = "dice" if outputs == 1 else "bce_dice"
    if outputs == 1:
        # Batch Dice: a slice without the finding would otherwise score 0 however small its error.
        return {"dice": lambda: DiceLoss(batch_dice=True, activation="sigmoid"), "bce": BCELoss,
                "bce_dice": BCEDiceLoss}[name]()
    if name == "bce":
        raise SystemExit("--loss bce needs one foreground class; use dice or bce_dice for several.")
    return DiceLoss(batch_dice=True) if name == "dice" else DiceCELoss(batch_dice=True)
