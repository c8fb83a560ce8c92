"""Upstream reproduction (PyTorch inductor): weight freezing folds two different Python-float scales of two
convolutions in one graph with the SAME scale, so the compiled output is wrong.

Seen on InceptionResNetV2 (timm's ``inception_resnet_v2`` and our Keras-equivalent copy): its residual blocks
compute ``conv(x) * scale + x`` with scale 0.17 (Block35), 0.1 (Block17) and 0.2 (Block8); with
``torch._inductor.config.freezing = True`` (or ``torch.compile(options={"freezing": True})``) the whole network's
pooled features are off by 15 % (max |diff| / max |eager|) on CPU; Block17 -> Mixed_7a -> Block8 alone: 1.7 %.

Cause (torch/_inductor/fx_passes/binary_folding.py, ``resize_scalar_or_tensor_to_shape``): a Python-float operand
is turned into a constant with ``graph.owning_module.register_buffer("other_tensor", ...)`` and read back with
``get_attr("other_tensor")``: one fixed name, so every folding in the same pass overwrites the buffer the earlier
ones point to, and the constant folding that follows multiplies every folded convolution by the last scale.
Fix: register each constant under a fresh name (e.g. ``get_free_name`` / a counter), as the other freezing
passes do. Seen with torch 2.14.1 (CPU); the code is the same in 2.11.

Our route around it: lightning_app.engine folds BatchNorm itself and compiles WITHOUT weight freezing (the
weights stay graph inputs, which also lets fine-tuned weights be refreshed in place without recompiling).

Usage: python benchmarks/repro_inductor_freezing.py   (about 20 s on 2 CPU cores; prints the max abs difference,
expected ~1e-7, observed ~0.2; exits 1 while the bug is present)
"""
import sys

import torch
import torch._inductor.config as inductor_config


class TwoScaledConvs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(4, 4, 1)
        self.b = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * 0.1 + self.b(x) * 0.2


def main() -> int:
    torch.manual_seed(0)
    model = TwoScaledConvs().eval()
    x = torch.randn(1, 4, 8, 8)
    inductor_config.freezing = True
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model)(x)
    diff = (actual - expected).abs().max().item()
    print(f"torch {torch.__version__}: max |compiled - eager| = {diff:.3g} "
          f"({'BUG PRESENT' if diff > 1e-4 else 'ok'})")
    return 1 if diff > 1e-4 else 0


if __name__ == "__main__":
    sys.exit(main())
