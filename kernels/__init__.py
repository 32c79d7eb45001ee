"""Triton kernels, installed as ``hyperflow_ext.kernels``.

Each module reads top to bottom: docstring → ``@triton.jit`` kernel → host launcher →
``*_reference`` in plain PyTorch. Import through :mod:`hyperflow_ext.native` checks; nothing
here runs at import beyond kernel definitions.
"""
