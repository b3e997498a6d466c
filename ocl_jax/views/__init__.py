"""The views of an image: crops, colour, blur (augment), BG-mixup, Mixup / CutMix and SGCL saliency."""
