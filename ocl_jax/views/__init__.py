"""The views of an image: crops, colour, blur, BG-mixup, Mixup / CutMix and SGCL saliency."""
