"""lymphdx: semi-supervised multi-domain multi-task CT classification of metastatic lymph nodes.

Axis convention (used everywhere in lymphdx):
    * Physical quantities (spacing, origin, sizes in configs, ``shape`` of a preset) are
      given in ITK order ``(x, y, z)``, in millimetres, in the LPS world frame of ITK/DICOM.
    * In-memory arrays are NumPy arrays in ``(z, y, x)`` order, exactly what
      ``SimpleITK.GetArrayFromImage`` returns; tensors are ``(B, C, D, H, W)`` with
      ``D = z`` (axial slice index), ``H = y``, ``W = x``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
