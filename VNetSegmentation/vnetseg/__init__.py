"""vnetseg: the pure core of the VNetSegmentation extension (V-Net spleen segmentation in CT).

Never imports slicer, qt, ctk or vtk, so it runs inside Slicer, in a separate process, and on a
plain command line alike. torch is imported by the modules that need it (model, checkpoint,
inference), not by this package, so ``import vnetseg.io`` works without torch.
"""

__version__ = "0.1.0"
